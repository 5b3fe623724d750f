#!/usr/bin/env python3
"""SMTP receive throughput: smtp-source against mailengine and its peers.

Targets (each started fresh, per mode, on its own free 127.0.0.1 port, with
its data in a fresh directory on the repository's disk):

  sink        Postfix smtp-sink: stores nothing, the protocol ceiling
  postfix     private Postfix 3.x instance: smtpd -> cleanup -> fsync'd
              queue file (mail is put on HOLD so it stays queued)
  aiosmtpd    benchmarks/peer_aiosmtpd.py: file + fsync + dir fsync per message
  mailengine  .venv/bin/mailengine serve (skipped if not built)

Modes:
  1per   one message per SMTP session:
             smtp-source -s SESSIONS -m MESSAGES -l 5120
  10per  ten messages per session.  smtp-source has no "messages per
         session" flag (-r is recipients per message; -d keeps a session
         open until the global message count is used up), so the load is
         split into LANES concurrent lanes, each running rounds of
             smtp-source -d -s S -m 10*S
         (S = SESSIONS/LANES), i.e. on average 10 messages per session with
         SESSIONS sessions open in total.

msg/s = messages / wall time of the smtp-source run(s).  smtp-source exits
non-zero on any non-2xx reply, so a clean exit means every message got 250;
the stored count is also checked (Postfix: postqueue -j, aiosmtpd: files in
the maildir, mailengine: `mailengine queue list --json`).

Output (stdout): "receive.<mode>.<target>: N msg/s" and ratio lines
"receive.<mode>.mailengine_vs_best_peer: R" (mailengine / max(postfix,
aiosmtpd)) and "receive.<mode>.mailengine_vs_sink: R".  Diagnostics go to
stderr prefixed with "#".

Exit status: 0, or 2 on harness/peer errors (with --strict also 1 when
mailengine fails).
"""

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

PEERS = ("postfix", "aiosmtpd")
ORDER = ("sink", "postfix", "aiosmtpd", "mailengine")
MODES = {"1per": 1, "10per": 10}


class LoadError(Exception):
    pass


class Load:
    """Runs smtp-source processes (bounded in count and time) against a port."""

    def __init__(self, port, messages, sessions, per_session, size, lanes,
                 sender, rcpt, timeout):
        self.port = port
        self.messages = messages
        self.sessions = sessions
        self.per_session = per_session
        self.size = size
        self.lanes = lanes
        self.sender = sender
        self.rcpt = rcpt
        self.deadline = None
        self.timeout = timeout
        self.lock = threading.Lock()
        self.running = set()
        self.errors = []
        self.spawned = 0

    def _cmd(self, sessions, messages, keep_open):
        cmd = [bl.SMTP_SOURCE, "-s", str(sessions), "-m", str(messages),
               "-l", str(self.size), "-f", self.sender, "-t", self.rcpt,
               "-M", "client.bench.test"]
        if keep_open:
            cmd.append("-d")
        cmd.append(f"{bl.HOST}:{self.port}")
        return cmd

    def _run_one(self, cmd):
        if self.errors:
            raise LoadError("aborted")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise LoadError(f"time limit of {self.timeout:.0f}s exceeded")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        with self.lock:
            self.running.add(proc)
            self.spawned += 1
        try:
            out, err = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LoadError(f"time limit of {self.timeout:.0f}s exceeded")
        finally:
            with self.lock:
                self.running.discard(proc)
        if proc.returncode != 0:
            msg = (err or out).decode(errors="replace").strip().splitlines()
            raise LoadError(f"smtp-source exited {proc.returncode}: "
                            f"{msg[-1] if msg else ''} ({' '.join(cmd[1:])})")

    def _lane(self, lane_sessions, lane_messages):
        try:
            left = lane_messages
            while left > 0:
                m = min(left, lane_sessions * self.per_session)
                s = max(1, min(lane_sessions, math.ceil(m / self.per_session)))
                self._run_one(self._cmd(s, m, keep_open=True))
                left -= m
        except LoadError as e:
            with self.lock:
                self.errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - reported as a harness error
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")

    def kill_all(self):
        with self.lock:
            procs = list(self.running)
        for p in procs:
            try:
                p.kill()  # by pid, a process we started
            except ProcessLookupError:
                pass

    def run(self):
        """Returns wall seconds; raises LoadError."""
        self.deadline = time.monotonic() + self.timeout
        t0 = time.monotonic()
        if self.per_session == 1:
            self._run_one(self._cmd(self.sessions, self.messages, keep_open=False))
            return time.monotonic() - t0
        lanes = max(1, min(self.lanes, self.sessions))
        lane_sess = [self.sessions // lanes + (1 if i < self.sessions % lanes else 0)
                     for i in range(lanes)]
        lane_msgs = [self.messages * s // self.sessions for s in lane_sess]
        for i in range(self.messages - sum(lane_msgs)):
            lane_msgs[i % lanes] += 1
        threads = [threading.Thread(target=self._lane, args=(s, m), daemon=True)
                   for s, m in zip(lane_sess, lane_msgs) if m > 0]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=1)
                    if self.errors or time.monotonic() > self.deadline + 30:
                        self.kill_all()
        finally:
            self.kill_all()
        if self.errors:
            raise LoadError(self.errors[0])
        return time.monotonic() - t0


