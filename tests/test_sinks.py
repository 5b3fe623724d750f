"""The SMTP sinks that delivery tests send to: each feature shown with a real
client (smtplib, aiosmtplib, swaks) or, where a library would hide the bytes,
a raw socket that writes exactly what the test says."""
from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import subprocess
import time

import aiosmtplib
import pytest

from sinks import Received, Rule, Sink, SinkGroup, free_port_on
from smtpclient import Raw

pytestmark = pytest.mark.timeout(60)

MSG = b"Subject: sink test\r\nMessage-ID: <sink@test>\r\n\r\nhello\r\n"
MX_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]


def ehlo(sink: Sink, name: str = "client.test") -> Raw:
    """A raw session on a sink bound to 127.0.0.1, greeted and past EHLO."""
    r = Raw(sink.port)
    assert r.reply()[0] == 220
    code, text = r.cmd(f"EHLO {name}")
    assert code == 250, text
    return r


def replies(r: Raw, n: int) -> list[int]:
    return [r.reply()[0] for _ in range(n)]


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--helo", "client.test", "--from", "sender@src.test",
                           "--timeout", "5", *args],
                          capture_output=True, text=True, timeout=30)


# ---- replies chosen per recipient and per phase --------------------------------------


def test_rcpt_rules_answer_per_recipient_and_only_accepted_ones_are_kept() -> None:
    rules = {"temp": (451, "4.3.0 try again"), "perm": (550, "5.1.1 no such user"),
             "boss@other.test": (552, "5.2.2 mailbox full"), "@blocked.test": (554, "5.7.1 no")}
    with Sink(rcpt_rules=rules) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        refused = c.sendmail("from@src.test", ["ok@dest.test", "temp@dest.test", "PERM@dest.test",
                                               "boss@other.test", "any@blocked.test"], MSG)
        assert refused == {"temp@dest.test": (451, b"4.3.0 try again"),
                           "PERM@dest.test": (550, b"5.1.1 no such user"),
                           "boss@other.test": (552, b"5.2.2 mailbox full"),
                           "any@blocked.test": (554, b"5.7.1 no")}
        [m] = sink.wait_for(1)
        with pytest.raises(TimeoutError, match=r"1 of 2 messages .*ok@dest.test"):
            sink.wait_for(2, timeout=0.1)
    assert isinstance(m, Received)
    assert m.rcpt_tos == ["ok@dest.test"] and m.rcpt_options == [[]]
    assert m.rejected_rcpts == [("temp@dest.test", 451), ("PERM@dest.test", 550),
                                ("boss@other.test", 552), ("any@blocked.test", 554)]
    assert m.mail_from == "from@src.test" and m.data == MSG and not m.tls
    assert (m.host, m.port, m.session) == ("127.0.0.1", sink.port, 1)
    assert sink.protocol_violations == []


def test_rule_times_greylists_then_accepts_and_mail_reply_refuses_the_sender() -> None:
    grey = Rule(451, "4.7.1 greylisted, come back later", times=1)
    with Sink(rcpt_rules={"*": grey}) as sink:
        for expect in (451, 250):
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
                c.ehlo()
                c.mail("a@src.test")
                assert c.rcpt("b@dest.test")[0] == expect
        assert grey.hits == 1 and sink.messages == []
        sink.reset()
        assert grey.hits == 0
    with Sink(mail_reply=(553, "5.7.1 sender rejected")) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                c.sendmail("spam@src.test", ["b@dest.test"], MSG)
        assert e.value.smtp_code == 553


def test_data_reply_delay_and_a_callable_choose_the_answer_after_the_dot() -> None:
    def verdict(m: Received) -> tuple[int, str] | None:
        return (554, "5.6.0 looks like spam") if b"viagra" in m.data else None

    with Sink(data_reply=verdict, delay=0.2) as sink, \
            smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        t0 = time.monotonic()
        c.sendmail("a@src.test", ["b@dest.test"], MSG)
        assert time.monotonic() - t0 >= 0.2
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@src.test", ["b@dest.test"], b"Subject: viagra\r\n\r\nbuy\r\n")
        assert e.value.smtp_code == 554
        [m] = sink.wait_for(1)
        assert m.reply[0] == 250
        assert [r.reply for r in sink.rejected] == [(554, "5.6.0 looks like spam")]


def test_a_dropping_rule_closes_without_an_answer() -> None:
    with Sink(data_reply=Rule(drop=True)) as sink:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
                c.sendmail("a@src.test", ["b@dest.test"], MSG)
        sink.wait_idle(5)
        assert sink.messages == [] and sink.rejected == []


