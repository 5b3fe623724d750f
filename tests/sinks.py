"""Programmable SMTP sinks for outbound-delivery tests: real SMTP servers on
loopback that answer the way remote MX hosts do, keep what they accept, and
write down every protocol rule the client breaks.

Each Sink runs its own asyncio loop in a thread. The server is a small SMTP
implementation of its own rather than aiosmtpd, because the sink has to see
the bytes as they arrive: whether a command was already buffered before the
previous reply went out (PIPELINING), whether a line ended in CRLF, whether
the message held a bare LF. aiosmtpd hides those (it reads with
readuntil(b"\\n") and strips), never advertises PIPELINING or CHUNKING, ties
8BITMIME to decode_data and refuses SMTPUTF8 with 501 before any hook runs.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import errno
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

__all__ = ["Received", "Rule", "Sink", "SinkGroup", "free_port_on", "self_signed_cert"]

Reply = tuple[int, str]
RuleSpec = Union["Rule", Reply]


# ---- records -------------------------------------------------------------------------


@dataclass
class Received:
    """One transaction the sink accepted (or, in Sink.rejected, refused at the
    end of DATA)."""

    sink: str
    host: str
    port: int
    peer: tuple
    helo: str
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    tls: bool
    auth_user: str | None
    time: float
    session: int
    rejected_rcpts: list[tuple[str, int]] = field(default_factory=list)  # (address, code)
    chunked: bool = False          # came in BDAT chunks, not DATA
    sni: str | None = None         # server name the client sent in its TLS hello
    tls_version: str | None = None
    reply: Reply = (250, "")       # what the sink answered to the end of the message


_RULE_LOCK = threading.Lock()


@dataclass
class Rule:
    """How a sink answers at one point: a reply, optionally only for the first
    `times` matches (greylisting), after a delay, or by closing the connection.
    A plain (code, text) tuple is accepted wherever a Rule is."""

    code: int = 250
    text: str = ""
    times: int | None = None    # answer so only this many times, then as if no rule
    delay: float = 0.0          # seconds to wait before answering
    disconnect: bool = False    # close after answering (any 421 implies it)
    drop: bool = False          # close without answering
    hits: int = field(default=0, compare=False)  # how often the rule has answered

    @staticmethod
    def of(spec: RuleSpec | None) -> Rule | None:
        if spec is None or isinstance(spec, Rule):
            return spec
        code, text = spec
        return Rule(int(code), str(text))

    def take(self) -> Rule | None:
        """Self if the rule still applies (counting this use), else None."""
        with _RULE_LOCK:
            if self.times is not None and self.hits >= self.times:
                return None
            self.hits += 1
            return self

    def reset(self) -> None:
        with _RULE_LOCK:
            self.hits = 0


# ---- certificates --------------------------------------------------------------------

_cert_dir: Path | None = None
_cert_cache: dict[tuple[str, tuple[str, ...]], tuple[Path, Path]] = {}
_cert_lock = threading.Lock()


def _tmpdir() -> Path:
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = Path(tempfile.mkdtemp(prefix="mailengine-sinks-"))
        atexit.register(shutil.rmtree, _cert_dir, True)
    return _cert_dir


def self_signed_cert(name: str, hosts: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for a self-signed P-256 certificate whose subject is
    `name` and whose subjectAltName holds DNS:name and IP:host for every host.
    The certificate is its own CA, so it serves as the CA file for clients.
    Made once per (name, hosts) in a process-wide temporary directory."""
    ips = tuple(sorted({h for h in hosts if _is_ip(h)}))
    key = (name, ips)
    with _cert_lock:
        if key in _cert_cache:
            return _cert_cache[key]
        d = Path(tempfile.mkdtemp(prefix="cert-", dir=_tmpdir()))
        cert, keyf = d / "cert.pem", d / "key.pem"
        try:
            _cert_with_cryptography(name, ips, cert, keyf)
        except ImportError:
            _cert_with_openssl(name, ips, cert, keyf)
        _cert_cache[key] = (cert, keyf)
        return cert, keyf


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _cert_with_cryptography(name: str, ips: tuple[str, ...], cert: Path, keyf: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    crt = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    keyf.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))


def _cert_with_openssl(name: str, ips: tuple[str, ...], cert: Path, keyf: Path) -> None:
    san = ",".join([f"DNS:{name}"] + [f"IP:{ip}" for ip in ips])
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", str(keyf), "-out", str(cert), "-days", "2",
           "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
           "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
           "-addext", "extendedKeyUsage=serverAuth"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate for {name}: {res.stderr.strip()}")


# ---- ports ---------------------------------------------------------------------------

