#!/usr/bin/env python3
"""Outbound delivery throughput: mailengine and Postfix empty the same queue
into the same smtp-sinks, found through the same DNS.

Setup (made by the harness, removed at the end):

  netns      a network namespace of its own (`ip netns add mebench-PID`):
             a private loopback, so the sinks can listen on port 25, and
             /etc/netns/NAME/resolv.conf ("nameserver 127.0.0.1"), which
             `ip netns exec` mounts over /etc/resolv.conf.  The harness
             re-runs itself inside it; everything below runs there.
  DNS        unbound on 127.0.0.1:53 (mailengine.testing.dns.LocalDNS):
             destN.test MX 10 mx.destN.test, mx.destN.test A 127.0.0.(N+1)
             for N = 1..8.  Postfix resolves through libc (resolv.conf),
             mailengine through its own resolver pointed at the same server.
  sinks      one `smtp-sink -c` per destination, on 127.0.0.2:25 ...
             127.0.0.9:25; its running counters (read from a pipe) give the
             time at which the last message arrived.

The queue: --messages (20000) messages of about 5 KB, distinct Message-IDs,
one recipient each (rcptI@destD.test, round-robin over the destinations),
the same bytes for every sender.  Cases: 1 destination (all mail to
dest1.test) and 8 destinations (dest1..dest8.test).

Senders, each measured from "go" until the sinks together have received
every message:

  ceiling     smtp-source alone (-d: sessions stay open, -F: one of the
              benchmark messages), the same number of connections in all.
              smtp-source does not pipeline, so a sender that does can
              reach or pass this "ceiling"
  postfix     a private Postfix instance (own config, queue and data
              directories, no chroot, IPv4 only, no TLS, connection cache on
              for all destinations, slow start off, 50 smtp processes, the
              whole queue in its active queue): the messages are put in
              its queue ON HOLD through its smtpd first; "go" is
              `postsuper -H ALL; postqueue -f`
  mailengine  a runner process (this file with the repository's venv
              python): Engine(delivery_enabled=False) + send_many() into
              the durable queue (timed: the inject rate), stop; "go" starts
              a new Engine on the same data directory with delivery on

Output (stdout): "deliver.<N>dest.<sender>: R msg/s" per run, then
"deliver_<N>dest_vs_postfix: X", "deliver_<N>dest_vs_ceiling: Y" and
"send_many_inject_msgs_per_s: R", and a table (lines starting with "#").
Diagnostics go to stderr prefixed with "#".

Exit status: 0, or 2 on harness/peer errors (ceiling or Postfix failing or
losing mail), with --strict also 1 when mailengine fails.
"""

import argparse
import json
import os
import queue
import select
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402

ORDER = ("ceiling", "postfix", "mailengine")
ALIASES = {"sink": "ceiling"}
MAX_DESTS = 8
SENDER = "sender@bench.test"
VENV_PY = os.path.join(bl.VENV_BIN, "python")
# Postfix smtp processes in all, unless --postfix-procs: on the 2-CPU
# machine Postfix delivered fastest with 30..50 (about 1500 msg/s for one
# and for eight destinations) and slower with 100 (1330 and 1090), 200 or 400.
POSTFIX_PROCS = 50
SKIP_EXIT = 3  # runner: mailengine cannot run here (not built, no delivery API yet)


# ---------------------------------------------------------------- the workload

def dest_domain(d: int) -> str:
    return f"dest{d + 1}.test"


def sink_addr(d: int) -> str:
    return f"127.0.0.{d + 2}"


def dns_records() -> list:
    recs = []
    for d in range(MAX_DESTS):
        recs.append(f"{dest_domain(d)}. 300 IN MX 10 mx.{dest_domain(d)}.")
        recs.append(f"mx.{dest_domain(d)}. 300 IN A {sink_addr(d)}")
    return recs


