"""Aliases of the local domains through real SMTP sessions and send():
one-to-many, catch-all, domain aliases, loops, an alias refused by the
rcpt_to hook, and the configuration's checks."""
from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from conftest import make_config
from delivery_helpers import wait_until
from mailengine import Config, ConfigError, Engine, Reject

HOST = "127.0.0.1"


def mailbox(tmp_path: Path, user: str, domain: str = "example.test") -> Path:
    return tmp_path / "data" / "mailboxes" / domain / user / "new"


def wait_count(d: Path, n: int, timeout: float = 10.0) -> list[Path]:
    return wait_until(lambda: len(list(d.glob("*"))) >= n and sorted(d.glob("*")), timeout,
                      f"{n} messages in {d}")


def start(tmp_path: Path, ports, aliases, hooks=None, **kw) -> Engine:
    cfg = make_config(tmp_path / "data", ports, delivery_enabled=True, dns="127.0.0.1:9",
                      aliases=aliases, **kw)
    cfg.add_user("bob@example.test", "pw", rounds=1000)
    eng = Engine(cfg)
    for name, fn in (hooks or {}).items():
        eng.set_hook(name, fn)
    eng.start()
    return eng


def test_one_to_many_with_a_remote_target(tmp_path, ports):
    eng = start(tmp_path, ports, {"sales@example.test": ["alice@example.test", "Bob@example.test",
                                                         "carol@remote.test"]})
    try:
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            refused = s.sendmail("x@sender.test", ["sales@example.test"], b"Subject: one\r\n\r\nbody\r\n")
        assert refused == {}
        a = wait_count(mailbox(tmp_path, "alice"), 1)
        b = wait_count(mailbox(tmp_path, "bob"), 1)
        assert b"Delivered-To: alice@example.test\r\n" in a[0].read_bytes()
        assert b"Delivered-To: bob@example.test\r\n" in b[0].read_bytes()
        # The record holds the expanded recipients, each with ORCPT naming
        # the address the client gave (for reports); the remote one waits
        # in the queue (no DNS here).
        [m] = eng.queue.list()
        env = m.envelope
        assert env.rcpt_tos == ("alice@example.test", "bob@example.test", "carol@remote.test")
        assert [p.get("ORCPT") for p in env.rcpt_params] == ["rfc822;sales@example.test"] * 3
    finally:
        eng.stop()


def test_catch_all_users_first_and_domain_alias(tmp_path, ports):
    eng = start(tmp_path, ports, {"@example.test": "alice@example.test",
                                  "@old.test": "@example.test",
                                  "everyone@example.test": [f"u{i}@remote.test" for i in range(65)]},
                domains=["example.test", "old.test"])
    try:
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            s.sendmail("x@sender.test", ["nobody@example.test"], b"Subject: catch\r\n\r\nx\r\n")
            s.sendmail("x@sender.test", ["bob@example.test"], b"Subject: bob\r\n\r\nx\r\n")
            s.sendmail("x@sender.test", ["bob@old.test"], b"Subject: old-bob\r\n\r\nx\r\n")
            s.sendmail("x@sender.test", ["ghost@old.test"], b"Subject: old-ghost\r\n\r\nx\r\n")
        alice = wait_count(mailbox(tmp_path, "alice"), 2)
        bob = wait_count(mailbox(tmp_path, "bob"), 2)
        time.sleep(0.3)
        subjects = lambda files: sorted(f.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0]  # noqa: E731
                                        for f in files)
        # The catch-all takes what is neither user nor alias; a user keeps
        # its own mail; old.test maps onto example.test (then its catch-all).
        assert subjects(sorted(mailbox(tmp_path, "alice").glob("*"))) == [b"catch", b"old-ghost"]
        assert subjects(sorted(mailbox(tmp_path, "bob").glob("*"))) == [b"bob", b"old-bob"]
        assert len(alice) == 2 and len(bob) == 2
        assert not (tmp_path / "data" / "mailboxes" / "old.test").exists()
        assert not (tmp_path / "data" / "mailboxes" / "example.test" / "nobody").exists()
    finally:
        eng.stop()