# Below the kernel's ephemeral range (which starts at 32768) and below the
# range tests/conftest.py hands out (20000-32000), so an outgoing connection
# or another fixture cannot take the port before the sinks bind it.
_PORT_LO, _PORT_HI = 10000, 20000
_next_port = _PORT_LO + (os.getpid() * 131) % (_PORT_HI - _PORT_LO)
_ports_given: set[int] = set()
_ports_lock = threading.Lock()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port_on(addresses: list[str]) -> int:
    """A TCP port that can be bound on every one of `addresses` right now.
    No port is handed out twice in one process."""
    global _next_port
    with _ports_lock:
        for _ in range(_PORT_HI - _PORT_LO):
            port = _next_port
            _next_port = _PORT_LO if port + 1 >= _PORT_HI else port + 1
            if port in _ports_given:
                continue
            if all(_bindable(a, port) for a in addresses):
                _ports_given.add(port)
                return port
    raise RuntimeError(f"no port free on all of {addresses}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


# ---- protocol constants --------------------------------------------------------------

# RFC 2920 §3.1: only these may be followed by more commands before their reply
# arrives; "." stands for the end of message content, which may lead a group.
PIPELINABLE = frozenset({"RSET", "MAIL", "RCPT", "BDAT", "."})
MAX_COMMAND_LINE = 16384        # longer than any legal command, AUTH included
MAX_TEXT_LINE = 1000            # RFC 5321 §4.5.3.1.6, CRLF included
HARD_MESSAGE_CAP = 64 << 20     # bound when the sink advertises no SIZE
READ_HIGH_WATER = 1 << 20       # stop reading the socket above this much buffered
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_PATH = re.compile(rb"^(?P<space> *)<(?P<addr>[^<>]*)>(?P<rest>.*)$")


class _Closed(Exception):
    """The session is over: the peer left or the sink closed it."""


class _Conn(asyncio.Protocol):
    """Bytes from the socket into a buffer the session reads from. The buffer
    is inspectable, which is how pipelining is seen."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buf = bytearray()
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self._event = asyncio.Event()
        self._paused = False
        self._scan = 0  # bytes of buf already known to hold no LF

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not again after a TLS upgrade
            self.transport = transport  # type: ignore[assignment]
            self.sink._accept(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._event.set()
        if len(self.buf) > READ_HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self._event.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._event.set()

    # reading
    async def more(self, timeout: float) -> None:
        if self.eof:
            raise _Closed()
        self._event.clear()
        if self._paused and self.transport:
            self._paused = False
            self.transport.resume_reading()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError from None

    def consume(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self._scan = 0
        return out

    def discard(self) -> None:
        self.buf.clear()
        self._scan = 0

    def has_line(self) -> bool:
        return b"\n" in self.buf

    async def line(self, max_len: int, timeout: float) -> tuple[bytes, bool]:
        """(line with its terminator, True), or (a piece of at most max_len
        bytes of an overlong line, False). Raises _Closed at EOF."""
        while True:
            i = self.buf.find(b"\n", self._scan)
            if i >= 0:
                return self.consume(i + 1), True
            self._scan = len(self.buf)
            if len(self.buf) >= max_len:
                n = max_len - 1 if self.buf[max_len - 1:max_len] == b"\r" else max_len
                return self.consume(n), False
            await self.more(timeout)

    async def exactly(self, n: int, timeout: float, sink_to: bytearray | None) -> None:
        """Read n bytes into sink_to (or drop them if None)."""
        while n > 0:
            if not self.buf:
                await self.more(timeout)
                continue
            piece = self.consume(min(n, len(self.buf)))
            n -= len(piece)
            if sink_to is not None:
                sink_to += piece

    def write(self, data: bytes) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()


@dataclass
class _Session:
    id: int
    peer: tuple
    lines: list[str]
    tls: bool = False
    sni: str | None = None
    tls_version: str | None = None
    helo: str | None = None
    esmtp: bool = False
    advertised: frozenset[str] = frozenset()
    auth_user: str | None = None
    count: int = 0              # messages accepted on this connection
    pending: str | None = None  # verb whose reply is owed
    pending_line: str = ""
    in_group: bool = False
    group: list[str] = field(default_factory=list)
    # transaction
    mail_from: str | None = None
    mail_options: list[str] = field(default_factory=list)
    utf8: bool = False
    body: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)
    rejected: list[tuple[str, int]] = field(default_factory=list)
    chunks: bytearray | None = None
    chunk_error: Reply | None = None

    def reset_transaction(self) -> None:
        self.mail_from = None
        self.mail_options = []
        self.utf8 = False
        self.body = None
        self.rcpt_tos = []
        self.rcpt_options = []
        self.rejected = []
        self.chunks = None
        self.chunk_error = None


class _Counter:
    """Open, total and peak connections, exact under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.total = 0
        self.peak = 0

    def opened(self) -> None:
        with self.lock:
            self.open += 1
            self.total += 1
            self.peak = max(self.peak, self.open)

    def closed(self) -> None:
        with self.lock:
            self.open -= 1

    def reset(self) -> None:
        with self.lock:
            self.total = 0
            self.peak = self.open


# ---- the sink ------------------------------------------------------------------------


class Sink:
    """One SMTP server on (host, port) that answers as configured and records.

    Replies are given as (code, text) tuples or Rule objects; texts should
    carry their enhanced status code ("4.3.0 try again")."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, name: str = "",
                 greeting: RuleSpec | None = None,
                 ehlo: bool = True,
                 pipelining: bool = True, smtputf8: bool = True, eightbitmime: bool = True,
                 size: int | None = None, chunking: bool = False,
                 starttls: bool = False, cert: tuple[Path, Path] | None = None,
                 implicit_tls: bool = False, tls_name: str | None = None,
                 require_tls: bool = False,
                 auth: dict[str, str] | None = None, auth_required: bool | None = None,
                 dsn: bool = False, enhancedstatuscodes: bool = True,
                 rcpt_rules: dict[str, RuleSpec] | None = None,
                 mail_reply: RuleSpec | None = None,
                 data_reply: RuleSpec | Callable[[Received], RuleSpec | None] | None = None,
                 delay: float = 0.0,
                 max_messages: int | None = None,
                 max_messages_total: int | None = None,
                 max_recipients: int | None = None,
                 greeting_delay: float = 0.0,
                 timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self._name = name
        self.greeting = Rule.of(greeting)
        self.ehlo = ehlo
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.size = size
        self.chunking = chunking
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.require_tls = require_tls
        self.auth = dict(auth) if auth else None
        self.auth_required = bool(auth) if auth_required is None else auth_required
        self.dsn = dsn
        self.enhancedstatuscodes = enhancedstatuscodes
        self.rcpt_rules: dict[str, Rule] = {
            k.casefold(): Rule.of(v) for k, v in (rcpt_rules or {}).items()}  # type: ignore[misc]
        self.mail_reply = Rule.of(mail_reply)
        self.data_reply = data_reply if callable(data_reply) else Rule.of(data_reply)
        self.delay = delay
        self.max_messages = max_messages
        self.max_messages_total = max_messages_total
        self.max_recipients = max_recipients
        self.greeting_delay = greeting_delay
        self.timeout = timeout
        if tls_name is None:
            tls_name = name if name and _HOSTNAME.match(name) and not _is_ip(name) else "localhost"
        self.tls_name = tls_name
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._tls_context: ssl.SSLContext | None = None
        if starttls or implicit_tls:
            cert_path, key_path = cert or self_signed_cert(tls_name, [host])
            self.cert_path, self.key_path = Path(cert_path), Path(key_path)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._watchers: list[threading.Condition] = []
        self._counters = [_Counter()]
        self._messages: list[Received] = []
        self._rejected: list[Received] = []
        self._violations: list[str] = []
        self._tls_errors: list[str] = []
        self._errors: list[str] = []
        self._transcripts: dict[int, list[str]] = {}
        self._batches: list[tuple[int, list[str]]] = []
        self._sessions_seen = 0
        self._accepted_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public state, every read a snapshot under the lock --

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def rejected(self) -> list[Received]:
        """Transactions refused at the end of DATA/BDAT (data_reply not 2xx)."""
        with self._lock:
            return list(self._rejected)

    @property
    def protocol_violations(self) -> list[str]:
        with self._lock:
            return list(self._violations)

    @property
    def tls_errors(self) -> list[str]:
        """TLS handshakes that failed, e.g. because the client refused the cert."""
        with self._lock:
            return list(self._tls_errors)

    @property
    def errors(self) -> list[str]:
        """Exceptions inside the sink (or raised by a data_reply callable)."""
        with self._lock:
            return list(self._errors)

    @property
    def transcripts(self) -> list[list[str]]:
        """Per connection, in order of arrival: the lines the client sent
        outside message content (commands and AUTH responses), without CRLF."""
        with self._lock:
            return [list(v) for _, v in sorted(self._transcripts.items())]

    def transcript(self, session: int) -> list[str]:
        """The command lines of one connection, by Received.session."""
        with self._lock:
            return list(self._transcripts.get(session, []))

    @property
    def batches(self) -> list[tuple[int, list[str]]]:
        """Every group of two or more commands that was already buffered when
        the sink read the first of them: (session, command lines)."""
        with self._lock:
            return [(s, list(b)) for s, b in self._batches]

    @property
    def pipelined_batches(self) -> int:
        with self._lock:
            return len(self._batches)

    @property
    def connections_total(self) -> int:
        c = self._counters[0]
        with c.lock:
            return c.total

    @property
    def max_concurrent(self) -> int:
        c = self._counters[0]
        with c.lock:
            return c.peak

    @property
    def open_connections(self) -> int:
        c = self._counters[0]
        with c.lock:
            return c.open

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least n messages were accepted; all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._describe(n, timeout))
                self._cond.wait(left)
            return list(self._messages)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no client connection is open."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.open_connections:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"sink {self.name}: {self.open_connections} connections "
                                       f"still open after {timeout}s")
                self._cond.wait(left)

    def rate(self) -> float:
        """Messages per second between the first and the last accepted message
        ((n - 1) / span); 0.0 with fewer than two."""
        with self._lock:
            times = sorted(m.time for m in self._messages)
        if len(times) < 2:
            return 0.0
        span = times[-1] - times[0]
        return (len(times) - 1) / span if span > 0 else float("inf")

    def reset(self) -> None:
        """Forget messages, transcripts, violations, counters and rule hits."""
        with self._lock:
            self._messages.clear()
            self._rejected.clear()
            self._violations.clear()
            self._tls_errors.clear()
            self._errors.clear()
            self._transcripts.clear()
            self._batches.clear()
            self._accepted_total = 0
        self._counters[0].reset()
        for rule in self._rules():
            rule.reset()

    def _rules(self) -> Iterator[Rule]:
        for r in (self.greeting, self.mail_reply, self.data_reply, *self.rcpt_rules.values()):
            if isinstance(r, Rule):
                yield r

    def _describe(self, n: int, timeout: float) -> str:
        got = [f"{m.mail_from} -> {m.rcpt_tos}" for m in self._messages]
        text = [f"sink {self.name}: {len(self._messages)} of {n} messages after {timeout}s: {got}"]
        if self._rejected:
            refused = [(m.rcpt_tos, m.reply) for m in self._rejected]
            text.append(f"rejected at end of data: {refused}")
        if self._violations:
            text.append(f"protocol violations: {self._violations}")
        if self._tls_errors:
            text.append(f"TLS errors: {self._tls_errors}")
        if self._errors:
            text.append(f"sink errors: {self._errors}")
        for sid, lines in list(sorted(self._transcripts.items()))[-5:]:
            text.append(f"session {sid}: {lines}")
        c = self._counters[0]
        text.append(f"connections: {c.total} total, {c.open} open")
        return "\n  ".join(text)

    # -- lifecycle --

    def start(self) -> Sink:
        if self._thread is not None:
            raise RuntimeError(f"sink {self.name} already started")
        if self.cert_path is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_path, self.key_path)
            ctx.sni_callback = _remember_sni
            self._tls_context = ctx
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name=f"sink-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError(f"sink on {self.host}:{self.port} did not start within 10s")
        if failure:
            self._thread.join(10)
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._thread = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Sink {self.name} {len(self._messages)} messages>"

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(loop.create_server(
                lambda: _Conn(self), self.host, self.port, reuse_address=True, backlog=256))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 - handed to start()
            failure.append(e)
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    # -- bookkeeping, called on the loop thread --

    def _accept(self, conn: _Conn) -> None:
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername") or ("", 0)
        for c in self._counters:
            c.opened()
        with self._lock:
            self._sessions_seen += 1
            sess = _Session(self._sessions_seen, tuple(peer), [])
            self._transcripts[sess.id] = sess.lines
        task = asyncio.get_running_loop().create_task(self._serve(conn, sess))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, conn))

    def _finished(self, task: asyncio.Task[None], conn: _Conn) -> None:
        self._tasks.discard(task)
        if conn.transport is not None and not conn.transport.is_closing():
            conn.transport.abort()
        for c in self._counters:
            c.closed()
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
        for w in self._watchers:
            with w:
                w.notify_all()

    def _violation(self, sess: _Session, what: str) -> None:
        with self._lock:
            self._violations.append(f"session {sess.id}: {what}")

    def _record_line(self, sess: _Session, text: str) -> None:
        with self._lock:
            sess.lines.append(text)

    # -- replies --

    def _reply(self, conn: _Conn, sess: _Session, code: int, text: str) -> None:
        if sess.pending is not None and conn.buf:
            nxt = bytes(conn.buf[:80]).split(b"\n")[0].rstrip(b"\r")
            if "PIPELINING" not in sess.advertised:
                self._violation(sess, f"{nxt!r} sent before the reply to {sess.pending_line!r}, "
                                      "PIPELINING not advertised")
            elif sess.pending not in PIPELINABLE:
                self._violation(sess, f"{nxt!r} sent before the reply to {sess.pending_line!r}; "
                                      f"{sess.pending} must end a pipelined group (RFC 2920)")
        sess.pending = None
        lines = text.split("\n") if text else [""]
        out = b"".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{ln}".rstrip().encode() + b"\r\n"
                       for i, ln in enumerate(lines))
        conn.write(out)

    async def _choose(self, conn: _Conn, sess: _Session, rule: Rule | None,
                      default: Reply) -> tuple[Rule | None, int, str]:
        """The rule (if it still applies, after its delay) or the default.
        A rule that drops the connection closes it here."""
        taken = rule.take() if rule is not None else None
        if taken is None:
            return None, *default
        if taken.delay:
            await asyncio.sleep(taken.delay)
        if taken.drop:
            sess.pending = None
            conn.close()
            raise _Closed()
        return taken, taken.code, taken.text

    def _close_after(self, conn: _Conn, taken: Rule | None, code: int) -> None:
        if code == 421 or (taken is not None and taken.disconnect):
            conn.close()
            raise _Closed()

    async def _answer(self, conn: _Conn, sess: _Session, rule: Rule | None,
                      default: Reply) -> int:
        """Answer with rule or default; the code sent. Raises _Closed when
        the answer ends the connection."""
        taken, code, text = await self._choose(conn, sess, rule, default)
        self._reply(conn, sess, code, text)
        self._close_after(conn, taken, code)
        return code

    # -- the session --

    async def _serve(self, conn: _Conn, sess: _Session) -> None:
        try:
            if self.implicit_tls:
                await self._upgrade(conn, sess)
            await self._session(conn, sess)
        except (_Closed, ConnectionError):
            pass
        except TimeoutError:
            self._reply(conn, sess, 421, "4.4.2 idle too long, closing")
        except Exception as e:  # noqa: BLE001 - a sink bug or a data_reply that raised
            with self._lock:
                self._errors.append(f"session {sess.id}: {type(e).__name__}: {e}")
            self._reply(conn, sess, 421, "4.3.0 sink error, closing")
        finally:
            conn.close()

    async def _upgrade(self, conn: _Conn, sess: _Session) -> None:
        loop = asyncio.get_running_loop()
        assert conn.transport is not None and self._tls_context is not None
        try:
            transport = await loop.start_tls(conn.transport, conn, self._tls_context,
                                             server_side=True, ssl_handshake_timeout=10)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            with self._lock:
                self._tls_errors.append(f"session {sess.id}: {type(e).__name__}: {e}")
            raise _Closed() from None
        if transport is None:
            raise _Closed()
        conn.transport = transport  # type: ignore[assignment]
        obj = transport.get_extra_info("ssl_object")
        sess.tls = True
        sess.sni = getattr(obj, "_sink_sni", None)
        sess.tls_version = obj.version() if obj is not None else None

    async def _session(self, conn: _Conn, sess: _Session) -> None:
        if self.greeting_delay:
            await asyncio.sleep(self.greeting_delay)
        if conn.buf:
            self._violation(sess, f"{bytes(conn.buf[:80])!r} sent before the greeting")
        total_full = (self.max_messages_total is not None
                      and self._accepted_total >= self.max_messages_total)
        rule = self.greeting.take() if self.greeting is not None else None
        if total_full:
            rule = Rule(421, f"4.3.2 {self.tls_name} has taken all the messages it will take")
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay)
        if rule is not None and rule.drop:
            return
        code, text = (rule.code, rule.text) if rule else (220, f"{self.tls_name} ESMTP sink ready")
        self._reply(conn, sess, code, text)
        if 400 <= code < 500 or (rule is not None and rule.disconnect):
            return
        refused = code >= 500  # RFC 5321 §3.1: 554 greeting, then 503 until QUIT
        while True:
            raw, whole = await conn.line(MAX_COMMAND_LINE, self.timeout)
            if not whole:
                self._violation(sess, f"command line longer than {MAX_COMMAND_LINE} octets")
                while not whole:
                    raw, whole = await conn.line(MAX_COMMAND_LINE, self.timeout)
                self._reply(conn, sess, 500, "5.5.2 line too long")
                continue
            text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            self._record_line(sess, text)
            if not raw.endswith(b"\r\n"):
                self._violation(sess, f"command line not ending in CRLF: {raw!r}")
            self._note_group(conn, sess, text)
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            sess.pending, sess.pending_line = verb, text
            if refused:
                if verb == "QUIT":
                    self._reply(conn, sess, 221, "2.0.0 bye")
                    return
                self._violation(sess, f"{text!r} after a {code} greeting (only QUIT is expected)")
                self._reply(conn, sess, 503, "5.5.1 no service, send QUIT")
                continue
            handler = getattr(self, f"_cmd_{verb}", None) if verb.isalpha() else None
            if handler is None:
                self._violation(sess, f"unknown command {text!r}")
                self._reply(conn, sess, 500, "5.5.2 command not recognized")
                continue
            if await handler(conn, sess, arg, raw):
                return

    def _note_group(self, conn: _Conn, sess: _Session, text: str) -> None:
        """Track commands that were already buffered together."""
        with self._lock:
            if sess.in_group:
                sess.group.append(text)
            if not conn.has_line():
                sess.in_group = False
            elif not sess.in_group:
                sess.in_group = True
                sess.group = [text]
                self._batches.append((sess.id, sess.group))

    # -- commands: each returns True when the session is over --

    def _extensions(self, sess: _Session) -> list[str]:
        ext = []
        if self.pipelining:
            ext.append("PIPELINING")
        if self.size is not None:
            ext.append(f"SIZE {self.size}" if self.size else "SIZE")
        if self.eightbitmime:
            ext.append("8BITMIME")
        if self.smtputf8:
            ext.append("SMTPUTF8")
        if self.chunking:
            ext.append("CHUNKING")
        if self.dsn:
            ext.append("DSN")
        if self.enhancedstatuscodes:
            ext.append("ENHANCEDSTATUSCODES")
        if self._tls_context is not None and self.starttls and not sess.tls:
            ext.append("STARTTLS")
        if self.auth and (sess.tls or not self.starttls):
            ext.append("AUTH PLAIN LOGIN")
        return ext

    async def _cmd_EHLO(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if not self.ehlo:
            self._reply(conn, sess, 502, "5.5.2 EHLO not supported, use HELO")
            return False
        if not arg.strip():
            self._reply(conn, sess, 501, "5.5.4 EHLO needs a domain")
            return False
        sess.reset_transaction()
        sess.helo, sess.esmtp = arg.strip(), True
        ext = self._extensions(sess)
        sess.advertised = frozenset(e.split()[0] for e in ext)
        self._reply(conn, sess, 250, "\n".join([f"{self.tls_name} greets {sess.helo}", *ext]))
        return False

    async def _cmd_HELO(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if not arg.strip():
            self._reply(conn, sess, 501, "5.5.4 HELO needs a domain")
            return False
        sess.reset_transaction()
        sess.helo, sess.esmtp, sess.advertised = arg.strip(), False, frozenset()
        self._reply(conn, sess, 250, f"{self.tls_name}")
        return False

    async def _cmd_NOOP(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        self._reply(conn, sess, 250, "2.0.0 ok")
        return False

    async def _cmd_RSET(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        sess.reset_transaction()
        self._reply(conn, sess, 250, "2.0.0 reset")
        return False

    async def _cmd_QUIT(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        self._reply(conn, sess, 221, "2.0.0 bye")
        return True

    async def _cmd_VRFY(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        self._reply(conn, sess, 252, "2.5.0 cannot verify, send some mail")
        return False

    async def _cmd_EXPN(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        self._reply(conn, sess, 502, "5.5.1 EXPN not supported")
        return False

    async def _cmd_HELP(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        self._reply(conn, sess, 214, "2.0.0 this is a test sink")
        return False

    async def _cmd_STARTTLS(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if "STARTTLS" not in sess.advertised:
            self._violation(sess, "STARTTLS though not advertised"
                            + (" (already in TLS)" if sess.tls else ""))
            self._reply(conn, sess, 503 if sess.tls else 502, "5.5.1 STARTTLS not available")
            return False
        if arg.strip():
            self._reply(conn, sess, 501, "5.5.4 STARTTLS takes no argument")
            return False
        if conn.buf:  # RFC 3207 §6: nothing sent in the clear may survive the upgrade
            self._violation(sess, f"{bytes(conn.buf[:80])!r} sent after STARTTLS before the "
                                  "handshake; discarded")
            conn.discard()
        self._reply(conn, sess, 220, "2.0.0 ready to start TLS")
        await self._upgrade(conn, sess)
        sess.reset_transaction()
        sess.helo, sess.esmtp, sess.advertised, sess.auth_user = None, False, frozenset(), None
        return False

    async def _cmd_AUTH(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if "AUTH" not in sess.advertised:
            self._violation(sess, "AUTH though not advertised")
            if self.auth and self.starttls and not sess.tls:
                self._reply(conn, sess, 538, "5.7.11 encryption required for authentication")
            else:
                self._reply(conn, sess, 502, "5.5.1 AUTH not available")
            return False
        if sess.auth_user is not None or sess.mail_from is not None:
            self._violation(sess, "AUTH after authentication or inside a transaction")
            self._reply(conn, sess, 503, "5.5.1 AUTH not allowed now")
            return False
        mech, _, initial = arg.strip().partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if mech == "PLAIN":
            resp = initial or await self._challenge(conn, sess, "")
            if resp is None:
                return False
            try:
                _, user, password = _b64(resp).split("\0")
            except ValueError:
                self._reply(conn, sess, 501, "5.5.2 malformed PLAIN response")
                return False
        elif mech == "LOGIN":
            u = _b64(initial) if initial else await self._challenge_text(conn, sess, "Username:")
            if u is None:
                return False
            p = await self._challenge_text(conn, sess, "Password:")
            if p is None:
                return False
            user, password = u, p
        else:
            self._reply(conn, sess, 504, "5.5.4 mechanism not supported")
            return False
        assert self.auth is not None
        if self.auth.get(user) == password:
            sess.auth_user = user
            self._reply(conn, sess, 235, "2.7.0 authenticated")
        else:
            self._reply(conn, sess, 535, "5.7.8 authentication credentials invalid")
        return False

    async def _challenge(self, conn: _Conn, sess: _Session, prompt: str) -> str | None:
        self._reply(conn, sess, 334, base64.b64encode(prompt.encode()).decode() if prompt else "")
        raw, whole = await conn.line(MAX_COMMAND_LINE, self.timeout)
        text = raw.rstrip(b"\r\n").decode("ascii", "replace")
        self._record_line(sess, text)
        sess.pending, sess.pending_line = "AUTH", text
        if not whole or text == "*":
            self._reply(conn, sess, 501, "5.0.0 authentication cancelled")
            return None
        return "" if text == "=" else text

    async def _challenge_text(self, conn: _Conn, sess: _Session, prompt: str) -> str | None:
        resp = await self._challenge(conn, sess, prompt)
        if resp is None:
            return None
        try:
            return _b64(resp)
        except ValueError:
            self._reply(conn, sess, 501, "5.5.2 malformed base64")
            return None

    def _parse_path(self, sess: _Session, raw: bytes, prefix: bytes,
                    ) -> tuple[bytes, list[str]] | None:
        """(address bytes, parameters) from 'MAIL FROM:<a> P=V', None if malformed."""
        body = raw.rstrip(b"\r\n")[5:]
        if body[:len(prefix)].upper() != prefix:
            return None
        m = _PATH.match(body[len(prefix):].rstrip(b" "))
        if m is None:
            return None
        if m.group("space"):
            self._violation(sess, f"space after {prefix.decode()!r} (RFC 5321 §4.1.2 syntax)")
        params = [p.decode("utf-8", "surrogateescape") for p in m.group("rest").split()]
        return m.group("addr"), params

    async def _cmd_MAIL(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if self.max_messages is not None and sess.count >= self.max_messages:
            self._reply(conn, sess, 421, f"4.7.0 {self.max_messages} messages per connection, "
                                         "closing")
            return True
        if self.max_messages_total is not None and self._accepted_total >= self.max_messages_total:
            self._reply(conn, sess, 421, "4.3.2 no more messages accepted, closing")
            return True
        if sess.helo is None:
            self._violation(sess, "MAIL before EHLO/HELO" + (" after TLS" if sess.tls else ""))
            self._reply(conn, sess, 503, "5.5.1 send EHLO first")
            return False
        if sess.mail_from is not None:
            self._violation(sess, "MAIL inside a transaction (no RSET)")
            self._reply(conn, sess, 503, "5.5.1 nested MAIL")
            return False
        if self.require_tls and not sess.tls:
            self._reply(conn, sess, 530, "5.7.0 must issue a STARTTLS command first")
            return False
        if self.auth_required and sess.auth_user is None:
            self._reply(conn, sess, 530, "5.7.0 authentication required")
            return False
        parsed = self._parse_path(sess, raw, b"FROM:")
        if parsed is None:
            self._violation(sess, f"malformed MAIL: {raw!r}")
            self._reply(conn, sess, 501, "5.5.4 syntax: MAIL FROM:<address>")
            return False
        addr, params = parsed
        utf8, body = False, None
        for p in params:
            key, _, value = p.partition("=")
            key = key.upper()
            if key == "SIZE":
                if "SIZE" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "SIZE not advertised")
                if not value.isdigit():
                    self._reply(conn, sess, 501, "5.5.4 bad SIZE value")
                    return False
                if self.size and int(value) > self.size:
                    self._reply(conn, sess, 552, "5.3.4 message size exceeds fixed limit")
                    return False
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return self._bad_param(conn, sess, p, "only 7BIT and 8BITMIME are offered")
                if "8BITMIME" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "8BITMIME not advertised")
                body = value.upper()
            elif key == "SMTPUTF8":
                if "SMTPUTF8" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "SMTPUTF8 not advertised")
                utf8 = True
            elif key == "AUTH":
                if "AUTH" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "AUTH not advertised")
            elif key in ("RET", "ENVID"):
                if "DSN" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "DSN not advertised")
            else:
                return self._bad_param(conn, sess, p, "unknown MAIL parameter")
        if not addr.isascii():
            if not utf8:
                why = ("SMTPUTF8 not advertised" if "SMTPUTF8" not in sess.advertised
                       else "no SMTPUTF8 parameter")
                self._violation(sess, f"non-ASCII sender {addr!r}, {why}")
                self._reply(conn, sess, 553, "5.6.7 non-ASCII address needs SMTPUTF8")
                return False
        code = await self._answer(conn, sess, self.mail_reply, (250, "2.1.0 sender ok"))
        if 200 <= code < 300:
            sess.mail_from = addr.decode("utf-8", "surrogateescape")
            sess.mail_options, sess.utf8, sess.body = params, utf8, body
        return False

    def _bad_param(self, conn: _Conn, sess: _Session, param: str, why: str) -> bool:
        self._violation(sess, f"parameter {param!r}: {why}")
        self._reply(conn, sess, 555, f"5.5.4 {param.partition('=')[0]} not recognized")
        return False

    async def _cmd_RCPT(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if sess.mail_from is None:
            self._violation(sess, "RCPT without MAIL")
            self._reply(conn, sess, 503, "5.5.1 need MAIL first")
            return False
        parsed = self._parse_path(sess, raw, b"TO:")
        if parsed is None:
            self._violation(sess, f"malformed RCPT: {raw!r}")
            self._reply(conn, sess, 501, "5.5.4 syntax: RCPT TO:<address>")
            return False
        addr_b, params = parsed
        for p in params:
            key = p.partition("=")[0].upper()
            if key in ("NOTIFY", "ORCPT"):
                if "DSN" not in sess.advertised:
                    return self._bad_param(conn, sess, p, "DSN not advertised")
            else:
                return self._bad_param(conn, sess, p, "unknown RCPT parameter")
        addr = addr_b.decode("utf-8", "surrogateescape")
        if not addr_b.isascii() and not sess.utf8:
            why = ("SMTPUTF8 not advertised" if "SMTPUTF8" not in sess.advertised
                   else "no SMTPUTF8 parameter on MAIL")
            self._violation(sess, f"non-ASCII recipient {addr_b!r}, {why}")
            self._reply(conn, sess, 553, "5.6.7 non-ASCII address needs SMTPUTF8")
            sess.rejected.append((addr, 553))
            return False
        if self.max_recipients is not None and len(sess.rcpt_tos) >= self.max_recipients:
            self._reply(conn, sess, 452, "4.5.3 too many recipients")
            sess.rejected.append((addr, 452))
            return False
        code = await self._answer(conn, sess, self._rcpt_rule(addr), (250, "2.1.5 recipient ok"))
        if 200 <= code < 300:
            sess.rcpt_tos.append(addr)
            sess.rcpt_options.append(params)
        else:
            sess.rejected.append((addr, code))
        return False

    def _rcpt_rule(self, addr: str) -> Rule | None:
        a = addr.casefold()
        local, _, domain = a.rpartition("@")
        for key in (a, local, "@" + domain, "*"):
            if key in self.rcpt_rules:
                return self.rcpt_rules[key]
        return None

    def _data_ready(self, conn: _Conn, sess: _Session, verb: str) -> Reply | None:
        """Why DATA/BDAT cannot start now, or None."""
        if sess.mail_from is None:
            self._violation(sess, f"{verb} without MAIL")
            return 503, "5.5.1 need MAIL first"
        if not sess.rcpt_tos:
            return 554, "5.5.1 no valid recipients"
        return None

    async def _cmd_DATA(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        if arg.strip():
            self._reply(conn, sess, 501, "5.5.4 DATA takes no argument")
            return False
        if sess.chunks is not None:
            self._violation(sess, "DATA after BDAT in one transaction (RFC 3030 §2)")
            self._reply(conn, sess, 503, "5.5.1 BDAT in progress")
            return False
        refusal = self._data_ready(conn, sess, "DATA")
        if refusal:
            self._reply(conn, sess, *refusal)
            return False
        self._reply(conn, sess, 354, "end data with <CR><LF>.<CR><LF>")
        data = bytearray()
        prev_crlf = True      # the next line starts a line
        bare_lf = bare_cr = long_line = False
        line_len = 0
        cap = self.size or HARD_MESSAGE_CAP
        too_big = False
        while True:
            piece, whole = await conn.line(65536, self.timeout)
            start = prev_crlf
            if whole:
                crlf = piece.endswith(b"\r\n")
                if start and piece == b".\r\n":
                    break
                if not crlf:
                    bare_lf = True
            if start and piece.startswith(b"."):
                piece = piece[1:]
            body = piece[:-2] if whole and piece.endswith(b"\r\n") else piece.rstrip(b"\n")
            if b"\r" in body:
                bare_cr = True
            line_len = (0 if start else line_len) + len(piece)
            if line_len > MAX_TEXT_LINE:
                long_line = True
            if len(data) + len(piece) > cap:
                too_big = True
            elif not too_big:
                data += piece
            prev_crlf = whole and piece.endswith(b"\r\n")
        sess.pending, sess.pending_line = ".", "<end of data>"
        if bare_lf:
            self._violation(sess, "bare LF in message content")
        if bare_cr:
            self._violation(sess, "bare CR in message content")
        if long_line:
            self._violation(sess, f"message line longer than {MAX_TEXT_LINE} octets "
                                  "(RFC 5321 §4.5.3.1.6)")
        if too_big:
            self._reply(conn, sess, 552, "5.3.4 message size exceeds fixed limit")
            sess.reset_transaction()
            return False
        return await self._deliver(conn, sess, bytes(data), chunked=False)

    async def _cmd_BDAT(self, conn: _Conn, sess: _Session, arg: str, raw: bytes) -> bool:
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            self._violation(sess, f"malformed BDAT: {raw!r}")
            self._reply(conn, sess, 501, "5.5.4 syntax: BDAT <size> [LAST]")
            return True  # the chunk length is unknown: cannot stay in step
        size, last = int(parts[0]), len(parts) == 2
        verb = "BDAT LAST" if last else "BDAT"
        if "CHUNKING" not in sess.advertised:
            self._violation(sess, "BDAT though CHUNKING not advertised")
            await conn.exactly(size, self.timeout, None)
            self._reply(conn, sess, 502, "5.5.1 BDAT not available")
            return False
        refusal = self._data_ready(conn, sess, verb)
        if refusal is None and sess.chunk_error is not None:
            refusal = sess.chunk_error
        if refusal is not None:
            await conn.exactly(size, self.timeout, None)
            sess.chunk_error = refusal
            self._reply(conn, sess, *refusal)
            if last:
                sess.reset_transaction()
            return False
        if sess.chunks is None:
            sess.chunks = bytearray()
        cap = self.size or HARD_MESSAGE_CAP
        if len(sess.chunks) + size > cap:
            await conn.exactly(size, self.timeout, None)
            sess.chunk_error = (552, "5.3.4 message size exceeds fixed limit")
            self._reply(conn, sess, *sess.chunk_error)
            if last:
                sess.reset_transaction()
            return False
        await conn.exactly(size, self.timeout, sess.chunks)
        if not last:
            self._reply(conn, sess, 250, f"2.0.0 {size} octets received")
            return False
        data = bytes(sess.chunks)
        if re.search(rb"(?<!\r)\n", data):
            self._violation(sess, "bare LF in message content")
        if re.search(rb"\r(?!\n)", data):
            self._violation(sess, "bare CR in message content")
        if any(len(ln) + 2 > MAX_TEXT_LINE for ln in data.split(b"\r\n")):
            self._violation(sess, f"message line longer than {MAX_TEXT_LINE} octets "
                                  "(RFC 5321 §4.5.3.1.6)")
        return await self._deliver(conn, sess, data, chunked=True)

    async def _deliver(self, conn: _Conn, sess: _Session, data: bytes, *, chunked: bool) -> bool:
        arrived = time.monotonic()
        if not sess.utf8 and sess.body is None and not data.isascii():
            why = "" if "8BITMIME" in sess.advertised else " (8BITMIME not advertised)"
            self._violation(sess, "8-bit message content without BODY=8BITMIME" + why)
        msg = Received(
            sink=self.name, host=self.host, port=self.port, peer=sess.peer,
            helo=sess.helo or "", mail_from=sess.mail_from or "",
            mail_options=list(sess.mail_options), rcpt_tos=list(sess.rcpt_tos),
            rcpt_options=[list(o) for o in sess.rcpt_options], data=data, tls=sess.tls,
            auth_user=sess.auth_user, time=arrived, session=sess.id,
            rejected_rcpts=list(sess.rejected), chunked=chunked, sni=sess.sni,
            tls_version=sess.tls_version)
        sess.reset_transaction()
        spec = self.data_reply(msg) if callable(self.data_reply) else self.data_reply
        if self.delay:
            await asyncio.sleep(self.delay)
        taken, code, text = await self._choose(
            conn, sess, Rule.of(spec), (250, f"2.0.0 queued as {sess.id}.{sess.count + 1}"))
        msg.reply = (code, text)
        self._reply(conn, sess, code, text)
        with self._cond:
            if 200 <= code < 300:
                sess.count += 1
                self._accepted_total += 1
                self._messages.append(msg)
            else:
                self._rejected.append(msg)
        self._notify()
        self._close_after(conn, taken, code)
        return False


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from None


def _remember_sni(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
    try:
        obj._sink_sni = name  # type: ignore[attr-defined]
    except AttributeError:
        pass


# ---- groups --------------------------------------------------------------------------


class SinkGroup:
    """Several sinks on one port, one per loopback address, as the MX hosts of
    a domain would be. Keyword arguments go to every sink; per_sink overrides
    them for one address ({"127.0.0.2": {"greeting": (421, "4.3.2 busy")}})."""

    def __init__(self, addresses: list[str], port: int | None = None, *,
                 per_sink: dict[str, dict[str, object]] | None = None,
                 **sink_kwargs: object) -> None:
        if not addresses:
            raise ValueError("a SinkGroup needs at least one address")
        self.addresses = list(addresses)
        self._fixed_port = port
        self.port = port or 0
        self.per_sink = dict(per_sink or {})
        self.sink_kwargs = sink_kwargs
        self.sinks: dict[str, Sink] = {}
        self._cond = threading.Condition()
        self._counter = _Counter()
        self.cert_path: Path | None = None

    def _build(self, port: int) -> dict[str, Sink]:
        sinks = {}
        for addr in self.addresses:
            kw = {**self.sink_kwargs, **self.per_sink.get(addr, {})}
            kw.setdefault("name", addr)
            tls = kw.get("starttls") or kw.get("implicit_tls")
            if tls and kw.get("cert") is None:
                name = str(kw.get("tls_name") or "localhost")
                kw["cert"] = self_signed_cert(name, self.addresses)
            sink = Sink(addr, port, **kw)  # type: ignore[arg-type]
            sink._watchers.append(self._cond)
            sink._counters.append(self._counter)
            sinks[addr] = sink
        return sinks

    def start(self) -> SinkGroup:
        for attempt in range(10):
            port = self._fixed_port or free_port_on(self.addresses)
            self.sinks = self._build(port)
            started: list[Sink] = []
            try:
                for sink in self.sinks.values():
                    started.append(sink.start())
            except BaseException as e:
                for s in started:
                    s.stop()
                busy = isinstance(e, OSError) and e.errno == errno.EADDRINUSE
                if self._fixed_port or not busy or attempt == 9:
                    raise
                continue
            self.port = port
            break
        certs = sorted({s.cert_path for s in self.sinks.values() if s.cert_path})
        if certs:
            bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=_tmpdir())) / "ca.pem"
            bundle.write_bytes(b"".join(Path(c).read_bytes() for c in certs))
            self.cert_path = bundle
        return self

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()

    def __enter__(self) -> SinkGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __getitem__(self, address: str) -> Sink:
        return self.sinks[address]

    def __iter__(self) -> Iterator[Sink]:
        return iter(self.sinks.values())

    def all_messages(self) -> list[Received]:
        """Every sink's messages, in order of arrival."""
        return sorted((m for s in self.sinks.values() for m in s.messages), key=lambda m: m.time)

    def _count(self) -> int:
        return sum(len(s.messages) for s in self.sinks.values())

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count() < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    parts = [s._describe(0, timeout) for s in self.sinks.values()]
                    raise TimeoutError(f"{self._count()} of {n} messages on port {self.port} "
                                       f"after {timeout}s:\n" + "\n".join(parts))
                self._cond.wait(left)
        return self.all_messages()

    @property
    def protocol_violations(self) -> list[str]:
        return [f"{s.name} {v}" for s in self.sinks.values() for v in s.protocol_violations]

    @property
    def connections_total(self) -> int:
        with self._counter.lock:
            return self._counter.total

    @property
    def max_concurrent(self) -> int:
        """Peak of connections open at once across all the sinks together."""
        with self._counter.lock:
            return self._counter.peak

    def reset(self) -> None:
        for sink in self.sinks.values():
            sink.reset()
        self._counter.reset()
