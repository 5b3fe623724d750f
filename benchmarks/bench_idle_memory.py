#!/usr/bin/env python3
"""Memory cost of idle SMTP connections.

Opens N idle connections (default 5000) to a freshly started server on
127.0.0.1, reads each greeting, and compares the server's resident memory
(VmRSS from /proc/PID/status, summed over the server's processes) before and
after:  bytes/conn = (RSS_after - RSS_before) / N.

  mailengine  .venv/bin/mailengine serve (all its processes); skipped if not built
  aiosmtpd    benchmarks/peer_aiosmtpd.py (one asyncio process)
  postfix     private Postfix instance.  Postfix runs one smtpd process per
              connection, so it is measured with fewer connections (default
              200) and the per-connection figure is extrapolated; the RSS sum
              counts shared library pages once per process, so the PSS
              (proportional set size) figure is printed as well.

Output (stdout): "idle_memory.<target>: X bytes/conn".  Connections are opened
in bounded batches under an overall time limit; all traffic is on loopback.
Exit status: 0, or 2 on harness/peer errors.
"""

import argparse
import os
import shutil
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

ORDER = ("mailengine", "aiosmtpd", "postfix")
MAX_CONNS = 15000
SETTLE_S = 1.0


class ConnError(Exception):
    pass


def open_idle(port, n, deadline, batch=100):
    """Open n connections and read each 220 greeting; returns the sockets."""
    socks = []
    try:
        while len(socks) < n:
            if time.monotonic() > deadline:
                raise ConnError(f"time limit reached after {len(socks)} connections")
            fresh = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(max(1.0, min(30.0, deadline - time.monotonic())))
                try:
                    s.connect((bl.HOST, port))
                except OSError as e:
                    s.close()
                    raise ConnError(f"connect #{len(socks) + len(fresh) + 1} failed: {e}")
                fresh.append(s)
            socks.extend(fresh)
            for s in fresh:
                try:
                    reply = bl.read_reply(s, min(deadline, time.monotonic() + 30))
                except (OSError, TimeoutError) as e:
                    raise ConnError(f"no greeting on connection {len(socks)}: {e}")
                if not reply.startswith(b"220"):
                    raise ConnError(f"unexpected greeting {reply[:60]!r}")
        return socks
    except BaseException:
        close_all(socks)
        raise


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def still_open(socks, sample=50):
    """Cheap check that the server has not dropped the idle connections."""
    dead = 0
    step = max(1, len(socks) // sample)
    for s in socks[::step]:
        try:
            s.setblocking(False)
            data = s.recv(1, socket.MSG_PEEK)
            if data == b"":
                dead += 1
        except BlockingIOError:
            pass
        except OSError:
            dead += 1
        finally:
            s.setblocking(True)
    return dead


def measure(name, n, args):
    workdir = bl.make_workdir(f"idle-{name}")
    cls = bl.TARGETS[name]
    target = cls(workdir, smtpd_maxproc=n + 50) if name == "postfix" else cls(workdir)
    socks = []
    try:
        try:
            target.start()
        except bl.TargetUnavailable as e:
            return None, f"skip:{e}"
        except Exception as e:  # noqa: BLE001
            return None, f"fail:start: {e}"
        if name != "postfix":
            # warm-up: let the server allocate its lazily created per-loop
            # structures (Postfix is skipped: idle smtpd processes would stay
            # around and be reused by the measured connections)
            try:
                close_all(open_idle(target.port, 10, time.monotonic() + 30))
            except ConnError as e:
                return None, f"fail:warm-up: {e}"
        time.sleep(SETTLE_S)
        before, before_pss = target.rss(), target.pss()
        procs_before = len(target.pids())
        t0 = time.monotonic()
        try:
            socks = open_idle(target.port, n, time.monotonic() + args.timeout)
        except ConnError as e:
            return None, f"fail:{e}\n{target.log_tail()}"
        opened = time.monotonic() - t0
        time.sleep(SETTLE_S)
        after, after_pss = target.rss(), target.pss()
        procs_after = len(target.pids())
        dead = still_open(socks)
        if dead:
            bl.note(f"{name}: {dead} of the sampled idle connections were closed by the server")
        bl.note(f"{name}: {n} idle connections opened in {opened:.1f}s; RSS {before / 2**20:.1f} MiB "
                f"-> {after / 2**20:.1f} MiB over {procs_before} -> {procs_after} processes")
        return ((after - before) / n, (after_pss - before_pss) / n), "ok"
    finally:
        close_all(socks)
        try:
            target.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="Idle SMTP connection memory",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=5000, help="idle connections (mailengine, aiosmtpd)")
    ap.add_argument("--postfix-conns", type=int, default=200,
                    help="idle connections for Postfix (one smtpd process each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 500 (Postfix 50) connections")
    ap.add_argument("--only", default="", help="comma-separated targets: " + ",".join(ORDER))
    ap.add_argument("--timeout", type=float, default=300, help="time limit to open the connections")
    args, unknown = ap.parse_known_args()
    if unknown:
        bl.note(f"ignoring unknown arguments: {' '.join(unknown)}")
    if args.quick:
        if "--conns" not in sys.argv:
            args.conns = 500
        if "--postfix-conns" not in sys.argv:
            args.postfix_conns = 50
    targets = [t.strip() for t in args.only.split(",") if t.strip()] or list(ORDER)
    for t in targets:
        if t not in bl.TARGETS:
            ap.error(f"unknown target {t!r}")
    targets = [t for t in ORDER if t in targets]  # sink is not a target here

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = bl.raise_nofile()
    cap = min(MAX_CONNS, nofile - 200)
    if args.conns > cap:
        bl.note(f"RLIMIT_NOFILE is {nofile}: limiting to {cap} connections")
        args.conns = cap
    if args.conns < 1 or args.postfix_conns < 1:
        ap.error("connection counts must be positive")
    args.postfix_conns = min(args.postfix_conns, cap, 1000)

    harness_errors = 0
    for name in targets:
        n = args.postfix_conns if name == "postfix" else args.conns
        res, status = measure(name, n, args)
        key = "idle_memory.postfix_smtpd" if name == "postfix" else f"idle_memory.{name}"
        if status.startswith("skip:"):
            bl.out(f"# SKIP {name}: {status[5:]}")
            continue
        if status.startswith("fail:"):
            bl.out(f"{key}: FAILED")
            bl.note(f"{key} failed: {status[5:]}")
            if name != "mailengine":
                harness_errors += 1
            continue
        rss, pss = res
        if name == "postfix":
            bl.out(f"# postfix: one smtpd process per connection; measured with {n} connections, "
                   "per-connection value extrapolated (RSS counts shared pages in every process)")
        bl.out(f"{key}: {rss:.0f} bytes/conn")
        if name == "postfix":
            bl.out(f"idle_memory.postfix_smtpd_pss: {pss:.0f} bytes/conn")
    return 2 if harness_errors else 0


if __name__ == "__main__":
    sys.exit(main())
