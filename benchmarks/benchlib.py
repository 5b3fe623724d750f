"""Shared helpers for the mailengine benchmarks (stdlib only).

Every server here is started by the harness on 127.0.0.1 and a free port,
with its data in a fresh directory on the same disk as the repository, and
is stopped by the pid the harness got when starting it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import resource

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
VENV_BIN = os.path.join(REPO, ".venv", "bin")
MAILENGINE = os.path.join(VENV_BIN, "mailengine")
PEER_AIOSMTPD = os.path.join(BENCH_DIR, "peer_aiosmtpd.py")
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"

HOST = "127.0.0.1"
DOMAIN = "bench.test"


class HarnessError(Exception):
    """A problem of the harness or of a peer setup (not of a measured target)."""


class TargetUnavailable(Exception):
    """The target cannot be run here (binary missing, ...); reported as SKIP."""


def note(msg: str) -> None:
    """Diagnostics go to stderr so stdout keeps only result lines."""
    print("# " + msg, file=sys.stderr, flush=True)


def out(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- environment

def _fs_type(path: str) -> str:
    """Filesystem type of the mount containing path (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def bench_tmp_root() -> str:
    """A directory for data dirs on the same (real) disk as the repository.

    Uses the system temp dir when it is on the repository's device and not a
    tmpfs; otherwise REPO/build/bench-tmp.  The directory is made
    world-traversable (0755) because Postfix daemons run as user postfix.
    """
    tmp = tempfile.gettempdir()
    try:
        same_dev = os.stat(tmp).st_dev == os.stat(REPO).st_dev
    except OSError:
        same_dev = False
    if same_dev and _fs_type(tmp) not in ("tmpfs", "ramfs"):
        root = tmp
    else:
        root = os.path.join(REPO, "build", "bench-tmp")
        os.makedirs(root, exist_ok=True)
        # postfix (uid postfix) must be able to traverse to its queue dir
        for p in (os.path.join(REPO, "build"), root):
            os.chmod(p, 0o755)
    return root


def make_workdir(label: str) -> str:
    d = tempfile.mkdtemp(prefix=f"mebench-{label}-", dir=bench_tmp_root())
    os.chmod(d, 0o755)
    return d


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list:
    """n distinct free ports (held open together so they differ)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def python_with_aiosmtpd():
    """An interpreter that can import aiosmtpd: the repo venv first, then ours."""
    candidates = [os.path.join(VENV_BIN, "python"), sys.executable]
    for py in candidates:
        if not os.path.exists(py):
            continue
        r = subprocess.run([py, "-c", "import aiosmtpd"], capture_output=True, timeout=60)
        if r.returncode == 0:
            return py
    return None


# ---------------------------------------------------------------- SMTP bits

def read_reply(sock: socket.socket, deadline: float) -> bytes:
    """Read one (possibly multi-line) SMTP reply; returns the raw bytes."""
    buf = b""
    while True:
        # complete when the last line has "NNN " (not "NNN-")
        if buf.endswith(b"\n"):
            last = buf.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
            if len(last) >= 4 and last[3:4] == b" " or len(last) == 3:
                return buf
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for SMTP reply")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before SMTP reply")
        buf += chunk
        if len(buf) > 65536:
            raise ConnectionError("oversized SMTP reply")


def wait_for_banner(port: int, timeout: float, proc=None) -> None:
    """Poll until a 220 greeting arrives on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    last_err = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before accepting")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                reply = read_reply(s, min(deadline, time.monotonic() + 5))
                if reply.startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        read_reply(s, time.monotonic() + 2)
                    except OSError:
                        pass
                    return
                last_err = f"unexpected greeting {reply[:80]!r}"
        except OSError as e:
            last_err = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"no SMTP greeting on {HOST}:{port} within {timeout:.0f}s ({last_err})")