_WORDS = ("delivery queue relay sink transfer message domain connection pipeline "
          "session throughput destination exchange envelope header body").split()


def make_message(i: int, dests: int, size: int):
    """(bytes with CRLF line ends, sender, [recipient]) of message i."""
    rcpt = f"rcpt{i}@{dest_domain(i % dests)}"
    head = (f"From: Bench Sender <{SENDER}>\r\n"
            f"To: <{rcpt}>\r\n"
            f"Subject: delivery benchmark message {i}\r\n"
            "Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{i:08d}.deliver@bench.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n").encode()
    lines, used, k = [], len(head), i
    while used < size:
        words = []
        while sum(len(w) + 1 for w in words) < 70:
            words.append(_WORDS[k % len(_WORDS)])
            k = (k * 1103515245 + 12345) & 0x7FFFFFFF
        line = " ".join(words)[: max(1, min(72, size - used - 2))] + "\r\n"
        lines.append(line.encode())
        used += len(line)
    return head + b"".join(lines), SENDER, [rcpt]


def make_messages(n: int, dests: int, size: int) -> list:
    return [make_message(i, dests, size) for i in range(n)]


def split_even(total: int, parts: int) -> list:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------- sinks

def start_sinks(dests: int, max_conns: int) -> list:
    sinks = []
    try:
        for d in range(dests):
            sinks.append(bl.CountingSink(sink_addr(d), 25, max_conns=max_conns).start())
    except BaseException:
        stop_sinks(sinks)
        raise
    return sinks


def stop_sinks(sinks: list) -> None:
    for s in sinks:
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001
            bl.note(f"stopping smtp-sink {s.addr}: {e}")


def check_spread(sinks: list, n: int, dests: int) -> str:
    """'' when each sink got its round-robin share, else a description."""
    want = split_even(n, dests)
    got = [s.mesg for s in sinks]
    return "" if got == want else f"per-sink counts {got}, expected {want}"


class RunFailed(Exception):
    """A measured sender failed (reported as FAILED, not a harness crash)."""


# ---------------------------------------------------------------- ceiling

def run_ceiling(dests, args, work):
    """smtp-source alone: same message size, same sinks, same connections."""
    eml = os.path.join(work, "message.eml")
    body = make_message(0, dests, args.size)[0].replace(b"\r\n", b"\n")
    with open(eml, "wb") as f:
        f.write(body)
    sessions = split_even(args.ceiling_sessions, dests)
    counts = split_even(args.messages, dests)
    sinks = start_sinks(dests, max_conns=max(1024, 2 * args.connections))
    procs = []
    try:
        t0 = time.monotonic()
        for d in range(dests):
            cmd = [bl.SMTP_SOURCE, "-d", "-s", str(max(1, sessions[d])), "-m", str(counts[d]),
                   "-F", eml, "-f", SENDER, "-t", f"rcpt@{dest_domain(d)}",
                   "-M", "client.bench.test", f"{sink_addr(d)}:25"]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))

        def tick():
            for p in procs:
                if p.poll() not in (None, 0):
                    msg = p.stdout.read().decode(errors="replace").strip()
                    raise RunFailed(f"smtp-source exited {p.returncode}: {msg[-300:]}")

        when, n = bl.wait_sinks(sinks, args.messages, t0 + args.timeout, tick)
        if when is None:
            raise RunFailed(f"time limit of {args.timeout:.0f}s: sinks got {n}/{args.messages}")
        for p in procs:
            p.wait(timeout=60)
        tick()
        spread = check_spread(sinks, args.messages, dests)
        if spread:
            raise RunFailed(spread)
        return args.messages / (when - t0), {}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid, a process we started
                p.wait()
        stop_sinks(sinks)


# ---------------------------------------------------------------- Postfix

