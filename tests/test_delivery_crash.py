"""Crash safety of delivery: an engine killed with SIGKILL in the middle of
delivering loses nothing, and delivers a message twice only when its
outcome had not reached the state log yet."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from sinks import Sink
from mailengine.testing.dns import LocalDNS, unbound_path

pytestmark = pytest.mark.skipif(unbound_path() is None, reason="unbound is not installed")

N = 400
CONNS = 4

ENGINE = r"""
import sys, time
sys.path.insert(0, sys.argv[5])
from mailengine import Config, Engine, Policy
data, dns, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = Config(data_dir=data, listeners=[], dns=dns, remote_port=port, workers=1,
             hostname="crash.test", retry_min=0.2, retry_max=0.5,
             default_policy=Policy(max_connections=%d))
eng = Engine(cfg, events=False)
eng.start()
if n:
    eng.send_many((b"Subject: m%%d\r\nMessage-ID: <m%%d@crash.test>\r\n\r\nbody\r\n" %% (i, i),
                   "s@src.test", ["r@dest.test"]) for i in range(n))
print("ready", flush=True)
while True:
    time.sleep(1)
""" % CONNS


def start_engine(tmp_path: Path, data: Path, dns: LocalDNS, port: int, n: int) -> subprocess.Popen:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    proc = subprocess.Popen([sys.executable, str(script), str(data), dns.address, str(port), str(n),
                             str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line, line + proc.stdout.read()
    return proc


def message_ids(sink: Sink) -> list[str]:
    out = []
    for m in sink.messages:
        found = re.search(rb"Message-ID: <(m\d+)@crash.test>", m.data)
        assert found, m.data[:200]
        out.append(found.group(1).decode())
    return out


def test_sigkill_during_delivery_loses_nothing(tmp_path):
    with Sink("127.0.0.2", 0, delay=0.005) as sink, \
            LocalDNS(tmp_path / "dns", ["dest.test. 300 IN MX 10 mx.dest.test.",
                                        "mx.dest.test. 300 IN A 127.0.0.2"]) as dns:
        data = tmp_path / "data"
        proc = start_engine(tmp_path, data, dns, sink.port, N)
        try:
            deadline = time.monotonic() + 30
            while len(sink.messages) < N // 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            before = len(sink.messages)
            assert 0 < before < N, "the kill must land in the middle of the delivery"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        at_kill = len(sink.messages)
        proc = start_engine(tmp_path, data, dns, sink.port, 0)
        try:
            deadline = time.monotonic() + 60
            while len(set(message_ids(sink))) < N and time.monotonic() < deadline:
                time.sleep(0.05)
            ids = message_ids(sink)
            assert set(ids) == {f"m{i}" for i in range(N)}, f"{N - len(set(ids))} message(s) lost"
            dups = len(ids) - len(set(ids))
            # Only messages whose outcome was still on its way to the log
            # when the process died (one turn's worth per connection).
            assert dups <= CONNS * 4, dups
            # The events follow the sink's 250s: wait for them (a torn last
            # line is one still being written).
            deadline = time.monotonic() + 20
            while True:
                lines = (data / "events.jsonl").read_text().split("\n")[:-1]
                events = [json.loads(x) for x in lines]
                delivered = {e["queue_id"] for e in events if e["type"] == "delivered"}
                if len(delivered) >= N or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert len(delivered) == N
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert at_kill >= before
        # Everything final: the restarted queue removed the old segments.
        for wdir in (data / "spool").glob("w*"):
            left = [p.name for p in wdir.glob("*.dat")]
            assert len(left) <= 1, (wdir.name, left)   # the last run's open segment at most
