"""Fixtures for the outbound-delivery tests (tests/test_delivery.py): the DNS
zone every test resolves through, an engine factory that collects delivery
events, DSN parsing, DKIM keys and a bounded line reader for CLI processes.

Everything stays on loopback: the engine always gets the test unbound as its
resolver (``dns=``), MX hosts are sinks on 127.0.0.x, and every wait is
bounded.
"""
from __future__ import annotations

import base64
import email
import email.policy
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from conftest import Ports, make_config
from mailengine import Engine
from mailengine.delivery import DeliveryEvent
from sinks import Received, SinkGroup

# ---- the zone -------------------------------------------------------------------------

# Sender domain: DSNs to <...@src.test> land on the sink at SRC_IP.
SRC_IP = "127.0.0.10"
SENDER = "sender@src.test"
# d1.test .. d8.test, each with its own MX host on 127.0.0.2 .. 127.0.0.9.
MX_IPS = [f"127.0.0.{i}" for i in range(2, 10)]
DOMAINS = [f"d{i}.test" for i in range(1, 9)]
# Loopback addresses nobody listens on.
DEAD_IP = "127.0.0.20"
RELAY_IP = "127.0.0.11"
RELAY_NAME = "smarthost.test"


def _mx(domain: str, host: str, ip: str, pref: int = 10) -> list[str]:
    return [f"{domain}. 300 IN MX {pref} {host}.", f"{host}. 300 IN A {ip}"]


def zone_records() -> list[str]:
    recs: list[str] = []
    for dom, ip in zip(DOMAINS, MX_IPS):
        recs += _mx(dom, f"mx.{dom}", ip)
    recs += _mx("src.test", "mx.src.test", SRC_IP)
    # A second name per sink for tests that configure per-domain policies.
    for name, ip in (("dest", "127.0.0.2"), ("other", "127.0.0.3"), ("tls", "127.0.0.4"),
                     ("notls", "127.0.0.5"), ("cleartext", "127.0.0.4"),
                     ("verify", "127.0.0.6"),
                     ("utf8no", "127.0.0.7"), ("utf8yes", "127.0.0.8"),
                     ("slow", "127.0.0.2"), ("fast", "127.0.0.3"),
                     ("reject", "127.0.0.9")):
        recs += _mx(f"{name}.test", f"mx.{name}.test", ip)
    # Same MX host as verify.test (so the certificate name matches), other CA.
    recs.append("badca.test. 300 IN MX 10 mx.verify.test.")
    # Implicit MX: only an address record (RFC 5321 §5.1).
    recs.append("implicit.test. 300 IN A 127.0.0.3")
    # An MX host that is an alias of a host in another zone.
    recs += ["cname.test. 300 IN MX 10 mx.cname.test.",
             "mx.cname.test. 300 IN CNAME real.target.test.",
             "real.target.test. 300 IN A 127.0.0.4"]
    # Null MX (RFC 7505).
    recs.append("nullmx.test. 300 IN MX 0 .")
    # An explicit zone with nothing in it: every name below it is NXDOMAIN.
    recs.append("ZONE nx.test.")
    # Next MX: the preferred host is dead, or says 421 in its greeting.
    recs += ["nextmx.test. 300 IN MX 10 mx1.nextmx.test.",
             "nextmx.test. 300 IN MX 20 mx2.nextmx.test.",
             f"mx1.nextmx.test. 300 IN A {DEAD_IP}",
             "mx2.nextmx.test. 300 IN A 127.0.0.3",
             "busy.test. 300 IN MX 10 mx1.busy.test.",
             "busy.test. 300 IN MX 20 mx2.busy.test.",
             "mx1.busy.test. 300 IN A 127.0.0.4",
             "mx2.busy.test. 300 IN A 127.0.0.5",
             "refusing.test. 300 IN MX 10 mx1.refusing.test.",
             "refusing.test. 300 IN MX 20 mx2.refusing.test.",
             "mx1.refusing.test. 300 IN A 127.0.0.6",
             "mx2.refusing.test. 300 IN A 127.0.0.5"]
    recs.append(f"{RELAY_NAME}. 300 IN A {RELAY_IP}")
    # One MX host with two addresses, the first one dead.
    recs += ["multi.test. 300 IN MX 10 mx.multi.test.",
             f"mx.multi.test. 300 IN A {DEAD_IP}",
             "mx.multi.test. 300 IN A 127.0.0.3"]
    # A domain whose only MX host refuses every connection.
    recs += _mx("dead.test", "mx.dead.test", DEAD_IP)
    return recs


