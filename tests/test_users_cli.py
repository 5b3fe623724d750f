"""`mailengine user add|del|list|passwd`: one user table (DATA/users) that
SMTP AUTH and POP3 both use."""
from __future__ import annotations

import poplib
import smtplib
import subprocess
import sys

import pytest

from conftest import free_port, make_config, run_cli
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


def test_users_file_quota_fields_and_plain_hashes_with_spaces(tmp_path):
    """The users file keeps a {PLAIN} hash with spaces and quota words after
    the hash; a negative count is refused before it can reach the file."""
    from mailengine import ConfigError
    from mailengine import users

    data = tmp_path / "d"
    data.mkdir()
    (data / "users").write_text("a@x.test:{PLAIN}two words quota=1024 quota_messages=5\n"
                                "b@x.test:{PLAIN}pw\n")
    got = {u.address: u for u in users.load(str(data))}
    assert got["a@x.test"].password_hash == "{PLAIN}two words"
    assert (got["a@x.test"].quota, got["a@x.test"].quota_messages) == (1024, 5)
    assert got["b@x.test"].password_hash == "{PLAIN}pw" and got["b@x.test"].quota == 0
    r = run_cli("user", "quota", "--data", str(data), "b@x.test", "1M", "--messages", "-5")
    assert r.returncode == 2 and "negative" in r.stderr
    assert users.load(str(data))[1].quota_messages == 0
    (data / "users").write_text("c@x.test\n")
    with pytest.raises(ConfigError, match="expected address:hash"):
        users.load(str(data))
    (data / "users").write_text("c@x.test:{PLAIN}pw quota_messages=-3\n")
    with pytest.raises(ConfigError):
        users.load(str(data))