def wait_for_log(path: str, needle: str, timeout: float, proc) -> None:
    """Wait until a line containing needle (case-insensitive) is in path."""
    deadline = time.monotonic() + timeout
    needle = needle.lower()
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if needle.encode() in f.read().lower():
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before printing '{needle}'")
        time.sleep(0.05)
    raise RuntimeError(f"did not print '{needle}' within {timeout:.0f}s")


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- /proc

def _proc_stat(pid: int):
    """(ppid, pgrp, session) of pid, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[2]), int(rest[3])


def _all_pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid: int) -> list:
    """pid and all its descendants (by parent links)."""
    children = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st:
            children.setdefault(st[0], []).append(p)
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        todo.extend(children.get(p, []))
    return result


def session_members(sid: int) -> list:
    """All processes whose session id is sid (a daemon that called setsid)."""
    res = []
    for p in _all_pids():
        st = _proc_stat(p)
        if st and st[2] == sid:
            res.append(p)
    return res


def proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    st = _proc_stat(pid)
    if st is None:
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


def stop_popen(proc: subprocess.Popen, group: bool = False, timeout: float = 15) -> None:
    """SIGTERM (then SIGKILL) a process we started, by its pid.

    With group=True the process was started with start_new_session=True, so
    its process-group id is its own pid and the signal goes to that group
    (it and the workers it forked, nothing else).
    """
    if proc.poll() is not None and not group:
        return

    def send(sig):
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        note(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
        send(signal.SIGKILL)
        proc.wait(timeout=10)
    if group:
        # reap stragglers of the group (they were forked by our process)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = [p for p in _all_pids() if (_proc_stat(p) or (0, 0, 0))[1] == proc.pid and alive(p)]
            if not left:
                break
            time.sleep(0.1)
        else:
            send(signal.SIGKILL)


# ---------------------------------------------------------------- targets

class Target:
    """A server under test. start() -> ready on self.port; stop(); count()."""

    name = "?"

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def count(self):
        """Number of durably accepted messages, or None when not countable."""
        return None

    def pids(self) -> list:
        """Processes whose memory counts as the server's."""
        return []

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in self.pids())

    def pss(self) -> int:
        return sum(pss_bytes(p) for p in self.pids())

    def log_tail(self) -> str:
        return ""


class SinkTarget(Target):
    """Postfix smtp-sink: discards everything; the protocol ceiling."""

    name = "sink"

    def __init__(self, workdir, max_conns=1000):
        super().__init__(workdir)
        self.max_conns = max_conns
        self.proc = None
        self.log = os.path.join(workdir, "smtp-sink.log")

    def start(self):
        if not os.path.exists(SMTP_SINK):
            raise TargetUnavailable("smtp-sink not installed")
        self.port = free_port()
        # -u: required when run as root; -m: max concurrent sessions;
        # last argument: listen backlog.
        cmd = [SMTP_SINK, "-m", str(self.max_conns)]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"{HOST}:{self.port}", "1024"]
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_for_banner(self.port, 15, self.proc)

    def stop(self):
        if self.proc:
            stop_popen(self.proc)
            self.logf.close()

    def pids(self):
        return [self.proc.pid] if self.proc else []

    def log_tail(self):
        return tail(self.log)


class AiosmtpdTarget(Target):
    """benchmarks/peer_aiosmtpd.py: aiosmtpd + maildir with fsync of file and dir."""

    name = "aiosmtpd"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.proc = None
        self.maildir = os.path.join(workdir, "maildir")
        self.log = os.path.join(workdir, "aiosmtpd.log")

    def start(self):
        py = python_with_aiosmtpd()
        if py is None:
            raise TargetUnavailable("aiosmtpd is not importable (pip install aiosmtpd)")
        self.port = free_port()
        cmd = [py, PEER_AIOSMTPD, "--host", HOST, "--port", str(self.port), "--dir", self.maildir]
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        wait_for_log(self.log, "ready", 30, self.proc)
        wait_for_banner(self.port, 15, self.proc)

    def stop(self):
        if self.proc:
            stop_popen(self.proc)
            self.logf.close()

    def count(self):
        d = os.path.join(self.maildir, "new")
        return len(os.listdir(d)) if os.path.isdir(d) else 0

    def pids(self):
        return [self.proc.pid] if self.proc else []

    def log_tail(self):
        return tail(self.log)