SERVFAIL_ZONES = ["broken.test"]

# ---- messages -------------------------------------------------------------------------


def message(subject: str, *, frm: str = SENDER, to: str = "someone@d1.test",
            body: str = "hello\r\n", extra: str = "") -> bytes:
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            f"Message-ID: <{subject.replace(' ', '.')}@src.test>\r\n\r\n{body}").encode()


def subject_of(data: bytes) -> str | None:
    m = re.search(rb"^Subject: (.*?)\r?$", data, re.M | re.I)
    return m.group(1).decode() if m else None


# ---- events ---------------------------------------------------------------------------


class Events:
    """Collects DeliveryEvents from an engine's on_delivery callback."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.items: list[DeliveryEvent] = []

    def __call__(self, ev: DeliveryEvent) -> None:
        with self._cond:
            self.items.append(ev)
            self._cond.notify_all()

    def snapshot(self) -> list[DeliveryEvent]:
        with self._cond:
            return list(self.items)

    def select(self, type: str | None = None, *, recipient: str | None = None,
               queue_id: str | None = None) -> list[DeliveryEvent]:
        return [e for e in self.snapshot()
                if (type is None or e.type == type)
                and (recipient is None or e.recipient == recipient)
                and (queue_id is None or e.queue_id == queue_id)]

    def wait(self, n: int = 1, type: str | None = None, *, recipient: str | None = None,
             queue_id: str | None = None, timeout: float = 10.0) -> list[DeliveryEvent]:
        """At least n matching events within timeout, else AssertionError
        listing every event seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self.select(type, recipient=recipient, queue_id=queue_id)
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n  ".join(f"{e.type} {e.queue_id} {e.recipient} {e.code} {e.enhanced} "
                                       f"{e.text!r} attempt={e.attempt} mx={e.mx} ip={e.ip}"
                                       for e in self.items)
                    raise AssertionError(
                        f"{len(got)} of {n} {type or 'any'} events (recipient={recipient}, "
                        f"queue_id={queue_id}) after {timeout}s; all events:\n  {seen}")
                self._cond.wait(left)


FINAL = ("delivered", "bounced", "expired")


def wait_final(events: "Events", *, recipient: str | None = None, queue_id: str | None = None,
               timeout: float = 10.0) -> DeliveryEvent:
    """The first final event (delivered, bounced or expired) that matches, so a
    test expecting one outcome fails at once on another."""
    deadline = time.monotonic() + timeout
    while True:
        final = [e for e in events.select(recipient=recipient, queue_id=queue_id)
                 if e.type in FINAL]
        if final:
            return final[0]
        if time.monotonic() >= deadline:
            events.wait(1, "delivered", recipient=recipient, queue_id=queue_id, timeout=0)
        time.sleep(0.02)