# ---- greetings and HELO-only servers -------------------------------------------------


def test_greeting_421_is_sent_and_the_connection_closed() -> None:
    with Sink(greeting=(421, "4.3.2 try later")) as sink:
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
        assert e.value.smtp_code == 421
        r = Raw(sink.port)
        assert r.reply() == (421, "4.3.2 try later")
        assert r.closed()
        r.close()
        sink.wait_idle(5)
        assert sink.connections_total == 2 and sink.messages == []


def test_greeting_554_answers_503_until_quit() -> None:
    with Sink(greeting=(554, "5.3.2 no service here")) as sink:
        r = Raw(sink.port)
        assert r.reply()[0] == 554
        assert r.cmd("EHLO client.test")[0] == 503
        assert r.cmd("QUIT")[0] == 221
        r.close()
        assert sink.protocol_violations == ["session 1: 'EHLO client.test' after a 554 greeting "
                                            "(only QUIT is expected)"]


def test_helo_only_server_refuses_ehlo_and_advertises_nothing() -> None:
    with Sink(ehlo=False) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        assert c.ehlo("client.test")[0] == 502
        assert c.helo("client.test")[0] == 250
        c.sendmail("a@src.test", ["b@dest.test"], MSG)
        [m] = sink.wait_for(1)
    assert m.helo == "client.test"
    assert sink.transcripts[0][:2] == ["ehlo client.test", "helo client.test"]
    assert sink.protocol_violations == []


# ---- TLS and AUTH --------------------------------------------------------------------


def test_starttls_is_a_real_upgrade_verified_against_cert_path_and_tls_name() -> None:
    with Sink(starttls=True, tls_name="mx1.dest.test") as sink:
        assert sink.cert_path is not None and sink.cert_path.exists()
        ctx = ssl.create_default_context(cafile=str(sink.cert_path))
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c._host = "mx1.dest.test"  # the name smtplib verifies the certificate against
            assert c.ehlo()[0] == 250 and c.has_extn("starttls")
            assert c.starttls(context=ctx)[0] == 220
            assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
            c.ehlo()
            assert not c.has_extn("starttls")
            c.sendmail("a@src.test", ["b@dest.test"], MSG)
        [m] = sink.wait_for(1)
        assert m.tls and m.sni == "mx1.dest.test" and m.tls_version
        assert sink.transcripts[0][:3] == ["ehlo [127.0.0.1]", "STARTTLS", "ehlo [127.0.0.1]"]

        # The certificate names mx1.dest.test and 127.0.0.1, nothing else.
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c._host = "mx2.dest.test"
            c.ehlo()
            with pytest.raises(ssl.SSLCertVerificationError):
                c.starttls(context=ctx)
        sink.wait_idle(5)
        assert len(sink.tls_errors) == 1 and "CERTIFICATE" in sink.tls_errors[0].upper()


def test_starttls_with_plaintext_pipelined_behind_it_is_a_violation_and_discarded() -> None:
    with Sink(starttls=True) as sink:
        r = ehlo(sink)
        r.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert r.reply()[0] == 220
        r.starttls()
        assert r.cmd("EHLO client.test")[0] == 250
        assert r.cmd("MAIL FROM:<a@src.test>")[0] == 250
        r.close()
    assert len(sink.protocol_violations) == 1
    assert "after STARTTLS before the handshake" in sink.protocol_violations[0]
    assert "injected" not in " ".join(sink.transcripts[0])


def test_implicit_tls_sink() -> None:
    with Sink(implicit_tls=True, tls_name="smtps.dest.test") as sink:
        ctx = ssl.create_default_context(cafile=str(sink.cert_path))
        with smtplib.SMTP_SSL("127.0.0.1", sink.port, timeout=5, context=ctx) as c:
            c.sendmail("a@src.test", ["b@dest.test"], MSG)
        [m] = sink.wait_for(1)
        assert m.tls


def test_auth_plain_and_login_after_starttls_and_required_for_mail() -> None:
    with Sink(starttls=True, auth={"user": "pw"}) as sink:
        ctx = ssl.create_default_context(cafile=str(sink.cert_path))
        ctx.check_hostname = False
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c.ehlo()
            assert not c.has_extn("auth")  # only offered inside TLS
            assert c.mail("a@src.test")[0] == 530
            c.starttls(context=ctx)
            c.ehlo()
            assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("user", "wrong")
            c.login("user", "pw")  # smtplib tries CRAM-MD5 (absent), then PLAIN
            c.sendmail("a@src.test", ["b@dest.test"], MSG)
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c.starttls(context=ctx)
            c.ehlo()
            c.user, c.password = "user", "pw"
            assert c.auth("LOGIN", c.auth_login, initial_response_ok=False)[0] == 235
            c.sendmail("b@src.test", ["c@dest.test"], MSG)
        m1, m2 = sink.wait_for(2)
    assert (m1.auth_user, m2.auth_user) == ("user", "user")
    assert "AUTH LOGIN" in sink.transcripts[1]
    assert sink.protocol_violations == []


