"""POP3 (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN RFC 5034)
against mail that came in over SMTP and was delivered into the Maildir
store: poplib, curl and raw sockets."""
from __future__ import annotations

import base64
import os
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, make_config
from smtpclient import client_tls as tls
from mailengine import Engine, Limits, Listener

HOST = "127.0.0.1"
USER, PASSWORD = "alice@example.test", "secret"


class Server:
    def __init__(self, tmp_path: Path, ports, **kw) -> None:
        self.pop3, self.pop3s = free_port(), free_port()
        cfg = make_config(tmp_path / "data", ports, delivery_enabled=True, dns="127.0.0.1:9", **kw)
        cfg.listeners += [Listener("pop3", HOST, self.pop3), Listener("pop3s", HOST, self.pop3s)]
        self.engine = Engine(cfg, events=False).start()
        self.ports = ports
        self.new = tmp_path / "data" / "mailboxes" / "example.test" / "alice" / "new"

    def deliver(self, *bodies: bytes) -> None:
        """One at a time, each in the mailbox before the next is sent, so
        the maildrop order is the order given (deliveries run in parallel)."""
        for b in bodies:
            before = len(list(self.new.iterdir())) if self.new.exists() else 0
            with smtplib.SMTP(HOST, self.ports.mx, timeout=10) as s:
                s.sendmail("x@sender.test", [USER], b)
            deadline = time.monotonic() + 10
            while not (self.new.exists() and len(list(self.new.iterdir())) > before):
                if time.monotonic() > deadline:
                    raise AssertionError("messages did not reach the mailbox")
                time.sleep(0.01)

    def login(self) -> poplib.POP3:
        p = poplib.POP3(HOST, self.pop3, timeout=10)
        p.stls(tls())
        p.user(USER)
        p.pass_(PASSWORD)
        return p


@pytest.fixture
def server(tmp_path, ports):
    srv = Server(tmp_path, ports)
    yield srv
    srv.engine.stop()


def msg(subject: str, body: str = "hello") -> bytes:
    return f"Subject: {subject}\r\nFrom: x@sender.test\r\n\r\n{body}\r\n".encode()


def test_smtp_in_pop3_out(server):
    server.deliver(msg("one", "first\r\n.starts with a dot\r\n..two dots"), msg("two"))
    p = server.login()
    count, size = p.stat()
    assert count == 2
    listing = p.list()[1]
    assert len(listing) == 2 and sum(int(x.split()[1]) for x in listing) == size
    # The two may have been delivered in either order (parallel delivery).
    one = 1 if b"Subject: one" in p.top(1, 0)[1] else 2
    lines = p.retr(one)[1]
    assert b"Subject: one" in lines
    assert b".starts with a dot" in lines and b"..two dots" in lines   # byte-stuffing undone by poplib
    assert lines[0].startswith(b"Return-Path: <x@sender.test>")
    top = p.top(3 - one, 0)[1]
    assert b"Subject: two" in top and b"hello" not in top
    uids = p.uidl()[1]
    p.dele(1)
    with pytest.raises(poplib.error_proto):
        p.retr(1)                                            # deleted in this session
    assert p.stat()[0] == 1
    p.rset()
    assert p.stat()[0] == 2
    p.dele(1)
    p.quit()                                                 # UPDATE: message 1 removed
    assert len(list(server.new.iterdir())) == 1
    p = server.login()
    assert p.stat()[0] == 1
    # UIDL is stable across sessions: the survivor keeps its id.
    assert p.uidl()[1][0].split()[1] == uids[1].split()[1]
    p.quit()


def test_capa_plain_login_needs_tls_and_implicit_tls(server):
    p = poplib.POP3(HOST, server.pop3, timeout=10)
    caps = p.capa()
    assert "STLS" in caps and "UIDL" in caps and "TOP" in caps and "RESP-CODES" in caps
    assert "USER" not in caps                                # not before TLS
    with pytest.raises(poplib.error_proto) as exc:
        p.user(USER)
    assert b"TLS" in exc.value.args[0]
    p.stls(tls())
    caps = p.capa()
    assert "USER" in caps and "SASL" in caps and "STLS" not in caps
    p.quit()
    server.deliver(msg("tls"))
    s = poplib.POP3_SSL(HOST, server.pop3s, timeout=10, context=tls())
    s.user(USER)
    s.pass_(PASSWORD)
    assert s.stat()[0] == 1
    s.quit()