def read_events_file(data_dir: Path) -> list[DeliveryEvent]:
    path = Path(data_dir) / "events.jsonl"
    if not path.exists():
        return []
    # Whole lines only: the last may still be being written.
    return [DeliveryEvent.from_json(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def wait_events_file(data_dir: Path, n: int, timeout: float = 5.0) -> list[DeliveryEvent]:
    deadline = time.monotonic() + timeout
    while True:
        got = read_events_file(data_dir)
        if len(got) >= n or time.monotonic() >= deadline:
            return got
        time.sleep(0.05)


# ---- engines --------------------------------------------------------------------------

FAST_RETRIES = dict(retry_min=0.3, retry_max=1.0, connect_timeout=2.0, reply_timeout=5.0,
                    connection_idle_time=0.5)


class EngineFactory:
    """make(**config_overrides) -> a started Engine with delivery on, the test
    unbound as its only resolver, short retries, and ``engine.events`` (an
    Events) registered before start. Every engine is stopped at teardown."""

    def __init__(self, tmp_path: Path, dns_address: str) -> None:
        self.tmp_path = tmp_path
        self.dns = dns_address
        self.started: list[Engine] = []
        self._n = 0

    def config(self, data: Path | None = None, **kw: Any):
        self._n += 1
        data = data or self.tmp_path / f"data{self._n}"
        settings = {"delivery_enabled": True, "dns": self.dns, **FAST_RETRIES, **kw}
        # Never the machine's resolver, whatever a test passes.
        assert settings["dns"] and settings["dns"].startswith("127."), settings["dns"]
        return make_config(data, Ports(), **settings)

    def make(self, data: Path | None = None, *, events: bool = True,
             hooks: dict[str, Callable[..., Any]] | None = None, start: bool = True,
             **kw: Any) -> Engine:
        eng = Engine(self.config(data, **kw))
        ev = Events()
        if events:
            eng.on_delivery(ev)
        eng.events = ev  # type: ignore[attr-defined]
        for name, fn in (hooks or {}).items():
            eng.set_hook(name, fn)
        if start:
            eng.start()
            self.started.append(eng)
        return eng

    def stop_all(self) -> None:
        for eng in self.started:
            eng.stop(timeout=2)
        self.started.clear()


def data_dir(eng: Engine) -> Path:
    return Path(eng.config.data_dir)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


# ---- sinks -------------------------------------------------------------------------


class Groups:
    """group(addresses, **kw) -> a started SinkGroup, stopped at teardown."""

    def __init__(self) -> None:
        self.groups: list[SinkGroup] = []

    def __call__(self, addresses: Iterable[str], **kw: Any) -> SinkGroup:
        g = SinkGroup(list(addresses), **kw).start()
        self.groups.append(g)
        return g

    def stop_all(self) -> None:
        for g in self.groups:
            g.stop()
        self.groups.clear()


# ---- DSNs -----------------------------------------------------------------------------


@dataclass
class Dsn:
    received: Received
    msg: EmailMessage
    human: Message
    per_message: Message
    per_recipient: list[Message]
    returned: Message | None


def parse_dsn(rec: Received) -> Dsn:
    msg = email.message_from_bytes(rec.data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") in ("delivery-status", "global-delivery-status"), \
        msg.get_param("report-type")
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2, parts
    human, status = parts[0], parts[1]
    assert status.get_content_type() in ("message/delivery-status",
                                         "message/global-delivery-status"), status.get_content_type()
    if status.get_content_type() == "message/delivery-status":
        blocks = status.get_payload()
    else:
        # email reads message/global-delivery-status as one embedded
        # message; take the field blocks from the raw part instead.
        blocks = _status_blocks(rec.data, msg.get_boundary())
    returned = None
    if len(parts) >= 3:
        third = parts[2]
        inner = third.get_payload()
        if isinstance(inner, list) and inner:
            returned = inner[0]
        elif third.get_content_type() == "text/rfc822-headers":
            returned = email.message_from_string(third.get_content(), policy=email.policy.default)
    return Dsn(rec, msg, human, blocks[0], list(blocks[1:]), returned)


def _status_blocks(data: bytes, boundary: str) -> list[Message]:
    sep = b"\r\n--" + boundary.encode()
    for part in data.split(sep)[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        if b"delivery-status" in head.lower():
            text = body.decode("utf-8").replace("\r\n", "\n").strip("\n")
            return [email.message_from_string(b + "\n", policy=email.policy.default)
                    for b in text.split("\n\n") if b.strip()]
    raise AssertionError("no delivery-status part")


# ---- DKIM keys -----------------------------------------------------------------------


@dataclass
class DkimTestKey:
    kind: str
    path: Path
    selector: str
    domain: str
    record: bytes

    def dns_name(self) -> bytes:
        return f"{self.selector}._domainkey.{self.domain}.".encode()


def make_dkim_key(directory: Path, kind: str, selector: str, domain: str) -> DkimTestKey:
    """A key from openssl and its TXT record, computed as tests/test_dkim.py does."""
    path = directory / f"{selector}.{domain}.pem"
    args = (["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"] if kind == "rsa"
            else ["-algorithm", "ED25519"])
    subprocess.run(["openssl", "genpkey", *args, "-out", str(path)], check=True,
                   capture_output=True, timeout=60)
    der = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True, timeout=30).stdout
    if kind == "rsa":
        p = base64.b64encode(der)
    else:
        assert len(der) == 44
        p = base64.b64encode(der[-32:])  # RFC 8463 §4.2
    return DkimTestKey(kind, path, selector, domain, b"v=DKIM1; k=" + kind.encode() + b"; p=" + p)


def dkim_dns(*keys: DkimTestKey) -> Callable[..., bytes | None]:
    records = {k.dns_name(): k.record for k in keys}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


# ---- processes --------------------------------------------------------------------------


class LineReader:
    """A process's output lines read in a thread, so every wait is bounded."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        rx = re.compile(pattern)
        for line in self.seen:
            m = rx.search(line)
            if m:
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line == "":
                raise AssertionError(f"output ended before {pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{''.join(self.seen)}")
