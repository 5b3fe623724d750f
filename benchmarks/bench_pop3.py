#!/usr/bin/env python3
"""POP3 serving: mailengine against a private Dovecot 2.3, same run, same mail.

Content: --mailboxes (50) mailboxes of --per-mailbox (1000) messages of
about --size (5120, +-256) bytes (realistic headers, CRLF line ends, about
one body line in twenty starting with "."), written straight into
mailengine's DATA/mailboxes/bench.test/userNNN/new/ and, as a separate copy,
into the tree Dovecot reads (maildir:ROOT/%d/%n); plus --idle-conns (500)
small mailboxes of --idle-messages (10) for the memory part.  Users are
userNNN@bench.test, idleNNNN@bench.test, warmNN@bench.test with {PLAIN}
passwords on both servers (neither spends time on a password hash).

Servers, both on 127.0.0.1 and free ports:
  mailengine  .venv/bin/mailengine serve --pop3 ... --allow-plain-auth
              --workers 2 --no-delivery (users in DATA/users); or, with
              --mailengine-src DIR, `python -m mailengine` from a built tree
  dovecot     benchmarks/peer_dovecot.py: `dovecot -F -c CONF`, pop3 only,
              pop3-login in high-performance mode, one pop3 process per
              session (Dovecot's design), defaults otherwise

Throughput (pop3_retr): benchmarks/pop3_load.c, compiled at run time with
cc -O2 into the work directory; one epoll loop, one connection per mailbox,
each doing greeting, USER, PASS, STAT, RETR 1..n one at a time (each
response read to its CRLF.CRLF), QUIT (no DELE, so rounds repeat on the
same mail).  msg/s = messages / wall time of the client (first connect to
last QUIT).  A first, unmeasured round per server checks the content
(message count, body bytes and the sum of the CRC-32 of every message as
sent, against what was written) and lets Dovecot build its index and cache
and move the mail from new/ to cur/ (it marks retrieved mail \\Seen); then
--rounds (3) measured rounds, alternating which server goes first; medians
are reported.  Per round, stderr shows the server's CPU time (for Dovecot
including the exited per-session processes, via the master's
cutime/cstime; for mailengine the busiest threads), the client's, and the
CPU the machine spent on anything else ("other": other jobs disturb the
figures).  Before each round the harness waits (at most --quiet-wait, 30 s)
for a second in which the whole machine used less than --max-other (0.2)
of a core; a round with "other" above --max-other is run again, at most
--retry-noisy (2) times, and the median is taken over the quiet rounds
(over all when none was quiet; noisy ones are starred on stderr).
--profile runs perf on mailengine during extra rounds.

Idle memory (pop3_idle_memory): fresh servers; 10 sessions logged in and
closed as a warm-up, and 16 x 400 CAPA round trips (so mailengine's receive
rings, a fixed per-worker cost, are touched before the baseline); then N
sessions (one per small mailbox: mailengine
allows one session per mailbox) log in (PASS answered +OK) and stay idle;
after --settle seconds, the growth of the servers' memory divided by N,
summed over all their processes (for Dovecot the master, login, auth, ...
and one pop3 process per session).  The reported figure is anonymous
memory plus page tables: "Anonymous" of /proc/PID/smaps_rollup (heap,
stacks, copied-on-write pages: private to the process) and VmPTE of
/proc/PID/status (the kernel's page tables, a real cost of a process per
session).  It does not move when unrelated processes that share library
pages come and go, which USS and PSS do (by up to ~10 MiB for a Python
process when other Pythons exit: as much as 500 mailengine sessions use);
PSS (shared pages divided among the processes mapping them) and RSS
(VmRSS; shared pages counted in every process) are printed for reference,
all kinds on stderr.  The same with the big mailboxes (--mailboxes
sessions of 1000 messages each) gives pop3_idle_memory_big.  Socket
buffers, kernel stacks and task structs are in none of them.

Output (stdout): "pop3_retr.<target>: N msg/s", "pop3_retr_vs_dovecot: R"
(mailengine / Dovecot), "pop3_idle_memory.<target>: B bytes/conn" (anon + PTE),
"pop3_idle_memory.<target>_pss/_rss", the same for pop3_idle_memory_big,
and "pop3_idle_memory_dovecot_vs_mailengine: R".  Diagnostics on stderr,
starting with "#".  Exit status 0; 2 on harness/peer errors (a peer that
fails or a wrong content check); with --strict also 1 when mailengine fails.
"""

import argparse
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
import peer_dovecot  # noqa: E402