def _postfix_main_cf_base(spool: str, data: str, limit: int) -> str:
    """main.cf lines both private Postfix instances share: their own queue
    and data directories, loopback only, no local delivery, no client
    limits, mail held on arrival (check_client_access static:HOLD)."""
    return f"""\
compatibility_level = 3.6
queue_directory = {spool}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {HOST}
inet_protocols = ipv4
myhostname = postfix.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $mydomain
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject
in_flow_delay = 0
default_process_limit = {limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
"""


class PostfixTarget(Target):
    """A private Postfix instance: smtpd -> cleanup -> durable queue file.

    Everything lives under workdir: config_directory (etc/), queue_directory
    (spool/), data_directory (data/) and the log (maillog, via postlogd).
    Mail from 127.0.0.0/8 is accepted and put on HOLD (check_client_access
    static:HOLD), so it stays in the durable queue and no delivery work
    competes with receiving.  in_flow_delay = 0 turns off Postfix's inflow
    throttling (which would otherwise pace smtpd to the delivery rate).
    """

    name = "postfix"

    def __init__(self, workdir, smtpd_maxproc=200):
        super().__init__(workdir)
        self.etc = os.path.join(workdir, "etc")
        self.spool = os.path.join(workdir, "spool")
        self.data = os.path.join(workdir, "data")
        self.maillog = os.path.join(workdir, "maillog")
        self.smtpd_maxproc = smtpd_maxproc
        self.master_pid = None

    def _write_config(self):
        os.makedirs(self.etc, exist_ok=True)
        os.makedirs(self.spool, mode=0o755, exist_ok=True)  # root-owned; postfix-script makes the rest
        limit = max(300, self.smtpd_maxproc + 50)
        main_cf = f"""\
# private benchmark instance generated by benchmarks/benchlib.py
{_postfix_main_cf_base(self.spool, self.data, limit)}disable_dns_lookups = yes
smtp_dns_support_level = disabled
maillog_file = {self.maillog}
maillog_file_prefixes = {self.workdir}
biff = no
"""
        # chroot column is "n" everywhere (no chroot); smtpd listens only on
        # 127.0.0.1:port; pickup/local/tlsmgr are not needed.
        master_cf = f"""\
{HOST}:{self.port} inet n - n - {self.smtpd_maxproc} smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(main_cf)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(master_cf)

    def start(self):
        if not os.path.exists(POSTFIX):
            raise TargetUnavailable("postfix not installed")
        if os.geteuid() != 0:
            raise TargetUnavailable("a private Postfix instance needs root")
        self.port = free_port()
        self._write_config()
        r = subprocess.run([POSTFIX, "-c", self.etc, "start"], capture_output=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise HarnessError(f"postfix start failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace')}\n{tail(self.maillog)}")
        pidfile = os.path.join(self.spool, "pid", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    self.master_pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.1)
        if not self.master_pid:
            raise HarnessError("postfix master did not write its pid file\n" + tail(self.maillog))
        try:
            wait_for_banner(self.port, 30)
        except RuntimeError as e:
            raise HarnessError(f"postfix smtpd not answering: {e}\n{tail(self.maillog)}")

    def stop(self):
        if not self.master_pid:
            return
        subprocess.run([POSTFIX, "-c", self.etc, "stop"], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        # master called setsid(): its session id is its pid; wait for the
        # whole instance (master and its children) to be gone.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = [p for p in session_members(self.master_pid) if alive(p)]
            if not left:
                break
            time.sleep(0.2)
        else:
            note(f"postfix instance (session {self.master_pid}) still running; SIGKILL by pid")
            for p in session_members(self.master_pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master_pid = None

    def count(self):
        """Messages in the queue, by postqueue -j (falls back to queue files)."""
        try:
            r = subprocess.run([POSTQUEUE, "-c", self.etc, "-j"], capture_output=True,
                               timeout=300, stdin=subprocess.DEVNULL)
            if r.returncode == 0:
                n = 0
                for line in r.stdout.splitlines():
                    if line.strip():
                        json.loads(line)
                        n += 1
                return n
            note(f"postqueue -j failed: {r.stderr.decode(errors='replace').strip()}")
        except (subprocess.TimeoutExpired, ValueError) as e:
            note(f"postqueue -j failed: {e}")
        return self.queue_files()

    def queue_files(self):
        n = 0
        for q in ("incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
        return n

    def pids(self):
        if not self.master_pid:
            return []
        return [p for p in session_members(self.master_pid) if alive(p)]

    def smtpd_pids(self):
        return [p for p in self.pids() if proc_comm(p) == "smtpd"]

    def log_problems(self):
        bad = []
        try:
            with open(self.maillog, errors="replace") as f:
                for line in f:
                    if any(w in line for w in (" warning: ", " fatal: ", " panic: ", " error: ")):
                        bad.append(line.rstrip())
        except OSError:
            pass
        return bad

    def log_tail(self):
        return tail(self.maillog)


class MailengineTarget(Target):
    """mailengine via its CLI (.venv/bin/mailengine serve ...)."""

    name = "mailengine"

    def __init__(self, workdir, workers=2):
        super().__init__(workdir)
        self.data = os.path.join(workdir, "data")
        self.log = os.path.join(workdir, "mailengine.log")
        self.workers = workers
        self.proc = None

    def start(self):
        if not os.access(MAILENGINE, os.X_OK):
            raise TargetUnavailable(f"{os.path.relpath(MAILENGINE, REPO)} not found "
                                    "(mailengine not built yet; run `make` first)")
        os.makedirs(self.data, exist_ok=True)
        self.port, sub_port, smtps_port = free_ports(3)
        cmd = [MAILENGINE, "serve", "--data", self.data,
               "--smtp", f"{HOST}:{self.port}",
               "--submission", f"{HOST}:{sub_port}",
               "--smtps", f"{HOST}:{smtps_port}",
               "--domain", DOMAIN, "--workers", str(self.workers),
               "--trusted-network", "127.0.0.0/8",
               # Receiving only, as Postfix's queue here: nothing is delivered
               # (and no DNS query leaves the machine).
               "--no-delivery"]
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_log(self.log, "ready", 60, self.proc)
            wait_for_banner(self.port, 15, self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"mailengine did not start: {e}\n{tail(self.log)}")

    def stop(self):
        if self.proc:
            stop_popen(self.proc, group=True, timeout=30)
            self.logf.close()
            self.proc = None

    def count(self):
        cmd = [MAILENGINE, "queue", "list", "--data", self.data, "--json"]
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            note("mailengine queue list timed out")
            return None
        if r.returncode != 0:
            note(f"mailengine queue list failed ({r.returncode}): "
                 f"{r.stderr.decode(errors='replace').strip()[:300]}")
            return None
        try:
            data = json.loads(r.stdout)
        except ValueError as e:
            note(f"mailengine queue list: bad JSON: {e}")
            return None
        if isinstance(data, dict):  # tolerate {"messages": [...]}
            for v in data.values():
                if isinstance(v, list):
                    data = v
                    break
        return len(data) if isinstance(data, list) else None

    def pids(self):
        if not self.proc or self.proc.poll() is not None:
            return []
        return [p for p in descendants(self.proc.pid) if alive(p)]

    def log_tail(self):
        return tail(self.log)


TARGETS = {
    "sink": SinkTarget,
    "postfix": PostfixTarget,
    "aiosmtpd": AiosmtpdTarget,
    "mailengine": MailengineTarget,
}


# ---------------------------------------------------------------- delivery benchmarks
#
# Helpers for benchmarks where mailengine and Postfix deliver *outbound*:
# a private network namespace (its own loopback 127.0.0.0/8, port 25 free,
# its own /etc/resolv.conf), counting smtp-sinks on 127.0.0.X:25, the local
# unbound from mailengine.testing.dns, and a Postfix instance that relays.

IP = shutil.which("ip") or "/usr/sbin/ip"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
NETNS_ETC = "/etc/netns"


class NetNS:
    """A network namespace made by the harness, with resolv.conf -> 127.0.0.1.

    `ip netns exec NAME cmd` runs cmd with the namespace's network (a fresh
    loopback, nothing else) and, in a private mount namespace, with
    /etc/netns/NAME/resolv.conf bind-mounted over /etc/resolv.conf; so
    libc's resolver (the one Postfix uses) asks the unbound on 127.0.0.1:53
    inside the namespace.  delete() removes the namespace and the files it
    made; processes inside must have been stopped before.
    """

    def __init__(self, name: str):
        self.name = name
        self.etc = os.path.join(NETNS_ETC, name)
        self.created = False
        self._made_netns_etc = False

    @staticmethod
    def available() -> str:
        """'' when network namespaces can be made here, else the reason."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if not os.access(IP, os.X_OK):
            return "iproute2 (ip) not installed"
        return ""

    def create(self) -> "NetNS":
        r = subprocess.run([IP, "netns", "add", self.name], capture_output=True, timeout=30)
        if r.returncode != 0:
            raise TargetUnavailable(f"ip netns add failed: {r.stderr.decode(errors='replace').strip()}")
        self.created = True
        self.run(["ip", "link", "set", "lo", "up"])
        if not os.path.isdir(NETNS_ETC):
            os.makedirs(NETNS_ETC)
            self._made_netns_etc = True
        os.makedirs(self.etc, exist_ok=True)
        with open(os.path.join(self.etc, "resolv.conf"), "w") as f:
            f.write("# written by the mailengine benchmark harness\n"
                    "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
        return self

    def prefix(self) -> list:
        """Command prefix that runs a command inside the namespace."""
        return [IP, "netns", "exec", self.name]

    def run(self, cmd: list, timeout: float = 30) -> str:
        r = subprocess.run(self.prefix() + cmd, capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise HarnessError(f"in netns {self.name}: {' '.join(cmd)}: "
                               f"{r.stderr.decode(errors='replace').strip()}")
        return r.stdout.decode(errors="replace")

    def pids(self) -> list:
        """Processes still inside the namespace (by `ip netns pids`)."""
        r = subprocess.run([IP, "netns", "pids", self.name], capture_output=True, timeout=30)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []

    def delete(self) -> None:
        if self.created:
            r = subprocess.run([IP, "netns", "del", self.name], capture_output=True, timeout=30)
            if r.returncode != 0:
                note(f"ip netns del {self.name}: {r.stderr.decode(errors='replace').strip()}")
            self.created = False
        shutil.rmtree(self.etc, ignore_errors=True)
        if self._made_netns_etc:
            try:
                os.rmdir(NETNS_ETC)
            except OSError:
                pass


def in_netns() -> bool:
    """True when this process runs in a network namespace other than init's."""
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:
        return False


def load_local_dns():
    """mailengine.testing.dns.LocalDNS (unbound on loopback).

    Imported from the package when it imports; otherwise the file is loaded
    on its own (it needs only the standard library), so the Postfix side of a
    benchmark runs even when the mailengine extension is not built.
    """
    try:
        from mailengine.testing.dns import LocalDNS  # noqa: PLC0415
        return LocalDNS
    except Exception:  # noqa: BLE001 - fall back to the file
        pass
    import importlib.util  # noqa: PLC0415
    path = os.path.join(REPO, "mailengine", "testing", "dns.py")
    if not os.path.exists(path):
        raise TargetUnavailable("mailengine/testing/dns.py not found")
    spec = importlib.util.spec_from_file_location("_mebench_dns", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclass/typing lookups need it registered
    spec.loader.exec_module(mod)
    return mod.LocalDNS


class CountingSink:
    """smtp-sink on addr:port with running counters (-c), read from a pipe.

    smtp-sink prints "sess=N quit=N mesg=N" plus a carriage return whenever a
    session ends, QUIT is executed or "." arrives, flushed at once; a reader
    thread keeps the latest mesg= value, so the harness knows when the sink
    has received a message count (and at what CLOCK_MONOTONIC time).
    Pipelining and ESMTP are announced (smtp-sink's defaults).
    """

    def __init__(self, addr: str, port: int = 25, max_conns: int = 1024, backlog: int = 1024):
        self.addr, self.port = addr, port
        self.max_conns, self.backlog = max_conns, backlog
        self.proc = None
        self.mesg = 0
        self.sess = 0
        self.when = 0.0  # CLOCK_MONOTONIC when mesg last went up
        self.cond = None
        self.thread = None
        self.stderr_tail = b""

    def start(self) -> "CountingSink":
        import threading  # noqa: PLC0415
        if not os.path.exists(SMTP_SINK):
            raise TargetUnavailable("smtp-sink not installed")
        cmd = [SMTP_SINK, "-c", "-m", str(self.max_conns), "-h", f"sink-{self.addr}"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"{self.addr}:{self.port}", str(self.backlog)]
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"smtp-sink on {self.addr}:{self.port} exited "
                                   f"{self.proc.returncode}: {self.stderr_tail.decode(errors='replace')}")
            try:
                with socket.create_connection((self.addr, self.port), timeout=2):
                    break  # a bare connect; the sink counts it as a session only
            except OSError as e:
                last = e
                time.sleep(0.05)
        else:
            raise HarnessError(f"smtp-sink on {self.addr}:{self.port} not accepting: {last}")
        return self

    def _reader(self):
        fd = self.proc.stdout.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            pending += chunk
            cut = pending.rfind(b"\r")
            if cut < 0:
                if len(pending) > 4096:  # not counters: keep a bit for errors
                    self.stderr_tail = pending[-1024:]
                    pending = b""
                continue
            done, pending = pending[:cut], pending[cut + 1:]
            last = done.rsplit(b"\r", 1)[-1]
            mesg = sess = None
            for field in last.split():
                if field.startswith(b"mesg="):
                    mesg = int(field[5:])
                elif field.startswith(b"sess="):
                    sess = int(field[5:])
            if mesg is None:
                self.stderr_tail = (self.stderr_tail + done)[-1024:]
                continue
            with self.cond:
                if mesg != self.mesg:
                    self.mesg, self.when = mesg, now
                self.sess = sess if sess is not None else self.sess
                self.cond.notify_all()
        with self.cond:
            self.stderr_tail = (self.stderr_tail + pending)[-1024:]
            self.cond.notify_all()

    def stop(self):
        if self.proc:
            stop_popen(self.proc)
            self.proc.stdout.close()
            self.thread.join(timeout=5)
            self.proc = None


def wait_sinks(sinks: list, total: int, deadline: float, on_tick=None):
    """Wait until the sinks together have received total messages.

    Returns (CLOCK_MONOTONIC time of the message that reached total, count);
    on timeout returns (None, count).  on_tick() is called about every 0.05 s
    and may raise to abort (e.g. when the sender died).
    """
    while True:
        n, when = 0, 0.0
        for s in sinks:
            with s.cond:
                n += s.mesg
                when = max(when, s.when)
        if n >= total:
            return when, n
        if time.monotonic() >= deadline:
            return None, n
        if any(s.proc is None or s.proc.poll() is not None for s in sinks):
            raise HarnessError("an smtp-sink exited during the run")
        if on_tick is not None:
            on_tick()
        time.sleep(0.05)  # the times come from the reader threads, not from here


class PostfixRelayTarget(PostfixTarget):
    """A private Postfix that relays: smtpd takes mail from 127.0.0.0/8 onto
    HOLD (as PostfixTarget), and the smtp client delivers to the MX hosts
    that libc's resolver finds (so run it where resolv.conf points at the
    test DNS, e.g. inside a NetNS).

    Tuned for a bulk run to cooperative sinks: connection cache on for every
    destination, no TLS, IPv4 only, slow start off (initial concurrency =
    limit), `concurrency` connections per destination and `smtp_procs` smtp
    processes in all, every message of the run in the active queue at once.
    """

    name = "postfix"

    def __init__(self, workdir, concurrency=100, smtp_procs=100, per_connection=1000,
                 messages=20000, smtpd_maxproc=50):
        super().__init__(workdir, smtpd_maxproc=smtpd_maxproc)
        self.concurrency = concurrency
        self.smtp_procs = smtp_procs
        self.per_connection = per_connection
        self.active_limit = max(20000, messages + 1000)

    def _write_config(self):
        os.makedirs(self.etc, exist_ok=True)
        os.makedirs(self.spool, mode=0o755, exist_ok=True)
        limit = max(self.smtp_procs, self.smtpd_maxproc) + 50
        main_cf = f"""\
# private benchmark instance generated by benchmarks/benchlib.py (relaying)
{_postfix_main_cf_base(self.spool, self.data, limit)}# delivery: MX lookups through libc's resolver (/etc/resolv.conf)
smtp_host_lookup = dns
smtp_dns_support_level = enabled
smtp_address_preference = ipv4
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes
smtp_connection_cache_destinations = static:all
smtp_connection_reuse_count_limit = {self.per_connection}
default_destination_concurrency_limit = {self.concurrency}
smtp_destination_concurrency_limit = {self.concurrency}
initial_destination_concurrency = {self.concurrency}
smtp_destination_rate_delay = 0
qmgr_message_active_limit = {self.active_limit}
qmgr_message_recipient_limit = {self.active_limit}
default_recipient_limit = {self.active_limit}
# its "mail for X is using up N of M active queue entries" hints describe
# exactly this benchmark (one destination with the whole queue)
qmgr_clog_warn_time = 0
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 10s
delay_warning_time = 0
maillog_file = {self.maillog}
maillog_file_prefixes = {self.workdir}
biff = no
"""
        # No chroot anywhere ("n" in the 5th column), so smtp reads the
        # namespace's /etc/resolv.conf; pickup only because `postqueue -f`
        # checks for it; no local/tlsmgr.
        master_cf = f"""\
{HOST}:{self.port} inet n - n - {self.smtpd_maxproc} smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - {self.smtp_procs} smtp
relay     unix  - - n - {self.smtp_procs} smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(main_cf)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(master_cf)

    def queue_counts(self) -> dict:
        """Files per queue directory (incoming, active, deferred, hold)."""
        res = {}
        for q in ("incoming", "active", "deferred", "hold"):
            n = 0
            for _root, _dirs, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
            res[q] = n
        return res

    def release_hold(self) -> None:
        """Move every held message to the deferred queue and ask for a
        delivery run of the whole queue now (postsuper -H ALL; postqueue -f)."""
        for cmd in ([POSTSUPER, "-c", self.etc, "-H", "ALL"], [POSTQUEUE, "-c", self.etc, "-f"]):
            r = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise HarnessError(f"{' '.join(cmd)} failed ({r.returncode}): "
                                   f"{r.stderr.decode(errors='replace').strip()}")

    def log_status_counts(self) -> dict:
        """Delivery outcomes in the maillog: {'sent': n, 'deferred': n, ...}."""
        counts = {}
        try:
            with open(self.maillog, errors="replace") as f:
                for line in f:
                    i = line.find(" status=")
                    if i >= 0 and "postfix/smtp[" in line:
                        st = line[i + 8:].split(None, 1)[0]
                        counts[st] = counts.get(st, 0) + 1
        except OSError:
            pass
        return counts
