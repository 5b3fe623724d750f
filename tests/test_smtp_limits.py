"""Protocol limits and strictness, hit one by one over real sockets.

Each limit in ``Limits`` is set low here and a client goes past it; the test
checks the reply a client sees and that the session (or the next one) still
works when it should. Line-ending strictness (bare CR / bare LF) and SMTP
smuggling live here too: they are limits on what the byte stream may hold.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from mailengine import Limits
from smtpclient import Raw, session

pytestmark = pytest.mark.timeout(60)


# ---- helpers -------------------------------------------------------------------------


def limits(**kw: object) -> Limits:
    kw.setdefault("auth_fail_delay", 0.0)
    return Limits(**kw)  # type: ignore[arg-type]


def open_txn(r: Raw) -> None:
    assert r.cmd("MAIL FROM:<a@sender.test>")[0] == 250
    assert r.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert r.cmd("DATA")[0] == 354


def good_transaction(r: Raw) -> None:
    """A normal message: proves the session is still usable."""
    open_txn(r)
    code, text = r.cmd(b"Subject: after\r\n\r\nstill works\r\n.")
    assert code == 250 and "queued as" in text, (code, text)


# ---- bare CR / bare LF in commands ---------------------------------------------------


@pytest.mark.parametrize("line, what", [
    (b"NOOP\n", "<LF>"),
    (b"NO\rOP\r\n", "<CR>"),
    (b"NOOP\r\r\n", "<CR>"),
])
def test_bare_line_ends_in_commands(engine, ports, line, what):
    with session(ports.mx) as r:
        r.send(line)
        code, text = r.reply()
        assert (code, text[:5]) == (500, "5.5.2")
        assert what in text
        assert r.cmd("NOOP")[0] == 250


def test_bare_lf_command_is_not_executed(engine, ports):
    with session(ports.mx) as r:
        # A MAIL ended by a bare LF is refused as a whole, so RCPT has no transaction.
        r.send(b"MAIL FROM:<a@sender.test>\nRCPT TO:<alice@example.test>\r\n")
        assert r.reply()[0] == 500
        assert r.reply()[0] == 503
        good_transaction(r)


# ---- bare CR / bare LF inside DATA ---------------------------------------------------


@pytest.mark.parametrize("body", [
    b"Subject: lf\r\n\r\nbare\nlf\r\n",
    b"Subject: cr\r\n\r\nbare\rcr\r\n",
    b"Subject: cr at end\r\n\r\nline\r\r\n",
    b"Subject: dot cr\r\n\r\n.\rx\r\n",
])
def test_bare_line_ends_in_data_refused(engine, ports, body):
    with session(ports.mx) as r:
        open_txn(r)
        r.send(body + b".\r\n")
        code, text = r.reply()
        assert (code, text[:5]) == (550, "5.6.0")
        assert engine.queue.list() == []
        assert r.quiet() == b""
        good_transaction(r)
    assert len(engine.queue.list()) == 1


# ---- SMTP smuggling ------------------------------------------------------------------


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r"])
def test_smuggling_sequences_do_not_end_data(engine, ports, fake_end):
    smuggled = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nforged\r\n")
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: outer\r\n\r\nhello" + fake_end + smuggled + b"\r\n.\r\n")
        code, text = r.reply()
        assert code in (250, 550), (code, text)
        # Exactly one reply for the whole DATA: nothing else is pending...
        assert r.quiet(0.5) == b""
        # ...and the next reply answers the next command.
        assert r.cmd("NOOP") == (250, "2.0.0 Ok")
    entries = engine.queue.list()
    assert len(entries) <= 1
    for e in entries:
        assert e.envelope.mail_from == "a@sender.test"
        _, raw = engine.queue.show(e.id)
        assert b"Subject: outer" in raw
    assert all(e.envelope.mail_from != "evil@attacker.test" for e in entries)


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r.\r\n", b"\n.\n"])
def test_smuggling_split_across_writes(engine, ports, fake_end):
    # The same, with every byte of the fake end in its own write.
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: outer\r\n\r\nhello")
        for i in range(len(fake_end)):
            r.send(fake_end[i:i + 1])
            time.sleep(0.02)
        r.send(b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
               b"forged\r\n\r\n.\r\n")
        code, _ = r.reply()
        assert code in (250, 550)
        assert r.quiet(0.5) == b""
        assert r.cmd("NOOP") == (250, "2.0.0 Ok")
    assert all(e.envelope.mail_from != "evil@attacker.test" for e in engine.queue.list())
    assert len(engine.queue.list()) <= 1


def test_real_end_of_data_split_across_writes(engine, ports):
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: split\r\n\r\nbody")
        for b in (b"\r", b"\n", b".", b"\r", b"\n"):
            r.send(b)
            time.sleep(0.02)
        code, text = r.reply()
        assert code == 250 and "queued as" in text
    (entry,) = engine.queue.list()
    _, raw = engine.queue.show(entry.id)
    assert raw.endswith(b"\r\n\r\nbody\r\n")


# ---- max_command_line ----------------------------------------------------------------


def test_command_line_too_long(engine_factory, ports):
    engine_factory(limits=limits(max_command_line=512))
    with session(ports.mx) as r:
        # 512 octets including CRLF is the longest line (RFC 5321 4.5.3.1.4).
        assert r.cmd("NOOP " + "x" * 505)[0] == 250
        code, text = r.cmd("NOOP " + "x" * 506)
        assert (code, text[:5]) == (500, "5.5.2")
        # The tail of an over-long line is never read as a command.
        code, _ = r.cmd("NOOP " + "x" * 2000 + " QUIT")
        assert code == 500
        assert r.cmd("NOOP")[0] == 250
        good_transaction(r)


def test_command_line_limit_default_is_roomy(engine, ports):
    with session(ports.mx) as r:
        assert r.cmd("NOOP " + "x" * 1500)[0] == 250
        assert r.cmd("NOOP " + "x" * (Limits().max_command_line + 10))[0] == 500
        assert r.cmd("NOOP")[0] == 250


def test_command_line_too_long_in_pieces(engine_factory, ports):
    engine_factory(limits=limits(max_command_line=512))
    with session(ports.mx) as r:
        for _ in range(5):
            r.send(b"y" * 300)
            time.sleep(0.02)
        r.send(b"\r\nNOOP\r\n")
        assert r.reply()[0] == 500
        assert r.reply()[0] == 250


# ---- max_text_line -------------------------------------------------------------------


def test_text_line_limit(engine_factory, ports):
    eng = engine_factory(limits=limits(max_text_line=2000))
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: long\r\n\r\n" + b"a" * 3000 + b"\r\n.\r\n")
        code, text = r.reply()
        assert (code, text[:5]) == (552, "5.3.4")
        assert eng.queue.list() == []
        # Over RFC 5321's 998 but under the configured bound: accepted.
        open_txn(r)
        line = b"b" * 1500
        code, _ = r.cmd(b"Subject: long ok\r\n\r\n" + line + b"\r\n.")
        assert code == 250
    (entry,) = eng.queue.list()
    _, raw = eng.queue.show(entry.id)
    assert raw.endswith(line + b"\r\n")


def test_text_line_limit_boundary(engine_factory, ports):
    eng = engine_factory(limits=limits(max_text_line=1000))
    with session(ports.mx) as r:
        open_txn(r)
        assert r.cmd(b"Subject: b\r\n\r\n" + b"c" * 1000 + b"\r\n.")[0] == 250
        open_txn(r)
        assert r.cmd(b"Subject: b\r\n\r\n" + b"c" * 1001 + b"\r\n.")[0] == 552
    assert len(eng.queue.list()) == 1


# ---- max_message_size ----------------------------------------------------------------


def test_message_size_boundary(engine_factory, ports):
    eng = engine_factory(limits=limits(max_message_size=1000))
    head = b"Subject: s\r\n\r\n"
    with session(ports.mx) as r:
        open_txn(r)
        body = head + b"x" * (1000 - len(head) - 2) + b"\r\n"
        assert len(body) == 1000
        code, _ = r.cmd(body + b".")
        assert code == 250
        open_txn(r)
        code, text = r.cmd(body + b"y\r\n.")
        assert (code, text[:5]) == (552, "5.3.4")
        good_transaction(r)
    assert len(eng.queue.list()) == 2


# ---- max_recipients ------------------------------------------------------------------


def test_too_many_recipients(engine_factory, ports):
    eng = engine_factory(limits=limits(max_recipients=3))
    with session(ports.mx) as r:
        assert r.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        for i in range(3):
            assert r.cmd(f"RCPT TO:<r{i}@elsewhere.test>")[0] == 250
        code, text = r.cmd("RCPT TO:<r3@elsewhere.test>")
        assert (code, text[:5]) == (452, "4.5.3")
        assert r.cmd("DATA")[0] == 354
        assert r.cmd(b"Subject: many\r\n\r\nx\r\n.")[0] == 250
    (entry,) = eng.queue.list()
    assert entry.envelope.rcpt_tos == tuple(f"r{i}@elsewhere.test" for i in range(3))


def test_recipient_count_resets_per_transaction(engine_factory, ports):
    engine_factory(limits=limits(max_recipients=2))
    with session(ports.mx) as r:
        for _ in range(2):
            assert r.cmd("MAIL FROM:<a@sender.test>")[0] == 250
            assert r.cmd("RCPT TO:<a@elsewhere.test>")[0] == 250
            assert r.cmd("RCPT TO:<b@elsewhere.test>")[0] == 250
            assert r.cmd("RCPT TO:<c@elsewhere.test>")[0] == 452
            assert r.cmd("RSET")[0] == 250


# ---- connection limits ---------------------------------------------------------------


def _greeted(port: int) -> Raw:
    r = Raw(port)
    code, _ = r.reply()
    assert code == 220
    return r


def _wait_accepting(port: int, deadline_s: float = 5.0) -> Raw:
    """Retry until a connection is greeted (closes are counted asynchronously)."""
    deadline = time.monotonic() + deadline_s
    for _ in range(100):
        r = Raw(port)
        code, _ = r.reply()
        if code == 220:
            return r
        r.sock.close()
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError("no connection accepted after one was closed")


def test_connections_per_ip(engine_factory, ports):
    engine_factory(trusted_networks=[], limits=limits(max_connections_per_ip=3))
    held = [_greeted(ports.mx) for _ in range(3)]
    try:
        with Raw(ports.mx) as r:
            code, text = r.reply()
            assert (code, text[:5]) == (421, "4.7.0")
            assert r.closed()
        # The limit is per address across listeners.
        with Raw(ports.submission) as r:
            assert r.reply()[0] == 421
        # The held sessions are untouched.
        for h in held:
            assert h.cmd("NOOP")[0] == 250
        held.pop().sock.close()
        held.append(_wait_accepting(ports.mx))
    finally:
        for h in held:
            h.sock.close()


def test_trusted_networks_exempt_from_per_ip_limit(engine_factory, ports):
    engine_factory(limits=limits(max_connections_per_ip=2))
    held = [_greeted(ports.mx) for _ in range(4)]
    try:
        for h in held:
            assert h.cmd("NOOP")[0] == 250
    finally:
        for h in held:
            h.sock.close()


def test_total_connections(engine_factory, ports):
    engine_factory(limits=limits(max_connections=3))
    held = [_greeted(ports.mx) for _ in range(3)]
    try:
        with Raw(ports.submission) as r:
            code, text = r.reply()
            assert (code, text[:5]) == (421, "4.7.0")
            assert r.closed()
        for h in held:
            assert h.cmd("NOOP")[0] == 250
        held.pop(0).sock.close()
        held.append(_wait_accepting(ports.mx))
    finally:
        for h in held:
            h.sock.close()


# ---- timeouts ------------------------------------------------------------------------


def test_command_timeout(engine_factory, ports):
    engine_factory(limits=limits(command_timeout=1.0))
    with session(ports.mx) as r:
        t0 = time.monotonic()
        code, text = r.reply()
        elapsed = time.monotonic() - t0
        assert (code, text[:5]) == (421, "4.4.2")
        assert 0.8 <= elapsed < 4.0
        assert r.closed()


def test_command_timeout_is_per_command(engine_factory, ports):
    engine_factory(limits=limits(command_timeout=2.0))
    with session(ports.mx) as r:
        for _ in range(6):                     # 3 s of activity, 0.5 s apart
            time.sleep(0.5)
            assert r.cmd("NOOP")[0] == 250


def test_data_timeout(engine_factory, ports):
    engine_factory(limits=limits(command_timeout=30.0, data_timeout=1.0))
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: stalled\r\n\r\nhalf a mess")
        t0 = time.monotonic()
        code, text = r.reply()
        elapsed = time.monotonic() - t0
        assert (code, text[:5]) == (421, "4.4.2")
        assert 0.8 <= elapsed < 4.0
        assert r.closed()


def test_data_timeout_is_inactivity_not_total(engine_factory, ports):
    eng = engine_factory(limits=limits(command_timeout=30.0, data_timeout=2.0))
    with session(ports.mx) as r:
        open_txn(r)
        r.send(b"Subject: drip\r\n\r\n")
        for i in range(8):                     # 3.2 s in all, 0.4 s apart
            time.sleep(0.4)
            r.send(b"line %d\r\n" % i)
        code, _ = r.cmd(b".")
        assert code == 250
    assert len(eng.queue.list()) == 1


def test_data_timeout_in_bdat_chunk(engine_factory, ports):
    engine_factory(limits=limits(command_timeout=30.0, data_timeout=1.0))
    with session(ports.mx) as r:
        assert r.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        assert r.cmd("RCPT TO:<alice@example.test>")[0] == 250
        r.send(b"BDAT 100 LAST\r\nonly a few")
        t0 = time.monotonic()
        code, _ = r.reply()
        assert code == 421
        assert time.monotonic() - t0 < 4.0


def test_session_timeout(engine_factory, ports):
    engine_factory(limits=limits(command_timeout=30.0, session_timeout=1.5))
    with session(ports.mx) as r:
        t0 = time.monotonic()
        got = None
        for _ in range(20):                    # busy client, at most ~5 s
            r.send(b"NOOP\r\n")
            code, text = r.reply()
            if code != 250:
                got = (code, text)
                break
            time.sleep(0.25)
        assert got is not None and got[0] == 421, got
        assert time.monotonic() - t0 < 4.0
        assert r.closed()


# ---- max_errors ----------------------------------------------------------------------


def test_max_errors(engine_factory, ports):
    engine_factory(limits=limits(max_errors=3))
    with session(ports.mx) as r:
        assert r.cmd("BOGUS 1")[0] == 500
        assert r.cmd("BOGUS 2")[0] == 500
        assert r.cmd("NOOP")[0] == 250          # still open after two errors
        assert r.cmd("BOGUS 3")[0] == 500
        code, text = r.reply()
        assert (code, text[:5]) == (421, "4.7.0")
        assert r.closed()


def test_max_errors_counts_sequence_errors(engine_factory, ports):
    engine_factory(limits=limits(max_errors=3))
    with Raw(ports.mx) as r:
        assert r.reply()[0] == 220
        r.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nNOOP\r\n")
        assert [r.reply()[0] for _ in range(4)] == [503, 503, 503, 421]
        assert r.closed()


# ---- AUTH line limits ----------------------------------------------------------------


def _b64(data: bytes) -> bytes:
    import base64
    return base64.b64encode(data)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_overlong_sasl_response_ends_exchange(engine_factory, ports, mech):
    engine_factory(allow_plain_auth=True)
    with session(ports.submission) as r:
        assert r.cmd(f"AUTH {mech}")[0] == 334
        code, _ = r.cmd("A" * 13000)
        assert code in (500, 501)
        assert r.cmd("NOOP")[0] == 250


def test_sasl_response_up_to_12288_octets(engine_factory, ports):
    # RFC 4954 4: a SASL response line may be 12288 octets; it is read as one.
    engine_factory(allow_plain_auth=True)
    with session(ports.submission) as r:
        assert r.cmd("AUTH PLAIN")[0] == 334
        resp = _b64(b"\0alice@example.test\0" + b"p" * 9000)
        assert len(resp) < 12286
        assert r.cmd(resp)[0] == 535
        assert r.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_huge_auth_initial_response_with_big_command_line(cli_server, ports, tmp_path, mech):
    # The server runs in a child process: the failure mode is a crash.
    cfg = tmp_path / "big-lines.toml"
    cfg.write_text("[limits]\nmax_command_line = 65536\nauth_fail_delay = 0.0\n")
    srv = cli_server("--config", str(cfg), "--domain", "example.test",
                     "--user", "alice@example.test:secret", "--allow-plain-auth")
    ir = _b64(b"\0alice@example.test\0" + b"A" * 45000)
    assert 12288 < len(ir) < 65000
    with session(ports.submission) as r:
        r.send(b"AUTH " + mech.encode() + b" " + ir + b"\r\n")
        try:
            code: int | None = r.reply()[0]
        except (EOFError, ConnectionResetError):
            code = None
    try:
        srv.proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        pass
    assert srv.proc.poll() is None, f"server died, exit status {srv.proc.returncode}"
    assert code is not None and 500 <= code < 600
    with session(ports.mx) as r:
        assert r.cmd("NOOP")[0] == 250


# ---- timer accuracy ------------------------------------------------------------------


def test_command_timeout_not_early_on_idle_worker(engine_factory, ports):
    engine_factory(workers=1, limits=limits(command_timeout=1.0))
    with Raw(ports.mx) as r:                 # a first session, closed by its timeout
        assert r.reply()[0] == 220
        assert r.reply()[0] == 421
        assert r.closed()
    time.sleep(0.6)
    with Raw(ports.mx) as r:
        assert r.reply()[0] == 220
        t0 = time.monotonic()
        code, _ = r.reply()
        elapsed = time.monotonic() - t0
        assert code == 421
        assert elapsed >= 0.9, f"command timeout of 1.0 s fired after {elapsed:.2f} s"
