"""`mailengine user add|del|list|passwd`: one user table (DATA/users) that
SMTP AUTH and POP3 both use."""
from __future__ import annotations

import poplib
import smtplib
import subprocess
import sys

import pytest

from conftest import free_port, make_config
from smtpclient import client_tls
from mailengine import Engine, Listener

HOST = "127.0.0.1"


def user_cmd(data, *args, password=None):
    return subprocess.run([sys.executable, "-m", "mailengine", "user", *args, "--data", str(data)],
                          input=(password + "\n") if password is not None else "",
                          capture_output=True, text=True, timeout=30)


def test_user_commands_feed_smtp_auth_and_pop3(tmp_path, ports):
    data = tmp_path / "data"
    assert user_cmd(data, "add", "Carol@Example.test", password="pw-one").returncode == 0
    again = user_cmd(data, "add", "carol@example.test", password="x")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert user_cmd(data, "list").stdout.split() == ["carol@example.test"]
    assert (data / "users").stat().st_mode & 0o777 == 0o600
    assert "pw-one" not in (data / "users").read_text()

    def login_ok(pw: str) -> bool:
        pop3 = free_port()
        cfg = make_config(data, ports)
        cfg.listeners.append(Listener("pop3", HOST, pop3))
        eng = Engine(cfg, events=False).start()
        try:
            with smtplib.SMTP(HOST, ports.submission, timeout=10) as s:
                s.starttls(context=client_tls())
                try:
                    s.login("carol@example.test", pw)
                    smtp_ok = True
                except smtplib.SMTPAuthenticationError:
                    smtp_ok = False
            p = poplib.POP3(HOST, pop3, timeout=10)
            p.stls(client_tls())
            p.user("carol@example.test")
            try:
                p.pass_(pw)
                pop_ok = True
            except poplib.error_proto:
                pop_ok = False
            p.quit()
            assert smtp_ok == pop_ok
            return smtp_ok
        finally:
            eng.stop()

    assert login_ok("pw-one")
    assert user_cmd(data, "passwd", "carol@example.test", password="pw-two").returncode == 0
    assert not login_ok("pw-one") and login_ok("pw-two")
    assert user_cmd(data, "del", "carol@example.test").returncode == 0
    assert user_cmd(data, "del", "carol@example.test").returncode == 1
    assert not login_ok("pw-two")
    assert user_cmd(data, "passwd", "nobody@example.test", password="x").returncode == 1