def test_auth_before_tls_is_refused_and_recorded() -> None:
    with Sink(starttls=True, auth={"user": "pw"}) as sink:
        r = ehlo(sink)
        assert r.cmd("AUTH PLAIN AHVzZXIAcHc=")[0] == 538
        r.close()
    assert sink.protocol_violations == ["session 1: AUTH though not advertised"]


# ---- several MX hosts ----------------------------------------------------------------


def test_sink_group_listens_on_eight_loopback_addresses_on_one_port() -> None:
    with SinkGroup(MX_ADDRESSES, per_sink={"127.0.0.9": {"greeting": (421, "4.3.2 busy")}}) as g:
        assert sorted(g.sinks) == sorted(MX_ADDRESSES)
        assert {s.port for s in g} == {g.port}
        for addr in MX_ADDRESSES[:-1]:
            res = swaks("--server", f"{addr}:{g.port}", "--to", f"user@{addr}.test")
            assert res.returncode == 0, res.stdout + res.stderr
        res = swaks("--server", f"127.0.0.9:{g.port}", "--to", "user@x.test")
        assert res.returncode != 0 and "421 4.3.2 busy" in res.stdout
        msgs = g.wait_for(7, timeout=10)
    assert [m.host for m in msgs] == MX_ADDRESSES[:-1]
    assert all(m.port == g.port and m.sink == m.host for m in msgs)
    for addr in MX_ADDRESSES[:-1]:
        [m] = g[addr].messages
        assert m.rcpt_tos == [f"user@{addr}.test"] and m.helo == "client.test"
    assert g.connections_total == 8 and g.protocol_violations == []


def test_sink_group_with_starttls_shares_one_ca_bundle() -> None:
    with SinkGroup(MX_ADDRESSES[:2], starttls=True, tls_name="mx.dest.test") as g:
        ctx = ssl.create_default_context(cafile=str(g.cert_path))
        for addr in MX_ADDRESSES[:2]:
            with smtplib.SMTP(addr, g.port, timeout=5) as c:
                c.starttls(context=ctx)  # verified against the address (IP SAN)
                c.sendmail("a@src.test", [f"b@{addr}"], MSG)
        assert all(m.tls for m in g.wait_for(2))


def test_free_port_on_gives_a_port_bindable_everywhere_and_never_twice() -> None:
    a = free_port_on(MX_ADDRESSES + ["::1"])
    b = free_port_on(MX_ADDRESSES)
    assert a != b
    for addr in MX_ADDRESSES:
        with socket.socket() as s:
            s.bind((addr, a))
    with Sink("::1", a) as sink, smtplib.SMTP("::1", a, timeout=5) as c:
        c.sendmail("a@src.test", ["b@dest.test"], MSG)
        assert sink.wait_for(1)[0].peer[0] == "::1"


# ---- connections: counting, limits ---------------------------------------------------


def test_concurrency_is_counted_exactly_with_parallel_clients() -> None:
    n = 6

    async def run(sink: Sink) -> None:
        clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=5)
                   for _ in range(n)]
        await asyncio.gather(*(c.connect() for c in clients))
        await asyncio.gather(*(c.sendmail("a@src.test", [f"r{i}@dest.test"], MSG)
                               for i, c in enumerate(clients)))
        await asyncio.gather(*(c.quit() for c in clients))

    with Sink(delay=0.2) as sink:
        asyncio.run(run(sink))
        msgs = sink.wait_for(n)
        sink.wait_idle(5)
        assert (sink.max_concurrent, sink.connections_total, sink.open_connections) == (n, n, 0)
        assert len({m.session for m in msgs}) == n
        assert sink.rate() > 0
        # one at a time: the peak stays, the total grows
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
                c.noop()
        sink.wait_idle(5)
        assert (sink.max_concurrent, sink.connections_total) == (n, n + 2)
        sink.reset()
        assert (sink.max_concurrent, sink.connections_total, sink.messages) == (0, 0, [])