ORDER = ("mailengine", "dovecot")
LOAD_SRC = os.path.join(bl.BENCH_DIR, "pop3_load.c")
PASSWORD = "bench-pw"


class TargetFailed(Exception):
    pass


# ---------------------------------------------------------------- content

WORDS = ("the report for this quarter shows revenue growth across all regions while costs "
         "remained stable and the team expects further improvement next year as the new "
         "platform rolls out to customers in europe and asia please review the attached "
         "figures before thursday meeting agenda includes budget hiring roadmap security "
         "audit results migration plan mail server upgrade storage capacity backup policy").split()


def body_pool(rng, n=4000):
    """Text lines of 20..76 characters; about one in twenty starts with '.'."""
    lines = []
    for i in range(n):
        words, length = [], 0
        target = rng.randint(20, 76)
        while length < target:
            w = rng.choice(WORDS)
            words.append(w)
            length += len(w) + 1
        line = " ".join(words)[:target]
        r = rng.random()
        if r < 0.03:
            line = "." + line                 # a stuffed line on the wire
        elif r < 0.05:
            line = "..." if i % 2 else "."    # "." alone would end the message unstuffed
        elif r < 0.10:
            line = ""
        lines.append(line.encode() + b"\r\n")
    return lines


class Content:
    """Generates messages and writes them into both trees; keeps the
    expected wire totals (body bytes incl. the final ".\\r\\n", and the sum
    of the CRC-32 of each message as sent)."""

    HOST = "mx.bench.test"

    def __init__(self, size, seed=4):
        self.rng = random.Random(seed)
        self.size = size
        self.pool = body_pool(self.rng)
        self.t0 = 1795000000               # 2026-11-18, seconds
        self.q = 0

    def message(self, rcpt, i):
        rng = self.rng
        sec = self.t0 + i * 37
        date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(sec))
        sender = f"sender{rng.randrange(200)}@example.org"
        head = (f"Return-Path: <{sender}>\r\n"
                f"Delivered-To: {rcpt}\r\n"
                f"Received: from mx{rng.randrange(9)}.example.org (mx.example.org [192.0.2.{rng.randrange(1, 250)}])\r\n"
                f"\tby {self.HOST} (mailengine) with ESMTPS id {rng.getrandbits(48):012X}\r\n"
                f"\tfor <{rcpt}>; {date}\r\n"
                f"Received: from [10.0.{rng.randrange(255)}.{rng.randrange(1, 255)}] (client.example.org)\r\n"
                f"\tby mx.example.org with ESMTPSA id {rng.getrandbits(40):010x}; {date}\r\n"
                f"From: \"Sender {i}\" <{sender}>\r\n"
                f"To: <{rcpt}>\r\n"
                f"Subject: Report {i}: quarterly figures and next steps\r\n"
                f"Date: {date}\r\n"
                f"Message-ID: <{rng.getrandbits(64):016x}.{i}@example.org>\r\n"
                "MIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Transfer-Encoding: 8bit\r\n"
                "\r\n").encode()
        want = self.size + rng.randint(-256, 256)
        parts, n = [head], len(head)
        k = rng.randrange(len(self.pool))
        while n < want - 80:
            line = self.pool[k % len(self.pool)]
            parts.append(line)
            n += len(line)
            k += 1
        if want - n >= 2:
            parts.append(b"x" * (want - n - 2) + b"\r\n")
        return b"".join(parts), sec

    def write_mailbox(self, me_dir, dv_dir, rcpt, count, dv_uid):
        """count messages into me_dir/new and dv_dir/new; returns (bytes, crcsum)."""
        for d in (me_dir, dv_dir):
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
        if dv_uid is not None:
            for p in (os.path.dirname(dv_dir), dv_dir, *(os.path.join(dv_dir, s) for s in ("tmp", "new", "cur"))):
                os.chown(p, *dv_uid)
        total, crcs = 0, 0
        for i in range(count):
            data, sec = self.message(rcpt, i)
            self.q += 1
            name = f"{sec}.M{self.rng.randrange(1000000)}P4242Q{self.q}.{self.HOST},S={len(data)}"
            for d, owner in ((me_dir, None), (dv_dir, dv_uid)):
                fd = os.open(os.path.join(d, "new", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    if owner is not None:
                        os.fchown(fd, *owner)
                finally:
                    os.close(fd)
            wire = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
            total += len(wire)
            crcs += zlib.crc32(wire)
        return total, crcs


# ---------------------------------------------------------------- targets

class MailenginePop3:
    name = "mailengine"

    def __init__(self, workdir, data, workers, seq=0, src=None):
        self.workdir, self.data, self.workers, self.src = workdir, data, workers, src
        self.log = os.path.join(workdir, f"mailengine-{seq}.log")  # fresh per start: "ready" is looked for
        self.proc = None
        self.port = None

    def start(self):
        env, cwd = None, None
        if self.src:
            # a built tree elsewhere (e.g. a snapshot of a commit), run by the venv's Python
            cmd = [os.path.join(bl.VENV_BIN, "python"), "-m", "mailengine"]
            env = dict(os.environ, PYTHONPATH=self.src)
            cwd = self.src
        elif os.access(bl.MAILENGINE, os.X_OK):
            cmd = [bl.MAILENGINE]
        else:
            raise bl.TargetUnavailable(f"{os.path.relpath(bl.MAILENGINE, bl.REPO)} not found "
                                       "(mailengine not built yet; run `make` first)")
        self.port = bl.free_port()
        cmd += ["serve", "--data", self.data, "--pop3", f"{bl.HOST}:{self.port}",
               "--domain", bl.DOMAIN, "--workers", str(self.workers), "--allow-plain-auth",
               "--no-delivery", "--trusted-network", "127.0.0.0/8"]
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=env, cwd=cwd)
        try:
            bl.wait_for_log(self.log, "ready", 60, self.proc)
            wait_pop3_greeting(self.port, 15, self.proc)
        except RuntimeError as e:
            self.stop()
            raise TargetFailed(f"mailengine did not start: {e}\n{bl.tail(self.log)}")
        return self

    def stop(self):
        if self.proc:
            bl.stop_popen(self.proc, group=True, timeout=30)
            self.logf.close()
            self.proc = None

    def pids(self):
        if not self.proc or self.proc.poll() is not None:
            return []
        return [p for p in bl.descendants(self.proc.pid) if bl.alive(p)]

    def cpu(self):
        """CPU seconds so far: the process (all threads) and per thread."""
        threads = {}
        pid = self.proc.pid
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                t = _cpu_fields(f"/proc/{pid}/task/{tid}/stat")
                if t:
                    threads[int(tid)] = t[0]
        except OSError:
            pass
        return sum(threads.values()), threads

    def log_tail(self):
        return bl.tail(self.log)


class DovecotTarget(peer_dovecot.DovecotPop3):
    def cpu(self):
        """CPU seconds: live processes plus the master's reaped children."""
        total = 0.0
        for p in self.pids():
            t = _cpu_fields(f"/proc/{p}/stat")
            if t:
                total += t[0] + (t[1] if p == self.proc.pid else 0.0)
        return total, {}


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_fields(path):
    """(utime+stime, cutime+cstime) in seconds from a /proc stat file."""
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return ((int(rest[11]) + int(rest[12])) / _TICK, (int(rest[13]) + int(rest[14])) / _TICK)


def wait_pop3_greeting(port, timeout, proc=None):
    import socket  # noqa: PLC0415
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            with socket.create_connection((bl.HOST, port), timeout=2) as s:
                s.settimeout(5)
                g = s.recv(512)
                if g.startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = g[:80]
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"no POP3 greeting on {bl.HOST}:{port}: {last}")


