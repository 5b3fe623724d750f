"""The MX resolver (csrc/dns/resolver.c) against a real unbound on loopback.

tests/c/test_resolver.c does the lookups on a real io_uring loop; this file
serves it the zone below (whose names that program knows), a server that
never answers, and a server with odd manners (no EDNS, forged answers)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailengine.testing.dns import LocalDNS, unbound_path
from test_c_units import REPO, SUMMARY_RE, build_c, output_of

pytestmark = pytest.mark.skipif(unbound_path() is None,
                                reason="unbound is not installed (make deps installs it)")

LONG = "x" * 55

ZONE = [
    "ZONE mx.test.",
    # several preferences, three equal ones in the middle
    "multi.mx.test. 300 IN MX 10 a.multi.mx.test.",
    "multi.mx.test. 300 IN MX 20 b1.multi.mx.test.",
    "multi.mx.test. 300 IN MX 20 b2.multi.mx.test.",
    "multi.mx.test. 300 IN MX 20 b3.multi.mx.test.",
    "multi.mx.test. 300 IN MX 30 c.multi.mx.test.",
    "a.multi.mx.test. 300 IN A 127.0.0.2",
    "b1.multi.mx.test. 300 IN A 127.0.0.3",
    "b2.multi.mx.test. 300 IN A 127.0.0.4",
    "b3.multi.mx.test. 300 IN A 127.0.0.5",
    "c.multi.mx.test. 300 IN A 127.0.0.6",
    # implicit MX
    "a-only.mx.test. 300 IN A 127.0.0.10",
    "aaaa-only.mx.test. 300 IN AAAA ::1",
    "both.mx.test. 300 IN A 127.0.0.11",
    "both.mx.test. 300 IN AAAA ::1",
    # null MX, alone and among others (RFC 7505)
    "null.mx.test. 300 IN MX 0 .",
    "nullmix.mx.test. 300 IN MX 10 good.mx.test.",
    "nullmix.mx.test. 300 IN MX 20 .",
    # NODATA for everything
    'txt-only.mx.test. 300 IN TXT "no mail here"',
    # CNAMEs (unbound's local data does not chase them: we ask again)
    "cname.mx.test. 300 IN CNAME target.mx.test.",
    "target.mx.test. 300 IN A 127.0.0.12",
    "mxcname.mx.test. 300 IN MX 10 alias.mx.test.",
    "alias.mx.test. 300 IN CNAME real.mx.test.",
    "real.mx.test. 300 IN A 127.0.0.13",
    "loop.mx.test. 300 IN CNAME loop2.mx.test.",
    "loop2.mx.test. 300 IN CNAME loop.mx.test.",
    # MX hosts without addresses
    "partial.mx.test. 300 IN MX 10 noaddr.mx.test.",
    "partial.mx.test. 300 IN MX 20 good.mx.test.",
    'noaddr.mx.test. 300 IN TXT "no address"',
    "good.mx.test. 300 IN A 127.0.0.14",
    "nohost.mx.test. 300 IN MX 10 missing.mx.test.",
    "halftemp.mx.test. 300 IN MX 10 h.broken.test.",
    "halftemp.mx.test. 300 IN MX 20 missing.mx.test.",
    "halfok.mx.test. 300 IN MX 10 h.broken.test.",
    "halfok.mx.test. 300 IN MX 20 good.mx.test.",
    # IPv6, and more addresses than a host keeps
    "v6.mx.test. 300 IN AAAA ::1",
    "v6.mx.test. 300 IN AAAA ::2",
    *[f"many.mx.test. 300 IN A 127.0.1.{i}" for i in range(1, 7)],
    *[f"many.mx.test. 300 IN AAAA ::a{i}" for i in range(1, 7)],
    # answers over 1232 octets: TC, then TCP
    *[f"big.mx.test. 300 IN MX {p} h{p:02d}-{LONG}.mx.test."
      for p in (17, 3, 29, 1, 12, 8, 30, 22, 5, 14, 2, 19, 26, 9, 11, 24, 4, 16, 28, 7, 21,
                13, 6, 27, 10, 18, 25, 15, 23, 20)],
    *[f"h{p:02d}-{LONG}.mx.test. 300 IN A 127.0.0.20" for p in range(1, 31)],
    *[f"manya.mx.test. 300 IN A 127.0.2.{i}" for i in range(1, 101)],
    # cache, coalescing, cancel
    "cached.mx.test. 300 IN MX 10 good.mx.test.",
    "coal.mx.test. 300 IN MX 10 coalhost.mx.test.",
    "coalhost.mx.test. 300 IN A 127.0.0.15",
    "cancel1.mx.test. 300 IN MX 10 good.mx.test.",
    "cancel2.mx.test. 300 IN MX 10 good.mx.test.",
    # RFC 2308: negative answers of this zone live min(1, 1) = 1 second
    "ZONE neg.test.",
    "neg.test. 1 IN SOA ns.neg.test. hostmaster.neg.test. 1 3600 600 86400 1",
    "short.neg.test. 1 IN A 127.0.0.16",
]


def _dns_header(qid: int, flags: int, qd: int, an: int) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, 0, 0)


class OddDNS:
    """A UDP server that answers a query carrying EDNS with FORMERR (as a
    server without EDNS does), and otherwise sends a forged answer (another
    id) before the real one: A 127.0.0.99, no AAAA."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "OddDNS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            if len(data) < 12:
                continue
            qid, _flags, qd, _an, _ns, ar = struct.unpack(">HHHHHH", data[:12])
            pos = 12
            while pos < len(data) and data[pos]:
                pos += 1 + data[pos]
            end = pos + 5
            if qd != 1 or end > len(data):
                continue
            question = data[12:end]
            qtype = struct.unpack(">H", data[end - 4:end - 2])[0]
            if ar:
                self.sock.sendto(_dns_header(qid, 0x8181, 1, 0) + question, peer)
                continue
            answer = b""
            if qtype == 1:
                answer = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([127, 0, 0, 99])
            body = question + answer
            an = 1 if answer else 0
            self.sock.sendto(_dns_header(qid ^ 0x5A5A, 0x8180, 1, an) + body, peer)
            self.sock.sendto(_dns_header(qid, 0x8180, 1, an) + body, peer)


