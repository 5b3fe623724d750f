"""Durability: kill -9 the server under load; every acknowledged message survives.

Each round starts `mailengine serve` on the same data directory, drives it
with a few threads of smtplib (every message with its own Message-ID, the
ones answered 250 recorded) plus Postfix's smtp-source for extra load, and
SIGKILLs the server about a second in. After the restart `queue list --json`
must hold every Message-ID that got its 250 in any round so far; messages in
flight at the kill may or may not be there, but never twice.
"""
from __future__ import annotations

import json
import os
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import ASAN, run_cli
from mailengine import Queue

pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"
THREADS = 4
ROUNDS = 3
LOAD_SECONDS = 1.0
MAX_PER_THREAD = 400           # bounds each sender whatever the speed
PACE = 0.008                   # seconds between a sender's messages: keeps the queue (and
                               # `queue list`, which is quadratic in it) small
SMTP_SOURCE = "/usr/sbin/smtp-source"


def body_for(mid: str, n: int) -> bytes:
    filler = ("%s line %d " % (mid, n) + "x" * 60 + "\r\n") * (1 + n % 7)
    return (f"From: load@sender.test\r\nTo: alice@example.test\r\nSubject: {mid}\r\n"
            f"Message-ID: <{mid}>\r\n\r\n{filler}end of {mid}\r\n").encode()


class Load:
    """THREADS senders against one port until told to stop or the server dies."""

    def __init__(self, port: int, tag: str) -> None:
        self.port = port
        self.tag = tag
        self.acked: dict[str, bytes] = {}      # Message-ID -> message bytes sent
        self.errors_before_kill: list[BaseException] = []
        self.killed = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(THREADS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a sender did not stop"

    def _run(self, i: int) -> None:
        n = 0
        deadline = time.monotonic() + 20
        s = None
        try:
            while not self.stop.is_set() and n < MAX_PER_THREAD and time.monotonic() < deadline:
                if s is None or n % 25 == 0:      # some connection churn too
                    if s is not None:
                        s.close()
                    s = smtplib.SMTP(HOST, self.port, timeout=10)
                    s.ehlo(f"load{i}.test")
                mid = f"{self.tag}-t{i}-{n}@crash.test"
                msg = body_for(mid, n)
                n += 1
                if s.mail("load@sender.test")[0] != 250 or s.rcpt("alice@example.test")[0] != 250:
                    raise AssertionError("MAIL/RCPT refused")
                code, reply = s.data(msg)
                if code == 250:
                    with self.lock:
                        self.acked[mid] = msg
                elif not self.killed.is_set():
                    raise AssertionError(f"DATA answered {code} {reply!r}")
                self.stop.wait(PACE)
        except (OSError, smtplib.SMTPException, AssertionError) as e:
            if not self.killed.is_set():
                with self.lock:
                    self.errors_before_kill.append(e)
        finally:
            if s is not None:
                s.close()


def start_smtp_source(port: int) -> subprocess.Popen[bytes] | None:
    if not os.access(SMTP_SOURCE, os.X_OK):
        return None
    # 2 sessions, 400 messages in all at most, 1 KiB; ends by itself when the server dies.
    return subprocess.Popen([SMTP_SOURCE, "-s", "2", "-m", "400", "-l", "1024",
                             "-f", "source@sender.test", "-t", "alice@example.test",
                             f"{HOST}:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def queue_json(data: Path) -> list[dict]:
    res = run_cli("queue", "list", "--data", str(data), "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def listed_message_ids(data: Path) -> list[str | None]:
    return [m["message_id"] for m in queue_json(data)]


def test_kill_9_under_load_loses_no_acknowledged_message(cli_server, tmp_path):
    data = tmp_path / "crash-data"
    all_acked: dict[str, bytes] = {}
    per_round = []
    srv = cli_server("--domain", "example.test", "--user", "alice@example.test:pw", data=data)
    for rnd in range(ROUNDS):
        load = Load(srv.ports.mx, f"r{rnd}")
        source = None
        t0 = time.monotonic()
        load.start()
        try:
            # Let the load run, smtp-source joining in, then kill the server in the middle.
            slow = 3 if ASAN else 1
            time.sleep(0.6 * LOAD_SECONDS * slow)
            source = start_smtp_source(srv.ports.mx)
            time.sleep(0.4 * LOAD_SECONDS * slow)
            assert not load.errors_before_kill, load.errors_before_kill
            load.killed.set()
            srv.proc.kill()
            assert srv.proc.wait(10) == -9
        finally:
            load.stop.set()
            load.join()
            if source is not None:
                if source.poll() is None:
                    source.kill()
                source.wait(10)
        assert not load.errors_before_kill, load.errors_before_kill
        assert len(load.acked) > 0, "no message was acknowledged before the kill"
        per_round.append(len(load.acked))
        all_acked.update(load.acked)
        # Restart on the same data directory (at least a second after this run started).
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        srv = cli_server("--domain", "example.test", "--user", "alice@example.test:pw",
                         data=data)
        listed = listed_message_ids(data)
        present = {f"<{mid}>" for mid in all_acked}
        missing = present - set(listed)
        assert not missing, f"round {rnd}: {len(missing)} acknowledged message(s) lost, e.g. " \
                            f"{sorted(missing)[:5]}"
        ours = [m for m in listed if m is not None]
        dupes = {m for m in ours if ours.count(m) > 1} if len(ours) != len(set(ours)) else set()
        assert not dupes, f"round {rnd}: listed twice: {sorted(dupes)[:5]}"
    # The server that came up last takes mail as usual and stops cleanly.
    with smtplib.SMTP(HOST, srv.ports.mx, timeout=10) as s:
        s.ehlo("after.test")
        assert s.sendmail("x@sender.test", ["alice@example.test"],
                          body_for("after-crash@crash.test", 1)) == {}
    assert srv.stop() == 0
    # Acknowledged messages are intact, byte for byte: a sample, since each
    # `queue show` is a scan of the whole spool.
    by_mid = {m["message_id"]: m["id"] for m in queue_json(data)}
    assert "<after-crash@crash.test>" in by_mid
    sample = sorted(all_acked)[:: max(1, len(all_acked) // 12)]
    q = Queue(str(data))
    for mid in sample:
        entry, raw = q.show(by_mid[f"<{mid}>"])
        assert raw.endswith(all_acked[mid]), mid
        assert entry.envelope.rcpt_tos == ("alice@example.test",)
    print(f"acknowledged per round: {per_round}; queued in the end: {len(by_mid)}")