def test_unknown_user_loop_and_self_copy(tmp_path, ports):
    eng = start(tmp_path, ports, {"a@example.test": "b@example.test",
                                  "b@example.test": ["a@example.test"],
                                  "alice@example.test": ["alice@example.test", "bob@example.test"],
                                  "typo@example.test": "nosuchuser@example.test",
                                  "@old.test": "@example.test",
                                  "everyone@example.test": [f"u{i}@remote.test" for i in range(65)]},
                domains=["example.test", "old.test"])
    try:
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            s.ehlo()
            s.mail("x@sender.test")
            code, text = s.rcpt("a@example.test")
            assert code == 550 and b"5.4.6" in text
            code, text = s.rcpt("stranger@example.test")
            assert code == 550 and b"5.1.1" in text
            # What an alias leads to must be a user too (no catch-all here):
            # a mistyped target, a domain alias onto nobody.
            for unknown in ("typo@example.test", "ghost@old.test"):
                code, text = s.rcpt(unknown)
                assert code == 550 and b"5.1.1" in text, unknown
            code, _ = s.rcpt("alice@example.test")
            assert code == 250
            code, _ = s.data(b"Subject: team\r\n\r\nx\r\n")
            assert code == 250
        wait_count(mailbox(tmp_path, "alice"), 1)         # the alias keeps a copy
        wait_count(mailbox(tmp_path, "bob"), 1)
        assert not mailbox(tmp_path, "nosuchuser").exists()
        assert not mailbox(tmp_path, "ghost").exists()
        # More than 64 final addresses (ALIAS_MAX_TARGETS): refused too.
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s2:
            s2.ehlo()
            s2.mail("x@sender.test")
            code, text = s2.rcpt("everyone@example.test")
            assert code == 550 and b"5.4.6" in text and b"too many" in text
        # send() refuses an alias that loops, naming it.
        from mailengine import SendError
        with pytest.raises(SendError, match="a@example.test loops"):
            eng.send(b"Subject: x\r\n\r\nx\r\n", sender="x@sender.test", recipients=["a@example.test"])
    finally:
        eng.stop()


def test_rcpt_hook_refusing_an_alias_takes_back_every_target(tmp_path, ports):
    def rcpt_to(session, address, params):
        return Reject(550, "5.7.1 not this one") if address.startswith("sales@") else None

    eng = start(tmp_path, ports, {"sales@example.test": ["alice@example.test", "bob@example.test"]},
                hooks={"rcpt_to": rcpt_to})
    try:
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            refused = s.sendmail("x@sender.test", ["sales@example.test", "alice@example.test"],
                                 b"Subject: hook\r\n\r\nx\r\n")
        assert list(refused) == ["sales@example.test"]
        wait_count(mailbox(tmp_path, "alice"), 1)
        time.sleep(0.5)
        assert len(list(mailbox(tmp_path, "alice").glob("*"))) == 1
        assert not mailbox(tmp_path, "bob").exists()
    finally:
        eng.stop()


def test_send_applies_aliases(tmp_path, ports):
    eng = start(tmp_path, ports, {"list@example.test": ["alice@example.test", "bob@example.test"]})
    try:
        eng.send(b"Subject: api\r\n\r\nx\r\n", sender="x@sender.test", recipients=["list@example.test"])
        wait_count(mailbox(tmp_path, "alice"), 1)
        wait_count(mailbox(tmp_path, "bob"), 1)
        assert not mailbox(tmp_path, "list").exists()
    finally:
        eng.stop()


def test_alias_configuration_checks(tmp_path, ports):
    cfg = make_config(tmp_path / "d", ports, aliases={"x@other.test": "alice@example.test"})
    with pytest.raises(ConfigError, match="aliases.x@other.test"):
        cfg.validate()
    cfg.aliases = {"x@example.test": "@example.test"}
    with pytest.raises(ConfigError, match="only a @domain key"):
        cfg.validate()
    cfg.aliases = {"x@example.test": []}
    with pytest.raises(ConfigError, match="at least one"):
        cfg.validate()
    toml = tmp_path / "c.toml"
    toml.write_text('domains = ["example.test"]\n[aliases]\n"sales@example.test" = ["a@example.test", "b@x.test"]\n'
                    '"@example.test" = "a@example.test"\n')
    c = Config.from_toml(toml)
    c.validate()
    assert c._alias_pairs() == [("sales@example.test", "a@example.test"), ("sales@example.test", "b@x.test"),
                                ("@example.test", "a@example.test")]