MEM_KINDS = ("anon", "pte", "uss", "pss", "rss")


def _proc_memory(pid):
    """One process: Anonymous, Pss, Private_* (USS) from smaps_rollup;
    VmRSS and VmPTE (page tables) from status.  Bytes."""
    m = dict.fromkeys(MEM_KINDS, 0)
    keys = {"Anonymous:": "anon", "Pss:": "pss", "Private_Clean:": "uss", "Private_Dirty:": "uss",
            "VmRSS:": "rss", "VmPTE:": "pte"}
    for path in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        try:
            with open(path) as f:
                for line in f:
                    k = keys.get(line.split(":", 1)[0] + ":")
                    if k:
                        m[k] += int(line.split()[1]) * 1024
        except OSError:
            pass
    return m


def memory(target):
    """MEM_KINDS and 'procs', summed over the target's processes."""
    m = dict.fromkeys(MEM_KINDS, 0)
    m["procs"] = 0
    for p in target.pids():
        for k, v in _proc_memory(p).items():
            m[k] += v
        m["procs"] += 1
    return m


def wait_quiet(limit, max_wait):
    """Wait (at most max_wait seconds) for a one-second window in which the
    machine's CPU use was below limit (cores); True when there was one."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, _ = system_busy()
        time.sleep(1.0)
        b1, _ = system_busy()
        if b1 - b0 < limit:
            return True
        if time.monotonic() >= deadline:
            return False


def system_busy():
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = v[0] + v[1] + v[2] + v[5] + v[6]
    return busy / _TICK, (v[7] if len(v) > 7 else 0) / _TICK


# ---------------------------------------------------------------- load client

def build_client(dirpath):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise bl.HarnessError("no C compiler (cc) to build pop3_load.c")
    exe = os.path.join(dirpath, "pop3_load")
    r = subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-o", exe, LOAD_SRC],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        raise bl.HarnessError(f"cc pop3_load.c failed: {r.stderr.decode(errors='replace')}")
    return exe


def write_userfile(path, users):
    with open(path, "w") as f:
        for u in users:
            f.write(f"{u}:{PASSWORD}\n")
    return path


def run_load(exe, port, userfile, timeout, checksum=False, max_msgs=0):
    cmd = [exe, "-p", str(port), "-u", userfile, "-t", str(timeout)]
    if checksum:
        cmd.append("-k")
    if max_msgs:
        cmd += ["-m", str(max_msgs)]
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TargetFailed(f"load client did not finish within {timeout + 30:.0f}s")
    err = r.stderr.decode(errors="replace").strip()
    try:
        res = json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise TargetFailed(f"load client exited {r.returncode} without a result: {err[-600:]}")
    if r.returncode != 0:
        raise TargetFailed(f"load client: {res.get('errors')} errors, {res.get('unfinished')} "
                           f"unfinished, timed_out={res.get('timed_out')}: {err[-600:]}")
    return res


class Held:
    """pop3_load -I: N sessions logged in and held until release()."""

    def __init__(self, exe, port, userfile, timeout):
        # stderr to a file: a client reporting many failures must not block on a pipe
        self.errf = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([exe, "-I", "-p", str(port), "-u", userfile, "-t", str(timeout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errf)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.release()
                raise TargetFailed(f"held sessions not ready: {line[:200]!r} "
                                   f"{self._stderr()[-600:]}")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if r:
                b = os.read(self.proc.stdout.fileno(), 4096)
                if not b:
                    continue
                line += b
        if not line.startswith(b"ready "):
            self.release()
            raise TargetFailed(f"held sessions: unexpected {line[:200]!r}")
        self.info = json.loads(line[6:])
        if self.info.get("errors"):
            why = self._stderr()[-600:]
            self.release()
            raise TargetFailed(f"held sessions: {self.info['errors']} logins failed: {why}")

    def _stderr(self):
        try:
            self.errf.seek(0)
            return self.errf.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def release(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.errf.close()
        self.proc = None


# ---------------------------------------------------------------- parts

def profile_round(target, exe, userfile, args, seconds=4.0):
    """perf record (software cpu-clock) of mailengine for `seconds` while
    extra rounds run; the shares per thread and per symbol go to stderr."""
    perf = shutil.which("perf")
    if not perf:
        bl.note("profile: perf not installed")
        return
    data = os.path.join(args.workdir, "perf.data")
    rec = subprocess.Popen([perf, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p",
                            str(target.proc.pid), "-o", data, "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)                       # let perf attach
        for _ in range(50):                   # rounds until perf's window is over
            run_load(exe, target.port, userfile, args.timeout)
            if rec.poll() is not None:
                break
    except TargetFailed as e:
        bl.note(f"profile: a load round failed: {e}")
    finally:
        try:
            rec.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait(timeout=10)
    # "pid" is per thread in perf's terms (pid:comm of each task)
    for sort, limit, top in (("pid", "0.5", 8), ("pid,sym", "0.4", 30)):
        r = subprocess.run([perf, "report", "-i", data, "--stdio", "--no-children", "--sort", sort,
                            "-g", "none", "--percent-limit", limit],
                           capture_output=True, timeout=300)
        lines = [ln for ln in r.stdout.decode(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("#")]
        bl.note(f"profile of mailengine by {'thread' if sort == 'pid' else 'thread and symbol'} "
                f"(perf record -e cpu-clock, share of the samples):")
        for ln in lines[:top]:
            bl.note("  " + " ".join(ln.split()))


def retr_part(targets, exe, userfile, expected, args):
    """A first (checking) round per target, then args.rounds measured rounds,
    alternating the order.  Returns ({name: median msg/s}, {name: why failed})."""
    n_expected, bytes_expected, crc_expected = expected
    results, failed = {name: [] for name in targets}, {}
    noisy = {name: [] for name in targets}
    cpu = {name: [] for name in targets}

    def one(name, checksum):
        t = targets[name]
        if args.quiet_wait > 0 and not wait_quiet(args.max_other, args.quiet_wait):
            bl.note(f"the machine did not get quiet within {args.quiet_wait:.0f}s; going on")
        c0, th0 = t.cpu()
        s0, st0 = system_busy()
        res = run_load(exe, t.port, userfile, args.timeout, checksum=checksum)
        c1, th1 = t.cpu()
        s1, st1 = system_busy()
        client = res["cpu_user"] + res["cpu_sys"]
        # CPU the machine spent on neither server nor client (other jobs, the
        # other server idling, this harness): a measure of interference.
        other = max(0.0, (s1 - s0) - (c1 - c0) - client) / res["elapsed"]
        steal = (st1 - st0) / res["elapsed"]
        if res["messages"] != n_expected or res["bytes"] != bytes_expected:
            raise TargetFailed(f"{res['messages']} messages / {res['bytes']} bytes retrieved, "
                               f"expected {n_expected} / {bytes_expected}")
        if checksum and int(res["checksum"], 16) != crc_expected % (1 << 64):
            raise TargetFailed(f"content checksum {res['checksum']} != {crc_expected % (1 << 64):016x}")
        rate = res["messages"] / res["elapsed"]
        busy = sorted(((th1.get(k, 0) - th0.get(k, 0)) / res["elapsed"] for k in th1), reverse=True)
        busy_s = ", ".join(f"{b:.0%}" for b in busy[:4] if b >= 0.01)
        bl.note(f"{name}: {res['messages']} msgs, {res['bytes'] / 1e6:.1f} MB in {res['elapsed']:.2f}s "
                f"= {rate:.0f} msg/s; server CPU {c1 - c0:.2f}s ({(c1 - c0) / res['elapsed']:.0%} of one core"
                f"{'; busiest threads ' + busy_s if busy_s else ''}), client CPU {client:.2f}s, "
                f"other CPU {other:.0%} of one core{f', steal {steal:.0%}' if steal >= 0.01 else ''}")
        if res["elapsed"] < 0.5:
            other = 0.0   # tick-granular CPU times say little about so short a round
        return rate, (c1 - c0) / res["messages"], other

    # first round: content check and Dovecot's indexing; not measured
    for name in targets:
        try:
            rate, _, _ = one(name, checksum=True)
            bl.note(f"{name}: first round (content verified; client computing CRC-32s): {rate:.0f} msg/s")
        except TargetFailed as e:
            failed[name] = str(e)
    for i in range(args.rounds):
        order = [n for n in targets if n not in failed]
        if i % 2:
            order.reverse()
        for name in order:
            try:
                for attempt in range(args.retry_noisy + 1):
                    rate, cpm, other = one(name, checksum=False)
                    if other <= args.max_other:
                        break
                    if attempt == args.retry_noisy:
                        noisy[name].append(len(results[name]))   # index of this round
                    bl.note(f"{name}: other work on the machine took {other:.0%} of a core "
                            f"during this round (limit {args.max_other:.0%})"
                            + ("; running it again" if attempt < args.retry_noisy
                               else "; kept, the figures are noisy"))
                results[name].append(rate)
                cpu[name].append(cpm)
            except TargetFailed as e:
                failed[name] = str(e)
    if args.profile and "mailengine" in targets and "mailengine" not in failed:
        profile_round(targets["mailengine"], exe, userfile, args)
    med = {}
    for name in targets:
        if name in failed:
            continue
        clean = [r for i, r in enumerate(results[name]) if i not in noisy[name]]
        med[name] = statistics.median(clean or results[name])
        shown = ", ".join(f"{r:.0f}" + ("*" if i in noisy[name] else "") for i, r in enumerate(results[name]))
        bl.note(f"{name}: rounds {shown}"
                f" msg/s (* = other work above --max-other); median of "
                f"{f'the {len(clean)} quiet rounds' if clean else 'all rounds (none was quiet)'}: "
                f"{med[name]:.0f}; server CPU {statistics.median(cpu[name]) * 1e6:.0f} us/msg")
    return med, failed


def warm_receive_buffers(port, conns=16, commands=400, timeout=30.0):
    """CAPA round trips on a few connections, so that each worker's receive
    ring (a fixed set of buffers whose pages the kernel touches on first
    use, up to 512 x 16 KB per mailengine worker) has been used once before
    the baseline: its first touch is a fixed cost, not a per-session one.
    Dovecot gets the same traffic."""
    deadline = time.monotonic() + timeout
    for _ in range(conns):
        with socket.create_connection((bl.HOST, port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            for _ in range(commands):
                if time.monotonic() > deadline:
                    return
                s.sendall(b"CAPA\r\n")
                while True:
                    line = f.readline()
                    if not line or line == b".\r\n" or line.startswith(b"-ERR"):
                        break
            s.sendall(b"QUIT\r\n")


def idle_part(start_target, exe, idle_users, warm_users, args, label):
    """On a freshly started target; returns the growth per session of each
    of MEM_KINDS."""
    t = start_target()
    try:
        held = Held(exe, t.port, warm_users, args.timeout)      # warm-up
        held.release()
        warm_receive_buffers(t.port)
        time.sleep(args.settle)
        m0 = memory(t)
        held = Held(exe, t.port, idle_users, args.timeout)
        try:
            time.sleep(args.settle)
            m1 = memory(t)
            n = held.info["held"]
        finally:
            held.release()
        mib = 2 ** 20
        bl.note(f"{t.name}/{label}: {n} sessions held (logins took {held.info['login_s']:.2f}s); "
                + ", ".join(f"{k} {m0[k] / mib:.1f} -> {m1[k] / mib:.1f} MiB" for k in MEM_KINDS)
                + f", processes {m0['procs']} -> {m1['procs']}")
        return {k: (m1[k] - m0[k]) / n for k in MEM_KINDS}
    finally:
        t.stop()


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description="POP3 RETR throughput and idle memory: mailengine vs Dovecot",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", dest="users", metavar="N", type=int, default=50,
                    help="mailboxes = concurrent clients (50)")
    ap.add_argument("--per-mailbox", dest="messages", metavar="N", type=int, default=1000,
                    help="messages per mailbox (1000)")
    ap.add_argument("--size", type=int, default=5120, help="message size, bytes (5120, +-256)")
    ap.add_argument("--rounds", "--repeat", dest="rounds", metavar="N", type=int, default=3,
                    help="measured rounds per server, alternating; the median is reported (3)")
    ap.add_argument("--max-other", type=float, default=0.2, metavar="F",
                    help="a round during which other work took more than F of a core is "
                         "run again (0.2)")
    ap.add_argument("--retry-noisy", type=int, default=2, metavar="N",
                    help="at most N repeats of a noisy round (2)")
    ap.add_argument("--quiet-wait", type=float, default=30, metavar="S",
                    help="before each round, wait up to S seconds for a second in which the "
                         "machine used less than --max-other of a core (30; 0: do not wait)")
    ap.add_argument("--idle-conns", type=int, default=500, help="held sessions for memory (500)")
    ap.add_argument("--idle-messages", type=int, default=10, help="messages per idle mailbox (10)")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds before reading memory")
    ap.add_argument("--workers", type=int, default=2, help="mailengine --workers (2)")
    ap.add_argument("--parts", default="retr,idle", help="retr,idle")
    ap.add_argument("--only", default="", help="comma-separated targets: mailengine,dovecot")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10 mailboxes x 200 messages, 50 idle sessions, 1 round")
    ap.add_argument("--profile", action="store_true",
                    help="perf record mailengine during extra rounds (shares by thread and symbol on stderr)")
    ap.add_argument("--mailengine-src", default=None, metavar="DIR",
                    help="run mailengine from this built source tree (python -m mailengine with "
                         "PYTHONPATH=DIR) instead of .venv/bin/mailengine")
    ap.add_argument("--timeout", type=float, default=600, help="per load run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--strict", action="store_true", help="exit 1 when mailengine fails")
    args, unknown = ap.parse_known_args()
    if unknown:
        bl.note(f"ignoring unknown arguments: {' '.join(unknown)}")
    if args.quick:
        for flags, attr, val in ((("--mailboxes",), "users", 10), (("--per-mailbox",), "messages", 200),
                                 (("--idle-conns",), "idle_conns", 50),
                                 (("--rounds", "--repeat"), "rounds", 1)):
            if not any(a == f or a.startswith(f + "=") for a in sys.argv for f in flags):
                setattr(args, attr, val)
    if not (1 <= args.users <= 2000 and 1 <= args.messages <= 100000 and 1 <= args.rounds <= 20
            and 0 <= args.idle_conns <= 5000 and 1 <= args.idle_messages <= 1000
            and 200 <= args.size <= 10 << 20):
        ap.error("out of range: --mailboxes 1..2000, --per-mailbox 1..100000, --rounds 1..20, "
                 "--idle-conns 0..5000, --idle-messages 1..1000, --size 200..10M")
    names = []
    for t in (t.strip() for t in args.only.split(",")):
        if t in ORDER and t not in names:
            names.append(t)
        elif t:
            bl.note(f"--only: {t!r} is not a server of this benchmark; ignored")
    if args.only and not names:
        bl.out("# SKIP pop3: none of the --only names is a server of this benchmark")
        return 0
    names = names or list(ORDER)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"retr", "idle"}:
        ap.error("--parts: retr and/or idle")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = bl.raise_nofile()
    if nofile < args.idle_conns * 2 + 100:
        bl.note(f"RLIMIT_NOFILE is {nofile}; fewer idle sessions than asked may open")
    root = bl.bench_tmp_root()
    workdir = tempfile.mkdtemp(prefix="mebench-pop3-", dir=root)
    os.chmod(workdir, 0o755)
    args.workdir = workdir
    harness_errors, me_failed = 0, False
    started = []
    try:
        skip = {}
        if "dovecot" in names:
            why = peer_dovecot.available()
            if why:
                skip["dovecot"] = why
        if args.mailengine_src:
            args.mailengine_src = os.path.abspath(args.mailengine_src)
            if not os.path.isfile(os.path.join(args.mailengine_src, "mailengine", "__main__.py")):
                ap.error(f"--mailengine-src {args.mailengine_src}: no mailengine/__main__.py there")
        elif "mailengine" in names and not os.access(bl.MAILENGINE, os.X_OK):
            skip["mailengine"] = "mailengine not built yet (.venv/bin/mailengine missing; run `make`)"
        for n, why in skip.items():
            bl.out(f"# SKIP {n}: {why}")
        names = [n for n in names if n not in skip]
        if not names:
            return 0

        bl.note(f"pop3: {args.users} mailboxes x {args.messages} msgs of ~{args.size} B, "
                f"{args.idle_conns} idle mailboxes x {args.idle_messages}; data under {workdir} "
                f"({bl._fs_type(root)}), {os.cpu_count()} cpus; dovecot {peer_dovecot.version()}")
        exe = build_client(workdir)
        me_data = os.path.join(workdir, "me-data")
        dv_root = os.path.join(workdir, "dovecot-mail")
        dv_uid = peer_dovecot.mail_uid() if os.geteuid() == 0 else None
        os.makedirs(os.path.join(me_data, "mailboxes", bl.DOMAIN), exist_ok=True)
        os.makedirs(os.path.join(dv_root, bl.DOMAIN), exist_ok=True)
        if dv_uid:
            os.chown(dv_root, *dv_uid)
        big = [f"user{i:03d}@{bl.DOMAIN}" for i in range(args.users)]
        small = [f"idle{i:04d}@{bl.DOMAIN}" for i in range(args.idle_conns)] if "idle" in parts else []
        warm = [f"warm{i:02d}@{bl.DOMAIN}" for i in range(10)] if "idle" in parts else []
        content = Content(args.size)
        t0 = time.monotonic()
        exp_bytes, exp_crc = 0, 0
        for u in big:
            local = u.split("@")[0]
            b, c = content.write_mailbox(os.path.join(me_data, "mailboxes", bl.DOMAIN, local),
                                         os.path.join(dv_root, bl.DOMAIN, local), u, args.messages, dv_uid)
            exp_bytes += b
            exp_crc += c
        for u in small + warm:
            local = u.split("@")[0]
            content.write_mailbox(os.path.join(me_data, "mailboxes", bl.DOMAIN, local),
                                  os.path.join(dv_root, bl.DOMAIN, local), u, args.idle_messages, dv_uid)
        all_users = big + small + warm
        with open(os.path.join(me_data, "users"), "w") as f:
            f.write("# generated by benchmarks/bench_pop3.py\n")
            for u in all_users:
                f.write(f"{u}:{{PLAIN}}{PASSWORD}\n")
        os.chmod(os.path.join(me_data, "users"), 0o600)
        bl.note(f"content written in {time.monotonic() - t0:.1f}s "
                f"({exp_bytes / 1e6:.0f} MB on the wire per round)")
        uf_big = write_userfile(os.path.join(workdir, "users-big"), big)
        uf_small = write_userfile(os.path.join(workdir, "users-idle"), small)
        uf_warm = write_userfile(os.path.join(workdir, "users-warm"), warm)
        dv_users = [(u, PASSWORD) for u in all_users]
        max_conns = max(args.users, args.idle_conns) + 20

        def make(name):
            if name == "mailengine":
                return MailenginePop3(workdir, me_data, args.workers, seq=len(started),
                                      src=args.mailengine_src)
            d = os.path.join(workdir, f"dovecot-{len(started)}")
            os.makedirs(d)
            os.chmod(d, 0o755)
            return DovecotTarget(d, dv_root, dv_users, max_conns=max_conns)

        def prime(name, t, userfiles, big=None):
            """Dovecot builds its index (and moves new/ to cur/) on a mailbox's
            first login: have that done before anything is measured, on both
            servers alike (for the big mailboxes, retrieving one message)."""
            for uf in userfiles:
                try:
                    run_load(exe, t.port, uf, args.timeout, max_msgs=1 if uf == big else 0)
                except TargetFailed as e:
                    bl.note(f"{name}: priming the mailboxes of {os.path.basename(uf)} failed: {e}")

        def start(name):
            t = make(name)
            started.append(t)
            try:
                t.start()
            except (RuntimeError, TargetFailed, bl.TargetUnavailable) as e:
                raise TargetFailed(f"start: {e}")
            return t

        # ---- RETR throughput
        if "retr" in parts:
            targets = {}
            for n in names:
                try:
                    targets[n] = start(n)
                    bl.note(f"{n}: POP3 on {bl.HOST}:{targets[n].port}")
                except TargetFailed as e:
                    bl.out(f"pop3_retr.{n}: FAILED")
                    bl.note(f"{n}: {e}")
                    if n == "mailengine":
                        me_failed = True
                    else:
                        harness_errors += 1
            if small:
                for n, t in targets.items():
                    prime(n, t, [uf_small, uf_warm])
            med, failed = retr_part(targets, exe, uf_big,
                                    (args.users * args.messages, exp_bytes, exp_crc), args)
            for n in names:
                if n in med:
                    bl.out(f"pop3_retr.{n}: {med[n]:.0f} msg/s")
                elif n in failed:
                    bl.out(f"pop3_retr.{n}: FAILED")
                    bl.note(f"{n}: {failed[n]}")
                    if n == "mailengine":
                        me_failed = True
                    else:
                        harness_errors += 1
            if "mailengine" in med and "dovecot" in med:
                bl.out(f"pop3_retr_vs_dovecot: {med['mailengine'] / med['dovecot']:.2f}")
            if "dovecot" in targets:
                problems = targets["dovecot"].log_problems()
                if problems:
                    bl.note(f"dovecot log has {len(problems)} error lines, e.g.: {problems[0]}")
            for t in targets.values():
                t.stop()

        # ---- idle memory
        if "idle" in parts and args.idle_conns > 0:
            if "retr" not in parts:
                for n in names:
                    try:
                        t = start(n)
                    except TargetFailed:
                        continue                  # reported below
                    try:
                        prime(n, t, [uf_small, uf_warm, uf_big], big=uf_big)
                    finally:
                        t.stop()
            cost_of = {}
            for label, uf, key in (("idle", uf_small, "pop3_idle_memory"),
                                   ("big", uf_big, "pop3_idle_memory_big")):
                for n in names:
                    try:
                        per = idle_part(lambda n=n: start(n), exe, uf, uf_warm, args, label)
                    except TargetFailed as e:
                        bl.out(f"{key}.{n}: FAILED")
                        bl.note(f"{n}/{label}: {e}")
                        if n == "mailengine":
                            me_failed = True
                        else:
                            harness_errors += 1
                        continue
                    cost = per["anon"] + per["pte"]
                    bl.out(f"{key}.{n}: {cost:.0f} bytes/conn")
                    bl.out(f"{key}.{n}_pss: {per['pss']:.0f} bytes/conn")
                    bl.out(f"{key}.{n}_rss: {per['rss']:.0f} bytes/conn")
                    if label == "idle":
                        cost_of[n] = cost
            if "mailengine" in cost_of and "dovecot" in cost_of and cost_of["mailengine"] > 0:
                bl.out(f"pop3_idle_memory_dovecot_vs_mailengine: "
                       f"{cost_of['dovecot'] / cost_of['mailengine']:.1f}")
    except bl.HarnessError as e:
        bl.note(f"harness error: {e}")
        harness_errors += 1
    finally:
        for t in started:
            try:
                t.stop()
            except Exception as e:  # noqa: BLE001
                bl.note(f"stopping {t.name}: {e}")
        if args.keep:
            bl.note(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if harness_errors:
        return 2
    if me_failed and args.strict:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