def test_wrong_password_and_in_use(server):
    p = poplib.POP3(HOST, server.pop3, timeout=10)
    p.stls(tls())
    p.user(USER)
    with pytest.raises(poplib.error_proto) as exc:
        p.pass_("wrong")
    assert b"[AUTH]" in exc.value.args[0]
    p.user(USER)
    p.pass_(PASSWORD)
    q = poplib.POP3(HOST, server.pop3, timeout=10)
    q.stls(tls())
    q.user(USER)
    with pytest.raises(poplib.error_proto) as exc:
        q.pass_(PASSWORD)
    assert b"[IN-USE]" in exc.value.args[0]
    p.quit()
    q.user(USER)
    q.pass_(PASSWORD)                                          # free again
    q.quit()


def raw(server) -> tuple[ssl.SSLSocket, "socket.SocketIO"]:
    s = socket.create_connection((HOST, server.pop3s), timeout=10)
    t = tls().wrap_socket(s)
    f = t.makefile("rb")
    assert f.readline().startswith(b"+OK")
    return t, f


def test_auth_plain_pipelining_and_bad_input(server):
    server.deliver(msg("raw"))
    t, f = raw(server)
    cred = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
    # Not base64 (bad length, a character outside the alphabet, padding
    # in the middle): -ERR and the session goes on.
    for bad in (b"abc", b"ab!d", b"ab=dabcd"):
        t.sendall(b"AUTH PLAIN " + bad + b"\r\n")
        assert f.readline().startswith(b"-ERR [AUTH] cannot decode")
    t.sendall(b"BOGUS\r\nAUTH PLAIN\r\n" + cred + b"\r\nSTAT\r\nLIST 9\r\nRETR x\r\nNOOP\r\n")
    assert f.readline().startswith(b"-ERR")                # unknown command: the session goes on
    assert f.readline().startswith(b"+ ")
    assert f.readline().startswith(b"+OK")                  # logged in
    assert f.readline().startswith(b"+OK 1 ")
    assert f.readline().startswith(b"-ERR")                 # no such message
    assert f.readline().startswith(b"-ERR")                 # syntax
    assert f.readline().startswith(b"+OK")
    t.sendall(b"QUIT\r\n")
    assert f.readline().startswith(b"+OK")
    t.close()