def inject_smtp(port, msgs, conns, deadline):
    """Put msgs into a server through `conns` parallel SMTP sessions."""
    errors = []
    parts = [msgs[i::conns] for i in range(conns)]

    def lane(part):
        try:
            with smtplib.SMTP(bl.HOST, port, local_hostname="inject.bench.test", timeout=60) as s:
                for data, sender, rcpts in part:
                    if errors or time.monotonic() > deadline:
                        raise TimeoutError("injection time limit exceeded")
                    s.sendmail(sender, rcpts, data)
        except Exception as e:  # noqa: BLE001 - collected, reported as failure
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=lane, args=(p,), daemon=True) for p in parts if p]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 60))
    if errors:
        raise RunFailed(f"injection into Postfix failed: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise RunFailed("injection into Postfix did not finish")


def run_postfix(dests, args, work):
    msgs = make_messages(args.messages, dests, args.size)
    procs = args.postfix_procs or min(POSTFIX_PROCS, args.connections * dests)
    pf = bl.PostfixRelayTarget(work, concurrency=args.connections, smtp_procs=procs,
                               per_connection=args.per_connection, messages=args.messages,
                               smtpd_maxproc=args.inject_conns + 10)
    sinks = []
    info = {}
    try:
        pf.start()
        bl.note(f"postfix/{dests}dest: smtpd on {bl.HOST}:{pf.port}, {procs} smtp processes, "
                f"{args.connections} per destination, data in {work}")
        t = time.monotonic()
        inject_smtp(pf.port, msgs, args.inject_conns, t + args.timeout)
        inject_s = time.monotonic() - t
        del msgs
        q = pf.queue_counts()
        if q["hold"] != args.messages or q["incoming"] or q["active"] or q["deferred"]:
            raise RunFailed(f"after injection the queue is {q}, expected {args.messages} on hold")
        info["inject"] = args.messages / inject_s
        bl.note(f"postfix/{dests}dest: {args.messages} messages on hold "
                f"(smtpd injection {info['inject']:.0f} msg/s)")
        sinks = start_sinks(dests, max_conns=max(1024, 2 * procs))
        os.sync()
        t0 = time.monotonic()
        pf.release_hold()
        info["release_s"] = time.monotonic() - t0

        def tick():
            if not pf.pids():
                raise RunFailed("the Postfix instance is gone")

        when, n = bl.wait_sinks(sinks, args.messages, t0 + args.timeout, tick)
        if when is None:
            raise RunFailed(f"time limit of {args.timeout:.0f}s: sinks got {n}/{args.messages}; "
                            f"queue {pf.queue_counts()}; log {pf.log_status_counts()}\n{pf.log_tail()}")
        rate = args.messages / (when - t0)
        # cross-checks: every message logged as sent once, the queue empty
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = pf.log_status_counts()
            if st.get("sent", 0) >= args.messages and not any(pf.queue_counts().values()):
                break
            time.sleep(0.2)
        st, q = pf.log_status_counts(), pf.queue_counts()
        spread = check_spread(sinks, args.messages, dests)
        if st.get("sent", 0) != args.messages or any(q.values()) or spread:
            raise RunFailed(f"postfix: log {st}, queue {q} {spread}")
        if len(st) > 1:
            bl.note(f"postfix/{dests}dest: delivery outcomes {st}")
        problems = pf.log_problems()
        if problems:
            bl.note(f"postfix maillog has {len(problems)} warning/error lines, e.g.: {problems[0]}")
        bl.note(f"postfix/{dests}dest: verified {st['sent']} status=sent, queue empty "
                f"(postsuper -H + postqueue -f took {info['release_s']:.2f}s of the run)")
        return rate, info
    finally:
        stop_sinks(sinks)
        pf.stop()


# ---------------------------------------------------------------- mailengine

def run_mailengine(dests, args, work, dns_address):
    if not os.access(VENV_PY, os.X_OK):
        raise bl.TargetUnavailable(f"{os.path.relpath(VENV_PY, bl.REPO)} not found (run `make` first)")
    spec = {"data_dir": os.path.join(work, "data"), "dns": dns_address, "messages": args.messages,
            "dests": dests, "size": args.size, "connections": args.connections,
            "per_connection": args.per_connection, "timeout": args.timeout}
    log = os.path.join(work, "runner.log")
    sinks = start_sinks(dests, max_conns=max(1024, 2 * args.connections * dests))
    logf = open(log, "wb")
    proc = subprocess.Popen([VENV_PY, os.path.abspath(__file__), "--_runner", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                            cwd=bl.REPO, start_new_session=True)
    lines = queue.Queue()
    events = {}

    def reader():
        for raw in proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            lines.put(ev)
        lines.put({"event": "eof"})

    threading.Thread(target=reader, daemon=True).start()

    def expect(name, deadline):
        while True:
            try:
                ev = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RunFailed(f"runner: no '{name}' within the time limit\n{bl.tail(log)}")
            events[ev["event"]] = ev
            if ev["event"] == name:
                return ev
            if ev["event"] == "skip":
                raise bl.TargetUnavailable(ev.get("reason", "?"))
            if ev["event"] in ("error", "eof"):
                proc.wait(timeout=30)
                raise RunFailed(f"runner: {ev.get('error', 'exited ' + str(proc.returncode))}"
                                f"\n{bl.tail(log)}")

    info = {}
    try:
        t = time.monotonic()
        inj = expect("injected", t + args.timeout)
        if inj["count"] != args.messages:
            raise RunFailed(f"send_many returned {inj['count']} ids for {args.messages} messages")
        info["inject"] = args.messages / inj["seconds"]
        bl.note(f"mailengine/{dests}dest: send_many queued {args.messages} messages in "
                f"{inj['seconds']:.2f}s ({info['inject']:.0f} msg/s)")
        if any(s.mesg for s in sinks):
            raise RunFailed("mail reached a sink while delivery was off")
        os.sync()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        t_go = time.monotonic()

        def tick():
            if proc.poll() is not None:
                why = f"exited {proc.returncode}"
                while not lines.empty():
                    ev = lines.get_nowait()
                    if ev["event"] == "error":
                        why = ev.get("error", why)
                raise RunFailed(f"runner during delivery: {why}\n{bl.tail(log)}")

        when, n = bl.wait_sinks(sinks, args.messages, t_go + args.timeout, tick)
        if when is None:
            raise RunFailed(f"time limit of {args.timeout:.0f}s: sinks got {n}/{args.messages}"
                            f"\n{bl.tail(log)}")
        t0 = expect("starting", time.monotonic() + 30)["t"]
        rate = args.messages / (when - t0)
        done = expect("done", time.monotonic() + 60)
        proc.wait(timeout=120)
        counts = done.get("counts", {})
        spread = check_spread(sinks, args.messages, dests)
        if counts.get("delivered", 0) != args.messages or spread:
            raise RunFailed(f"mailengine: delivery events {counts} {spread}")
        if len(counts) > 1:
            bl.note(f"mailengine/{dests}dest: delivery events {counts}")
        bl.note(f"mailengine/{dests}dest: verified {counts['delivered']} 'delivered' events "
                f"(start() returned after {events.get('started', {}).get('t', t0) - t0:.2f}s)")
        return rate, info
    finally:
        if proc.poll() is None:
            bl.stop_popen(proc, group=True, timeout=30)
        logf.close()
        stop_sinks(sinks)


def runner_main(spec_json: str) -> int:
    """Runs in the venv python, as a child of the harness inside the netns.

    Protocol on stdout, one JSON object a line: injected, starting (with
    CLOCK_MONOTONIC t just before Engine.start()), started, done; or skip /
    error.  Waits for "go" on stdin between the two phases.
    """
    spec = json.loads(spec_json)

    def emit(event, **kw):
        sys.stdout.write(json.dumps({"event": event, **kw}) + "\n")
        sys.stdout.flush()

    try:
        from mailengine import Config, Engine, Policy  # noqa: PLC0415
    except ImportError as e:
        emit("skip", reason=f"mailengine has no delivery API here ({e})")
        return SKIP_EXIT
    n, timeout = spec["messages"], spec["timeout"]
    msgs = make_messages(n, spec["dests"], spec["size"])

    # Like the Postfix side: no TLS (the sinks offer none anyway), the same
    # connection and per-connection limits.
    policy = Policy(max_connections=spec["connections"],
                    max_messages_per_connection=spec["per_connection"])
    if hasattr(policy, "tls"):
        policy.tls = "none"

    def config(delivery):
        return Config(data_dir=spec["data_dir"], listeners=[], hostname="bench.test",
                      dns=spec["dns"], remote_port=25, delivery_enabled=delivery,
                      default_policy=policy)

    try:
        os.makedirs(spec["data_dir"], exist_ok=True)
        eng = Engine(config(False))
        eng.start()
        try:
            t = time.monotonic()
            ids = eng.send_many(m for m in msgs)
            dt = time.monotonic() - t
        finally:
            eng.stop()
        del msgs
        emit("injected", seconds=dt, count=len(ids))
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
        if not ready or sys.stdin.readline().strip() != "go":
            emit("error", error="no 'go' from the harness")
            return 1
        counts = {}
        lock = threading.Lock()
        finished = threading.Event()

        def on_delivery(ev):
            with lock:
                counts[ev.type] = counts.get(ev.type, 0) + 1
                if sum(counts.get(k, 0) for k in ("delivered", "bounced", "expired")) >= n:
                    finished.set()

        eng2 = Engine(config(True))
        eng2.on_delivery(on_delivery)
        emit("starting", t=time.monotonic())
        eng2.start()
        try:
            emit("started", t=time.monotonic())
            finished.wait(timeout)
            with lock:
                snapshot = dict(counts)
            emit("done", counts=snapshot, t=time.monotonic())
        finally:
            eng2.stop()
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the harness
        emit("error", error=f"{type(e).__name__}: {e}")
        return 1


# ---------------------------------------------------------------- orchestration

def run_one(name, dests, args, root, dns_address):
    """(rate, info, status) with status 'ok', 'skip:...' or 'fail:...'."""
    work = bl.make_workdir(f"deliver-{name}-{dests}")
    try:
        if name == "ceiling":
            rate, info = run_ceiling(dests, args, work)
        elif name == "postfix":
            rate, info = run_postfix(dests, args, work)
        else:
            rate, info = run_mailengine(dests, args, work, dns_address)
        return rate, info, "ok"
    except bl.TargetUnavailable as e:
        return None, {}, f"skip:{e}"
    except (RunFailed, bl.HarnessError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        return None, {}, f"fail:{e}"
    finally:
        if args.keep:
            bl.note(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}".replace(",", " ")


def fmt_ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def inner_main(args) -> int:
    """Everything that runs inside the network namespace."""
    bl.raise_nofile()
    root = bl.make_workdir("deliver")
    bl.note(f"deliver: {args.messages} msgs of ~{args.size} B, {args.connections} connections "
            f"per destination, destinations {','.join(map(str, args.dests))}, senders "
            f"{','.join(args.only)}, data under {root} ({bl._fs_type(root)}), {os.cpu_count()} cpus")
    LocalDNS = bl.load_local_dns()
    dns = LocalDNS(os.path.join(root, "dns"), dns_records(), port=53)
    harness_errors, mailengine_failed = 0, False
    results = {}  # (dests, name) -> rate
    injects = []
    skipped = set()
    try:
        try:
            dns.start()
        except RuntimeError as e:
            bl.note(f"harness error: the test DNS did not start: {e}")
            return 2
        bl.note(f"unbound on {dns.address} (pid {dns.proc.pid})")
        for dests in args.dests:
            for name in ORDER:
                if name not in args.only or name in skipped:
                    continue
                runs, status = [], "ok"
                for _ in range(args.repeat):
                    rate, info, status = run_one(name, dests, args, root, dns.address)
                    if status != "ok":
                        break
                    runs.append(rate)
                    if name == "mailengine" and "inject" in info:
                        injects.append(info["inject"])
                key = f"deliver.{dests}dest.{name}"
                if status.startswith("skip:"):
                    skipped.add(name)
                    bl.out(f"# SKIP {name}: {status[5:]}")
                    continue
                if status.startswith("fail:"):
                    bl.out(f"{key}: FAILED")
                    bl.note(f"{key} failed: {status[5:]}")
                    if name == "mailengine":
                        mailengine_failed = True
                    else:
                        harness_errors += 1
                    continue
                rate = statistics.median(runs)
                if args.repeat > 1:
                    bl.note(f"{name}/{dests}dest: runs {', '.join(f'{r:.0f}' for r in runs)} msg/s; "
                            f"median {rate:.0f}")
                results[(dests, name)] = rate
                bl.out(f"{key}: {rate:.0f} msg/s")
    finally:
        dns.stop()
        if args.keep:
            bl.note(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    for dests in args.dests:
        me = results.get((dests, "mailengine"))
        pf = results.get((dests, "postfix"))
        ce = results.get((dests, "ceiling"))
        if me is not None and pf is not None:
            bl.out(f"deliver_{dests}dest_vs_postfix: {me / pf:.2f}")
        if me is not None and ce is not None:
            bl.out(f"deliver_{dests}dest_vs_ceiling: {me / ce:.2f}")
        if pf is not None and ce is not None:
            bl.note(f"postfix/{dests}dest reaches {pf / ce:.2f} of the smtp-source ceiling")
    if injects:
        bl.out(f"send_many_inject_msgs_per_s: {statistics.median(injects):.0f}")

    bl.out(f"# delivery of {args.messages} messages (~{args.size} B), msg/s"
           f"{' (median of %d)' % args.repeat if args.repeat > 1 else ''}; "
           f"{args.connections} connections per destination")
    bl.out("# | destinations | smtp-source ceiling | Postfix | mailengine "
           "| mailengine / Postfix | mailengine / ceiling | Postfix / ceiling |")
    bl.out("# |---|---|---|---|---|---|---|")
    for dests in args.dests:
        ce, pf, me = (results.get((dests, k)) for k in ORDER)
        bl.out(f"# | {dests} | {fmt_rate(ce)} | {fmt_rate(pf)} | {fmt_rate(me)} "
               f"| {fmt_ratio(me, pf)} | {fmt_ratio(me, ce)} | {fmt_ratio(pf, ce)} |")
    if injects:
        bl.out(f"# send_many into the durable queue: {statistics.median(injects):.0f} msg/s")

    if harness_errors:
        return 2
    if mailengine_failed and args.strict:
        return 1
    return 0


def outer_main(args, argv) -> int:
    """Make the namespace, run this script inside it, remove the namespace."""
    reason = bl.NetNS.available()
    for exe in (bl.SMTP_SINK, bl.SMTP_SOURCE, bl.POSTFIX, bl.POSTSUPER):
        if not os.path.exists(exe):
            reason = reason or f"{exe} not found (install postfix)"
    if not reason:
        try:
            bl.load_local_dns()
        except bl.TargetUnavailable as e:
            reason = str(e)
    if not reason and not shutil.which("unbound") and not os.path.exists("/usr/sbin/unbound"):
        reason = "unbound not installed (apt-get install unbound)"
    if reason:
        bl.out(f"# SKIP deliver: {reason}")
        return 0
    ns = bl.NetNS(f"mebench-{os.getpid()}")
    runs = len(args.dests) * len(args.only) * args.repeat
    limit = runs * (args.timeout + 180) + 120
    proc = None
    try:
        ns.create()
        bl.note(f"network namespace {ns.name} (resolv.conf -> 127.0.0.1:53)")
        proc = subprocess.Popen(ns.prefix() + [sys.executable, os.path.abspath(__file__),
                                               "--_inner"] + argv, stdin=subprocess.DEVNULL)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            bl.note(f"benchmark still running after {limit:.0f}s; stopping it")
            return 2
    finally:
        if proc is not None and proc.poll() is None:
            bl.stop_popen(proc, timeout=120)  # its own finally blocks stop what it started
        left = ns.pids()
        if left:
            bl.note(f"processes still in {ns.name}: {left} (left alone; deleting the namespace)")
        ns.delete()


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Outbound delivery throughput (mailengine vs Postfix)",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2000 messages")
    ap.add_argument("--only", action="append", default=[],
                    help="senders, repeatable or comma-separated: " + ",".join(ORDER)
                    + " ('sink' means ceiling; other names are ignored)")
    ap.add_argument("--dests", action="append", default=[],
                    help="destination counts, repeatable or comma-separated: 1,8 (default both)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported")
    ap.add_argument("--timeout", type=float, default=300, help="time limit per run, seconds")
    ap.add_argument("--size", type=int, default=5120, help="message size in bytes")
    ap.add_argument("--connections", type=int, default=100,
                    help="connections per destination (mailengine max_connections, Postfix "
                    "destination concurrency limit)")
    ap.add_argument("--per-connection", type=int, default=1000,
                    help="messages per connection at most (both senders)")
    ap.add_argument("--postfix-procs", type=int, default=0,
                    help=f"Postfix smtp processes in all (default: {POSTFIX_PROCS}, "
                    "or fewer when --connections x destinations is smaller)")
    ap.add_argument("--ceiling-sessions", type=int, default=0,
                    help="smtp-source sessions in all (default: --connections)")
    ap.add_argument("--inject-conns", type=int, default=16,
                    help="parallel SMTP sessions that fill the Postfix queue")
    ap.add_argument("--keep", action="store_true", help="keep data directories")
    ap.add_argument("--strict", action="store_true", help="exit 1 when mailengine fails")
    ap.add_argument("--_inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_runner", help=argparse.SUPPRESS)
    args, unknown = ap.parse_known_args(argv)
    if unknown and not args._inner:
        bl.note(f"ignoring unknown arguments: {' '.join(unknown)}")
    if args.quick and "--messages" not in argv:
        args.messages = 2000
    only = []
    for item in args.only:
        for t in item.split(","):
            t = ALIASES.get(t.strip(), t.strip())
            if t in ORDER and t not in only:
                only.append(t)
            elif t and t not in ORDER and not args._inner:
                bl.note(f"--only: {t!r} is not a sender of this benchmark; ignored")
    args.only = only if args.only else list(ORDER)
    dests = []
    for item in args.dests or ["1,8"]:
        for d in item.split(","):
            if d.strip():
                if d.strip() not in ("1", "8"):
                    ap.error("--dests takes 1 and/or 8")
                if int(d) not in dests:
                    dests.append(int(d))
    args.dests = dests
    if not (1 <= args.messages <= 1_000_000 and 1 <= args.repeat <= 20
            and 1 <= args.connections <= 1000 and args.timeout > 0 and 512 <= args.size <= 10_000_000
            and 1 <= args.inject_conns <= 200 and args.per_connection >= 1):
        ap.error("out-of-range option (--messages 1..1000000, --repeat 1..20, "
                 "--connections 1..1000, --size 512.., --inject-conns 1..200)")
    args.ceiling_sessions = args.ceiling_sessions or args.connections
    return args


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--_runner"] and len(argv) == 2:
        return runner_main(argv[1])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.only:
        bl.out("# SKIP deliver: none of the --only names is a sender of this benchmark")
        return 0
    if args._inner:
        return inner_main(args)
    return outer_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
