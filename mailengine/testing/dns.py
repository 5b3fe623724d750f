"""A real DNS server for tests: unbound on loopback, serving a test zone.

Nothing is forwarded anywhere: every zone is an unbound local zone, names
outside them are refused, and the root hints point at loopback, so a query
can never leave the machine. Zones named in ``servfail_zones`` are delegated
to a closed loopback port, so unbound answers SERVFAIL for them.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType

__all__ = ["LocalDNS", "unbound_path"]

START_TIMEOUT = 10.0
# Variables of a sanitizer run of the test suite that must not reach unbound.
_DROP_ENV = ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS")


def unbound_path() -> str | None:
    """Where the unbound binary is, or None when it is not installed."""
    found = shutil.which("unbound")
    if found:
        return found
    for candidate in ("/usr/sbin/unbound", "/usr/local/sbin/unbound"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def _closed_port() -> int:
    """A loopback port nobody listens on (UDP and TCP), for SERVFAIL zones."""
    return _free_port()


def _fqdn(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _zone_of(name: str) -> str:
    """The name's last two labels: 'mx1.dest1.test.' -> 'dest1.test.'."""
    labels = [x for x in _fqdn(name).split(".") if x]
    return ".".join(labels[-2:]) + "."


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _query(port: int, name: str, qtype: int = 6, timeout: float = 0.5) -> bytes | None:
    """One UDP query to 127.0.0.1:port; the answer, or None on timeout."""
    qid = secrets.randbits(16)
    wire = b"".join(bytes([len(x)]) + x.encode() for x in name.rstrip(".").split(".") if x)
    msg = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + b"\0" + struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(msg, ("127.0.0.1", port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data = s.recv(65535)
                if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                    return data
        except OSError:
            return None
    return None


class LocalDNS:
    """unbound on 127.0.0.1:<port> answering for the given zone lines, nothing
    forwarded to the internet.

    ``records`` are zone-file lines ("dest1.test. 300 IN MX 10 mx1.dest1.test.").
    Each record belongs to the zone made of its name's last two labels, unless
    "ZONE example.test." lines name zones explicitly (then a record belongs to
    the longest named zone that contains it). Every zone is served as an
    unbound "static" local zone, so unknown names are NXDOMAIN, with an SOA
    (TTL 60, MINIMUM 60) unless the records give one; negative answers thus
    carry a TTL. ``servfail_zones`` answer SERVFAIL to every query.
    """

    def __init__(self, workdir: Path, records: list[str], *, port: int | None = None,
                 servfail_zones: list[str] = ()) -> None:  # type: ignore[assignment]
        self.workdir = Path(workdir)
        self.records = list(records)
        self.servfail_zones = [_fqdn(z) for z in servfail_zones]
        self._fixed_port = port
        self.port = port or 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = self.workdir / "unbound.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- configuration ---------------------------------------------------

    def _zones(self) -> tuple[dict[str, list[str]], list[str]]:
        explicit = []
        data = []
        for line in self.records:
            text = line.strip()
            if not text or text.startswith(";"):
                continue
            if text.split()[0].upper() == "ZONE":
                explicit.append(_fqdn(text.split()[1]))
            else:
                data.append(text)
        zones: dict[str, list[str]] = {z: [] for z in explicit}
        for text in data:
            name = _fqdn(text.split()[0])
            inside = [z for z in explicit if name == z or name.endswith("." + z)]
            zone = max(inside, key=len) if inside else _zone_of(name)
            zones.setdefault(zone, []).append(text)
        return zones, data

    def config_text(self) -> str:
        zones, _ = self._zones()
        lines = [
            "server:",
            f"    interface: 127.0.0.1@{self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            "    do-udp: yes",
            "    do-tcp: yes",
            f"    directory: {_quote(str(self.workdir))}",
            '    username: ""',
            '    chroot: ""',
            '    pidfile: ""',
            '    logfile: ""',
            "    use-syslog: no",
            "    do-daemonize: no",
            "    verbosity: 1",
            "    num-threads: 1",
            "    so-reuseport: no",
            '    module-config: "iterator"',
            # Answers straight from the local zones; nothing is cached that
            # could blur a test's TTLs, and the order of records is kept.
            "    rrset-roundrobin: no",
            "    minimal-responses: yes",
            "    msg-cache-size: 0",
            "    rrset-cache-size: 0",
            "    edns-buffer-size: 1232",
            "    max-udp-size: 1232",
            "    do-not-query-localhost: no",
            "    access-control: 127.0.0.0/8 allow",
            # Every delegation failure ends quickly in SERVFAIL.
            "    infra-host-ttl: 1",
            "    outbound-msg-retry: 1",
            "    unknown-server-time-limit: 50",
            "    infra-cache-min-rtt: 20",
            # Nothing reaches the internet: the root hints name only a
            # loopback address, and names outside our zones are refused.
            f"    root-hints: {_quote(str(self.workdir / 'root.hints'))}",
            '    local-zone: "." refuse',
        ]
        for zone, recs in sorted(zones.items()):
            lines.append(f"    local-zone: {_quote(zone)} static")
            if not any(r.split()[0].lower().rstrip(".") + "." == zone and " SOA " in f" {r.upper()} "
                       for r in recs):
                lines.append("    local-data: " + _quote(
                    f"{zone} 60 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 60"))
            for rec in recs:
                lines.append("    local-data: " + _quote(rec))
        closed = _closed_port()
        for zone in self.servfail_zones:
            lines.append(f"    local-zone: {_quote(zone)} transparent")
        for zone in self.servfail_zones:
            lines += [
                "stub-zone:",
                f"    name: {_quote(zone)}",
                f"    stub-addr: 127.0.0.1@{closed}",
                "    stub-prime: no",
            ]
        return "\n".join(lines) + "\n"

    # -- running -----------------------------------------------------------

    def start(self) -> "LocalDNS":
        """Write unbound.conf into workdir, start unbound in the foreground
        and wait until it answers a real query."""
        exe = unbound_path()
        if exe is None:
            raise RuntimeError("unbound is not installed (apt-get install unbound)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "root.hints").write_text(
            ".                 3600000 IN NS local-root.invalid.\n"
            "local-root.invalid. 3600000 IN A 127.0.0.1\n")
        env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        last = ""
        for _ in range(1 if self._fixed_port else 3):
            if not self._fixed_port:
                self.port = _free_port()
            conf = self.workdir / "unbound.conf"
            conf.write_text(self.config_text())
            check = subprocess.run([exe + "-checkconf" if os.access(exe + "-checkconf", os.X_OK)
                                    else "unbound-checkconf", str(conf)],
                                   capture_output=True, text=True, env=env)
            if check.returncode != 0:
                raise RuntimeError(f"unbound.conf refused:\n{check.stdout}{check.stderr}")
            with self._stderr_path.open("wb") as err:
                self.proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=subprocess.STDOUT, env=env,
                                             cwd=self.workdir)
            probe = self._probe_name()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _query(self.port, probe, timeout=0.2) is not None:
                    return self
                time.sleep(0.05)
            self._kill()
            last = self._stderr_path.read_text(errors="replace")
            if "bind" not in last.lower() and "address already in use" not in last.lower():
                break
        raise RuntimeError(f"unbound did not start on {self.address}:\n{last}")

    def _probe_name(self) -> str:
        zones, _ = self._zones()
        return next(iter(sorted(zones)), "localhost.")

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Terminate unbound (by its pid) and wait for it."""
        self._kill()

    def log(self) -> str:
        """What unbound wrote to stderr so far."""
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "LocalDNS":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