def test_delivery_during_a_session_shows_in_the_next(server):
    server.deliver(msg("first"))
    p = server.login()
    assert p.stat()[0] == 1
    server.deliver(msg("second"))                           # arrives while the session is open
    assert p.stat()[0] == 1                                  # the session's view is fixed (RFC 1939)
    p.dele(1)
    p.quit()
    p = server.login()
    assert p.stat()[0] == 1 and b"Subject: second" in p.retr(1)[1]
    p.quit()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_and_fetches(server):
    server.deliver(msg("curl one"), msg("curl two"))
    base = ["curl", "-s", "-k", "--user", f"{USER}:{PASSWORD}"]
    # curl is not ours: it runs without the sanitizer runtime a test-asan run preloads.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    out = subprocess.run(base + [f"pop3s://{HOST}:{server.pop3s}/"], capture_output=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.decode().split("\r\n")) >= 2 and out.stdout.startswith(b"1 ")
    out = subprocess.run(base + ["--ssl-reqd", f"pop3://{HOST}:{server.pop3}/2"],
                         capture_output=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert b"Subject: curl two" in out.stdout


def test_limits_auth_failures_errors_and_long_lines(server):
    t, f = raw(server)
    # Three wrong passwords: -ERR [AUTH] each, then the connection closes.
    for _ in range(3):
        t.sendall(b"USER " + USER.encode() + b"\r\nPASS wrong\r\n")
        assert f.readline().startswith(b"+OK")
        assert f.readline().startswith(b"-ERR [AUTH]")
    assert f.readline() == b""
    t.close()
    t, f = raw(server)
    # A command over 255 octets (RFC 2449 §4) gets -ERR and the session goes on.
    t.sendall(b"NOOP " + b"x" * 300 + b"\r\nCAPA\r\n")
    assert f.readline().startswith(b"-ERR line too long")
    assert f.readline().startswith(b"+OK")
    while f.readline() != b".\r\n":
        pass
    # Twenty errors close the session: the long line was the first, so the
    # nineteenth BOGUS is the last one answered.
    t.sendall(b"BOGUS\r\n" * 20)
    lines = [f.readline() for _ in range(21)]
    assert all(x.startswith(b"-ERR") for x in lines[:20]) and b"too many errors" in lines[19]
    assert lines[20] == b""
    t.close()
    t, f = raw(server)
    # A line that never ends: past the bound the connection is dropped.
    t.sendall(b"X" * 4000)
    assert f.readline().startswith(b"-ERR line too long")
    assert f.readline() == b""
    t.close()


def test_auth_hook_serves_pop3_too(tmp_path, ports):
    """The auth hook of SMTP AUTH decides POP3 logins too: True logs in
    (even a user the table does not know), False refuses, None leaves it
    to the user table; it sees the POP3 listener and the mechanism."""
    calls = []

    def auth(session, mechanism, username, password):
        calls.append((session.listener, mechanism, username, session.tls))
        if username == "hooked@example.test":
            return password == "magic"
        return None

    pop3 = free_port()
    cfg = make_config(tmp_path / "data", ports, delivery_enabled=True, dns="127.0.0.1:9",
                      allow_plain_auth=True)
    cfg.listeners.append(Listener("pop3", HOST, pop3, name="pop"))
    eng = Engine(cfg, events=False)
    eng.set_hook("auth", auth)
    eng.start()
    try:
        p = poplib.POP3(HOST, pop3, timeout=10)
        p.user("hooked@example.test")
        assert p.pass_("magic").startswith(b"+OK")
        assert p.stat() == (0, 0)
        p.quit()
        p = poplib.POP3(HOST, pop3, timeout=10)
        p.user("hooked@example.test")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_("wrong")
        # None: the user table decides (AUTH PLAIN here).
        cred = base64.b64encode(b"\0alice@example.test\0secret").decode()
        assert p._shortcmd(f"AUTH PLAIN {cred}").startswith(b"+OK")
        p.quit()
        assert calls == [("pop", "USER", "hooked@example.test", False),
                         ("pop", "USER", "hooked@example.test", False),
                         ("pop", "PLAIN", "alice@example.test", False)]
    finally:
        eng.stop()


def test_idle_autologout_removes_nothing(tmp_path, ports):
    """RFC 1939 §3: an idle session is logged out without the UPDATE state,
    so what it marked with DELE stays."""
    srv = Server(tmp_path, ports, limits=Limits(auth_fail_delay=0.0, pop3_idle_timeout=1.0))
    try:
        srv.deliver(msg("kept"))
        p = srv.login()
        p.dele(1)
        t0 = time.monotonic()
        line = p.file.readline()                              # nothing sent: wait for the server
        assert line.startswith(b"-ERR autologout"), line
        assert p.file.readline() == b""                       # and the connection is closed
        assert time.monotonic() - t0 >= 0.8
        p.close()
        q = srv.login()
        assert q.stat()[0] == 1 and b"Subject: kept" in q.retr(1)[1]
        q.quit()
    finally:
        srv.engine.stop()


def test_commands_pipelined_after_stls_are_discarded(server):
    """RFC 2595 §4: whatever came with STLS in the same packet is thrown
    away, never answered inside TLS."""
    s = socket.create_connection((HOST, server.pop3), timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"+OK")
    s.sendall(b"STLS\r\nUSER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert f.readline().startswith(b"+OK")
    t = tls().wrap_socket(s)
    g = t.makefile("rb")
    t.sendall(b"STAT\r\n")
    assert g.readline().startswith(b"-ERR")                   # not logged in: USER/PASS were dropped
    t.sendall(b"NOOP\r\nQUIT\r\n")
    assert g.readline().startswith(b"-ERR")                   # NOOP is for the TRANSACTION state
    assert g.readline().startswith(b"+OK")
    t.close()


@pytest.mark.parametrize("limit,why", [
    (dict(max_connections=2), b"-ERR [SYS/TEMP] too busy"),
    (dict(max_connections_per_ip=2), b"-ERR [SYS/TEMP] too many connections from your address"),
])
def test_connection_limits_count_pop3_sessions(tmp_path, ports, limit, why):
    srv = Server(tmp_path, ports, trusted_networks=[], limits=Limits(auth_fail_delay=0.0, **limit))
    try:
        def connect() -> tuple[socket.socket, bytes]:
            s = socket.create_connection((HOST, srv.pop3), timeout=10)
            return s, s.makefile("rb").readline()
        held = [connect() for _ in range(2)]
        assert all(greeting.startswith(b"+OK") for _, greeting in held)
        extra, refused = connect()
        assert refused.startswith(why), refused
        assert extra.recv(100) == b""                         # and closed
        extra.close()
        held.pop()[0].close()                                 # a place frees up
        deadline = time.monotonic() + 10
        while True:
            s, greeting = connect()
            s.close()
            if greeting.startswith(b"+OK") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert greeting.startswith(b"+OK"), greeting
        held[0][0].close()
    finally:
        srv.engine.stop()
