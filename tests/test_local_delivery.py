"""Local delivery into the Maildir store: SMTP in for a local user, the
queue writes the message into ROOT/domain/user/new (tmp -> new, synced),
Return-Path and Delivered-To on top, plus-addressing, and the store is a
Maildir other tools read (Python's mailbox module here)."""
from __future__ import annotations

import json
import mailbox
import smtplib
import time
from pathlib import Path

import pytest

from conftest import make_config
from delivery_helpers import wait_until
from mailengine import Engine

HOST = "127.0.0.1"


def wait_files(d: Path, n: int, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(d.glob("*")) if d.exists() else []
        if len(files) >= n:
            return files
        time.sleep(0.02)
    raise AssertionError(f"{d}: {len(files)} of {n} messages")


@pytest.fixture
def engine(tmp_path, ports):
    eng = Engine(make_config(tmp_path / "data", ports, delivery_enabled=True,
                             dns="127.0.0.1:9"))   # nothing here needs DNS
    eng.watch_deliveries()
    events = []
    eng.on_delivery(events.append)
    eng.start()
    eng.events = events
    yield eng
    eng.stop()


def test_smtp_in_lands_in_the_users_maildir(engine, ports, tmp_path):
    body = b"Subject: hello\r\nFrom: x@sender.test\r\n\r\n.dot line stays\r\nbye\r\n"
    with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
        s.sendmail("x@sender.test", ["alice@example.test", "Alice+news@EXAMPLE.test"], body)
    new = tmp_path / "data" / "mailboxes" / "example.test" / "alice" / "new"
    files = wait_files(new, 2)
    assert len(files) == 2                     # one copy per recipient address
    for f in files:
        assert ",S=" in f.name and f.stat().st_size == int(f.name.rsplit(",S=", 1)[1])
        data = f.read_bytes()
        assert data.startswith(b"Return-Path: <x@sender.test>\r\nDelivered-To: ")
        assert b"\r\n.dot line stays\r\n" in data and data.endswith(b"bye\r\n")
    assert not list((new.parent / "tmp").iterdir())      # nothing half-written left
    # Another reader sees a normal Maildir.
    md = mailbox.Maildir(str(new.parent), create=False)
    subjects = sorted(m["Subject"] for m in md)
    assert subjects == ["hello", "hello"]
    # The events follow the fsync of new/, a moment after the files show.
    delivered = wait_until(lambda: len([e for e in engine.events if e.type == "delivered"]) >= 2
                           and [e for e in engine.events if e.type == "delivered"], 10, "two events")
    assert sorted(e.recipient for e in delivered) == ["Alice+news@EXAMPLE.test", "alice@example.test"]
    assert all(e.mx == "local" and e.code == 250 for e in delivered)
    # Final: the queue is empty, and the events file says so too.
    deadline = time.monotonic() + 5
    while engine.queue.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.queue.list() == []
    lines = (tmp_path / "data" / "events.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["type"] == "delivered" for x in lines) == 2


def test_send_to_local_and_remote_in_one_message(engine, tmp_path):
    """The local recipient is delivered at once; the remote one (no DNS
    here) waits in the queue without holding the local copy back."""
    qid = engine.send(b"Subject: mixed\r\n\r\nx\r\n", sender="alice@example.test",
                      recipients=["alice@example.test", "bob@remote.test"])
    new = tmp_path / "data" / "mailboxes" / "example.test" / "alice" / "new"
    wait_files(new, 1)
    wait_until(lambda: any(e.type == "deferred" and e.recipient == "bob@remote.test"
                           for e in engine.events), 10, "the remote recipient deferred")
    ids = [m.id for m in engine.queue.list()]
    assert qid in ids


def test_local_delivery_off_keeps_mail_queued(tmp_path, ports):
    eng = Engine(make_config(tmp_path / "data", ports, delivery_enabled=True, dns="127.0.0.1:9",
                             local_delivery=False))
    eng.start()
    try:
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            s.sendmail("x@sender.test", ["alice@example.test"], b"Subject: q\r\n\r\nx\r\n")
        time.sleep(0.3)
        assert len(eng.queue.list()) == 1
        assert not (tmp_path / "data" / "mailboxes").exists()
    finally:
        eng.stop()


def test_deliver_command_is_a_local_delivery_agent(tmp_path):
    """`mailengine deliver ADDRESS < message`: what another MTA runs as its
    mailbox command (exit 0, 64 for a bad address)."""
    import subprocess
    import sys

    data = tmp_path / "data"
    msg = b"Subject: lda\nFrom: x@y.test\n\nline one\n.line two\n"
    run = subprocess.run([sys.executable, "-m", "mailengine", "deliver", "--data", str(data),
                          "--from", "x@y.test", "Bob+lists@Example.test"],
                         input=msg, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    new = data / "mailboxes" / "example.test" / "bob" / "new"
    files = list(new.iterdir())
    assert len(files) == 1
    got = files[0].read_bytes()
    assert got.startswith(b"Return-Path: <x@y.test>\r\nDelivered-To: Bob+lists@Example.test\r\n")
    assert b"\r\nline one\r\n.line two\r\n" in got          # CRLF, no dot-stuffing on disk
    md = mailbox.Maildir(str(new.parent), create=False)
    assert [m["Subject"] for m in md] == ["lda"]
    bad = subprocess.run([sys.executable, "-m", "mailengine", "deliver", "--data", str(data),
                          "../etc@example.test"], input=msg, capture_output=True, timeout=30)
    assert bad.returncode == 64 and b"cannot name a mailbox" in bad.stderr