def test_max_messages_per_connection_answers_421_and_closes() -> None:
    with Sink(max_messages=2) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        for i in range(2):
            c.sendmail("a@src.test", [f"r{i}@dest.test"], MSG)
        with pytest.raises((smtplib.SMTPSenderRefused, smtplib.SMTPServerDisconnected)):
            c.sendmail("a@src.test", ["r3@dest.test"], MSG)
        m1, m2 = sink.wait_for(2)
        assert m1.session == m2.session == 1
        assert sink.transcript(1)[-1] == "mail FROM:<a@src.test>"


# ---- pipelining ----------------------------------------------------------------------


def test_pipelined_batches_counts_commands_sent_in_one_write() -> None:
    with Sink() as sink:
        r = ehlo(sink)
        r.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\n"
               b"DATA\r\n")
        assert replies(r, 4) == [250, 250, 250, 354]
        r.send(MSG + b".\r\nMAIL FROM:<a@src.test>\r\nRCPT TO:<d@dest.test>\r\nDATA\r\n")
        assert replies(r, 4) == [250, 250, 250, 354]
        assert r.cmd(MSG + b".")[0] == 250
        assert r.cmd("QUIT")[0] == 221
        r.close()
        m1, m2 = sink.wait_for(2)
    assert sink.pipelined_batches == 2
    assert sink.batches == [
        (1, ["MAIL FROM:<a@src.test>", "RCPT TO:<b@dest.test>", "RCPT TO:<c@dest.test>", "DATA"]),
        (1, ["MAIL FROM:<a@src.test>", "RCPT TO:<d@dest.test>", "DATA"])]
    assert m2.rcpt_tos == ["d@dest.test"] and m1.session == m2.session
    assert sink.protocol_violations == []


def test_pipelining_when_not_advertised_or_past_a_group_end_is_a_violation() -> None:
    with Sink(pipelining=False) as sink:
        r = ehlo(sink)
        assert r.cmd("EHLO client.test")[1].count("PIPELINING") == 0
        r.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\n")
        assert replies(r, 2) == [250, 250]
        r.close()
    assert sink.pipelined_batches == 1
    assert sink.protocol_violations == [
        "session 1: b'RCPT TO:<b@dest.test>' sent before the reply to "
        "'MAIL FROM:<a@src.test>', PIPELINING not advertised"]
    with Sink() as sink:
        r = ehlo(sink)
        r.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\nSubject: x\r\n")
        assert replies(r, 3) == [250, 250, 354]
        r.close()
    [v] = sink.protocol_violations
    assert "before the reply to 'DATA'; DATA must end a pipelined group" in v


@pytest.mark.parametrize("pipelining", [True, False])
def test_swaks_pipelines_only_when_advertised(pipelining: bool) -> None:
    with Sink("127.0.0.2", pipelining=pipelining) as sink:
        res = swaks("--server", f"127.0.0.2:{sink.port}", "--to", "a@dest.test,b@dest.test",
                    "--pipeline")
        assert res.returncode == 0, res.stdout
        [m] = sink.wait_for(1)
    assert m.rcpt_tos == ["a@dest.test", "b@dest.test"]
    assert sink.pipelined_batches == (1 if pipelining else 0)
    assert sink.protocol_violations == []


# ---- what a client must not send -----------------------------------------------------


def test_smtputf8_refused_and_recorded_when_not_advertised() -> None:
    with Sink(smtputf8=False) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c.ehlo()
            assert not c.has_extn("smtputf8")
            with pytest.raises(smtplib.SMTPNotSupportedError):  # smtplib checks first
                c.sendmail("a@src.test", ["b@dest.test"], MSG, mail_options=["SMTPUTF8"])
        assert sink.protocol_violations == []
        r = ehlo(sink)
        assert r.cmd("MAIL FROM:<a@src.test> SMTPUTF8")[0] == 555
        assert r.cmd("MAIL FROM:<δοκιμή@src.test>".encode())[0] == 553
        assert r.cmd("MAIL FROM:<a@src.test>")[0] == 250
        assert r.cmd("RCPT TO:<用户@dest.test>".encode())[0] == 553
        r.close()
    v = sink.protocol_violations
    assert len(v) == 3
    assert "'SMTPUTF8': SMTPUTF8 not advertised" in v[0]
    assert "non-ASCII sender" in v[1] and "non-ASCII recipient" in v[2]