@pytest.fixture(scope="module")
def local_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDNS]:
    with LocalDNS(tmp_path_factory.mktemp("unbound"), ZONE, servfail_zones=["broken.test"]) as d:
        yield d


def test_resolver_against_unbound(local_dns: LocalDNS, tmp_path: Path) -> None:
    exe = tmp_path / "test_resolver"
    build_c(REPO / "tests" / "c" / "test_resolver.c", exe)
    # A socket that takes datagrams and never answers them.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead, OddDNS() as odd:
        dead.bind(("127.0.0.1", 0))
        env = dict(os.environ,
                   MAILENGINE_TEST_DNS=local_dns.address,
                   MAILENGINE_TEST_DNS_DEAD="127.0.0.1:%d" % dead.getsockname()[1],
                   MAILENGINE_TEST_DNS_ODD=odd.address)
        run = subprocess.run([str(exe)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    out = output_of(run) + "\n--- unbound ---\n" + local_dns.log()
    lines = run.stdout.strip().splitlines()
    summary = SUMMARY_RE.match(lines[-1]) if lines else None
    assert run.returncode == 0, out
    assert summary and int(summary.group(1)) > 200 and summary.group(2) == "0", out


# -- the helper itself ------------------------------------------------------------

def _ask(port: int, name: str, qtype: int, tcp: bool = False) -> tuple[int, int, int, bytes]:
    """(rcode, answer count, authority count, raw) of one query."""
    wire = b"".join(bytes([len(x)]) + x.encode() for x in name.split(".")) + b"\0"
    msg = _dns_header(0x4242, 0x0100, 1, 0) + wire + struct.pack(">HH", qtype, 1)
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(struct.pack(">H", len(msg)) + msg)
            raw = b""
            while len(raw) < 2 or len(raw) < 2 + struct.unpack(">H", raw[:2])[0]:
                chunk = s.recv(65536)
                assert chunk, "connection closed early"
                raw += chunk
            raw = raw[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(msg, ("127.0.0.1", port))
            raw = s.recv(65535)
    _qid, flags, _qd, an, ns, _ar = struct.unpack(">HHHHHH", raw[:12])
    return flags & 0xF, an, ns, raw


def test_local_dns_serves_the_zone(local_dns: LocalDNS) -> None:
    assert local_dns.address == f"127.0.0.1:{local_dns.port}"
    rcode, an, _, _ = _ask(local_dns.port, "multi.mx.test", 15)
    assert (rcode, an) == (0, 5)
    rcode, an, ns, _ = _ask(local_dns.port, "missing.mx.test", 1)
    assert (rcode, an, ns) == (3, 0, 1), "unknown name: NXDOMAIN with the SOA"
    rcode, an, ns, _ = _ask(local_dns.port, "txt-only.mx.test", 15)
    assert (rcode, an, ns) == (0, 0, 1), "NODATA with the SOA"
    rcode, _, _, _ = _ask(local_dns.port, "x.broken.test", 15)
    assert rcode == 2, "servfail zone"
    rcode, _, _, _ = _ask(local_dns.port, "example.com", 1)
    assert rcode == 5, "names outside the zones are refused, never looked up"
    rcode, an, _, raw = _ask(local_dns.port, "big.mx.test", 15)
    assert struct.unpack(">H", raw[2:4])[0] & 0x0200 or len(raw) <= 512, "big answer over UDP"
    rcode, an, _, raw = _ask(local_dns.port, "big.mx.test", 15, tcp=True)
    assert (rcode, an) == (0, 30) and len(raw) > 1232


def test_local_dns_start_stop(tmp_path: Path) -> None:
    d = LocalDNS(tmp_path, ["one.test. 60 IN A 127.0.0.1"])
    with d:
        pid = d.proc.pid if d.proc else None
        assert pid and _ask(d.port, "one.test", 1)[:2] == (0, 1)
        assert (tmp_path / "unbound.conf").is_file()
    assert d.proc is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