def run_one(target_name, mode, args):
    """Returns (rate or None, status) where status is 'ok', 'skip:...', 'fail:...'."""
    workdir = bl.make_workdir(f"{target_name}-{mode}")
    cls = bl.TARGETS[target_name]
    if target_name == "postfix":
        target = cls(workdir, smtpd_maxproc=max(200, args.sessions + 50))
    elif target_name == "sink":
        target = cls(workdir, max_conns=max(1000, args.sessions * 2))
    else:
        target = cls(workdir)
    status = "ok"
    rate = None
    try:
        try:
            target.start()
        except bl.TargetUnavailable as e:
            return None, f"skip:{e}"
        except Exception as e:  # noqa: BLE001
            return None, f"fail:start: {e}"
        bl.note(f"{target_name}/{mode}: listening on {bl.HOST}:{target.port}, data in {workdir}")
        load = Load(target.port, args.messages, args.sessions, MODES[mode], args.size,
                    args.lanes, args.sender, args.rcpt, args.timeout)
        try:
            elapsed = load.run()
        except LoadError as e:
            return None, f"fail:load: {e}\n{target.log_tail()}"
        rate = args.messages / elapsed
        bl.note(f"{target_name}/{mode}: {args.messages} msgs in {elapsed:.2f}s "
                f"({load.spawned} smtp-source runs)")
        if target_name == "sink":
            return rate, "ok"
        n = target.count()
        if n is None and target_name == "mailengine":
            target.stop()  # the queue may only be readable while stopped
            n = target.count()
        if n is None:
            bl.note(f"{target_name}/{mode}: stored count not available")
        elif n != args.messages:
            status = f"fail:verify: {n} messages stored, {args.messages} sent"
        else:
            bl.note(f"{target_name}/{mode}: verified {n} messages stored")
        if target_name == "postfix":
            problems = target.log_problems()
            if problems:
                bl.note(f"postfix maillog has {len(problems)} warning/error lines, e.g.: {problems[0]}")
        return rate, status
    finally:
        try:
            target.stop()
        finally:
            if args.keep:
                bl.note(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="SMTP receive throughput (smtp-source)",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=100, help="concurrent SMTP sessions")
    ap.add_argument("--size", type=int, default=5120, help="message payload bytes (smtp-source -l)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2000 messages")
    ap.add_argument("--only", default="", help="comma-separated targets: " + ",".join(ORDER))
    ap.add_argument("--modes", default="1per,10per", help="comma-separated: 1per,10per")
    ap.add_argument("--lanes", type=int, default=4,
                    help="parallel smtp-source lanes in 10per mode (default 4)")
    ap.add_argument("--sender", default="sender@bench.test")
    ap.add_argument("--rcpt", default="rcpt@relay.example")
    ap.add_argument("--timeout", type=float, default=900, help="time limit per run, seconds")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per target and mode (fresh server each); the median is reported")
    ap.add_argument("--keep", action="store_true", help="keep data directories")
    ap.add_argument("--strict", action="store_true", help="exit 1 when mailengine fails")
    args, unknown = ap.parse_known_args()
    if unknown:
        bl.note(f"ignoring unknown arguments: {' '.join(unknown)}")
    if args.quick and "--messages" not in sys.argv:
        args.messages = 2000
    if not (1 <= args.sessions <= 1000 and 1 <= args.messages <= 1_000_000
            and 1 <= args.repeat <= 20):
        ap.error("--sessions must be 1..1000, --messages 1..1000000, --repeat 1..20")
    targets = [t.strip() for t in args.only.split(",") if t.strip()] or list(ORDER)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for t in targets:
        if t not in bl.TARGETS:
            ap.error(f"unknown target {t!r}; choose from {', '.join(ORDER)}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if not os.path.exists(bl.SMTP_SOURCE):
        print("bench_receive: smtp-source not found (install postfix)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bl.raise_nofile()
    root = bl.bench_tmp_root()
    bl.note(f"receive: {args.messages} msgs x {args.size} B, {args.sessions} sessions, "
            f"modes {','.join(modes)}, data under {root} ({bl._fs_type(root)}), "
            f"{os.cpu_count()} cpus")

    harness_errors = 0
    mailengine_failed = False
    skipped = set()
    for mode in modes:
        rates = {}
        for name in ORDER:
            if name not in targets or name in skipped:
                continue
            runs = []
            for i in range(args.repeat):
                rate, status = run_one(name, mode, args)
                if status != "ok":
                    break
                runs.append(rate)
            if status == "ok" and args.repeat > 1:
                rate = statistics.median(runs)
                bl.note(f"{name}/{mode}: runs {', '.join(f'{r:.0f}' for r in runs)} msg/s; median {rate:.0f}")
            key = f"receive.{mode}.{name}"
            if status.startswith("skip:"):
                skipped.add(name)
                bl.out(f"# SKIP {name}: {status[5:]}")
                continue
            if status.startswith("fail:"):
                detail = status[5:]
                bl.out(f"{key}: FAILED")
                bl.note(f"{key} failed: {detail}")
                if name == "mailengine":
                    mailengine_failed = True
                else:
                    harness_errors += 1
                continue
            rates[name] = rate
            bl.out(f"{key}: {rate:.0f} msg/s")
        me = rates.get("mailengine")
        peers = [rates[p] for p in PEERS if p in rates]
        if me is not None and peers:
            bl.out(f"receive.{mode}.mailengine_vs_best_peer: {me / max(peers):.2f}")
        if me is not None and "sink" in rates:
            bl.out(f"receive.{mode}.mailengine_vs_sink: {me / rates['sink']:.2f}")
        if "sink" in rates:
            for p in PEERS:
                if p in rates:
                    bl.note(f"{p}/{mode} reaches {rates[p] / rates['sink']:.2f} of the sink ceiling")
    if harness_errors:
        return 2
    if mailengine_failed and args.strict:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