def test_smtputf8_accepted_when_advertised() -> None:
    async def send(port: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5) as c:
            await c.sendmail("δοκιμή@src.test", ["用户@例子.test"],
                             "Subject: ünïcode\r\n\r\nhi\r\n".encode(),
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])

    with Sink() as sink:
        asyncio.run(send(sink.port))
        [m] = sink.wait_for(1)
    assert m.mail_from == "δοκιμή@src.test" and m.rcpt_tos == ["用户@例子.test"]
    assert m.mail_options == ["SMTPUTF8", "BODY=8BITMIME"]
    assert sink.protocol_violations == []


def test_unadvertised_parameters_bare_lf_and_missing_crlf_are_violations() -> None:
    with Sink(eightbitmime=False, size=None) as sink:
        r = ehlo(sink)
        assert r.cmd("MAIL FROM:<a@src.test> BODY=8BITMIME")[0] == 555
        assert r.cmd("MAIL FROM:<a@src.test> SIZE=100")[0] == 555
        r.send(b"MAIL FROM:<a@src.test>\n")  # LF alone
        assert r.reply()[0] == 250
        assert r.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert r.cmd("DATA")[0] == 354
        assert r.cmd(b"Subject: x\r\n\r\nbare\nlf\r\n.")[0] == 250
        r.close()
        [m] = sink.wait_for(1)
    assert m.data == b"Subject: x\r\n\r\nbare\nlf\r\n"
    v = [x.split(": ", 1)[1] for x in sink.protocol_violations]
    assert v == ["parameter 'BODY=8BITMIME': 8BITMIME not advertised",
                 "parameter 'SIZE=100': SIZE not advertised",
                 "command line not ending in CRLF: b'MAIL FROM:<a@src.test>\\n'",
                 "bare LF in message content"]


def test_size_limit_and_dot_stuffing() -> None:
    with Sink(size=1000) as sink, smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "1000"
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@src.test", ["b@dest.test"], b"x" * 2000)  # smtplib sends SIZE=2000
        assert e.value.smtp_code == 552
        c.rset()
        body = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nend\r\n"
        c.sendmail("a@src.test", ["b@dest.test"], body)
        [m] = sink.wait_for(1)
    assert m.data == body and m.mail_options[0].startswith("size=")
    assert sink.protocol_violations == []


def test_chunking_bdat() -> None:
    with Sink(chunking=True) as sink:
        r = ehlo(sink)
        r.send(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@dest.test>\r\n")
        assert replies(r, 2) == [250, 250]
        part1, part2 = b"Subject: chunks\r\n", b"\r\n.not stuffed\r\n"
        r.send(b"BDAT %d\r\n%s" % (len(part1), part1))
        assert r.reply()[0] == 250
        r.send(b"BDAT %d LAST\r\n%s" % (len(part2), part2))
        assert r.reply()[0] == 250
        r.close()
        [m] = sink.wait_for(1)
    assert m.chunked and m.data == part1 + part2
    assert sink.protocol_violations == []


def test_limits_early_talkers_and_idle_timeout() -> None:
    with Sink(max_recipients=2, max_messages_total=1) as sink, \
            smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
        refused = c.sendmail("a@src.test", ["r1@dest.test", "r2@dest.test", "r3@dest.test"], MSG)
        assert refused == {"r3@dest.test": (452, b"4.5.3 too many recipients")}
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP("127.0.0.1", sink.port, timeout=5)  # the sink is full
        assert e.value.smtp_code == 421
    with Sink(greeting_delay=1.0, timeout=0.3) as sink:
        r = Raw(sink.port)
        r.send(b"EHLO eager.test\r\n")  # before the banner
        assert r.reply()[0] == 220 and r.reply()[0] == 250
        assert r.reply()[0] == 421  # then silence until the idle timeout
        assert r.closed()
        r.close()
        assert sink.protocol_violations == ["session 1: b'EHLO eager.test\\r\\n' sent before "
                                            "the greeting"]


def test_require_tls_and_dsn_parameters() -> None:
    with Sink(starttls=True, require_tls=True, dsn=True) as sink:
        ctx = ssl.create_default_context(cafile=str(sink.cert_path))
        ctx.check_hostname = False
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as c:
            c.ehlo()
            assert c.mail("a@src.test")[0] == 530
            c.starttls(context=ctx)
            c.sendmail("a@src.test", ["b@dest.test"], MSG, mail_options=["RET=HDRS"],
                       rcpt_options=["NOTIFY=FAILURE"])
        [m] = sink.wait_for(1)
    assert m.mail_options == ["RET=HDRS"] and m.rcpt_options == [["NOTIFY=FAILURE"]]
    assert sink.protocol_violations == []
