"""A raw SMTP client for tests: bytes go out exactly as given, replies come
back whole. Shared by the protocol and limit tests."""
from __future__ import annotations

import base64
import socket
import ssl
import time

USER = "alice@example.test"
PASSWORD = "secret"


def client_tls() -> ssl.SSLContext:
    """The engine's certificate is self-signed: do not verify it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Raw:
    """A raw SMTP client: bytes go out exactly as given, replies come back
    whole (every line of a multi-line reply). Every read is bounded by the
    socket timeout and by a size cap."""

    MAX_BUF = 1 << 20

    def __init__(self, port: int, *, timeout: float = 5.0, tls: bool = False) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls:
            self.sock = client_tls().wrap_socket(self.sock)
        self.buf = b""

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buf!r}")
        self.buf += chunk
        assert len(self.buf) < self.MAX_BUF, "runaway reply"

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, str]:
        """One full reply: (code, text with the lines joined by newlines)."""
        lines = []
        for _ in range(200):
            ln = self.line()
            lines.append(ln)
            if ln[3:4] != b"-":
                break
        codes = {ln[:3] for ln in lines}
        assert len(codes) == 1 and lines[-1][:3].isdigit(), f"malformed reply {lines!r}"
        return int(lines[-1][:3]), "\n".join(ln[4:].decode("utf-8", "replace") for ln in lines)

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        """Wrap the socket after a 220 to STARTTLS; nothing may be buffered."""
        assert self.buf == b"", f"plaintext left before the handshake: {self.buf!r}"
        self.sock = client_tls().wrap_socket(self.sock)

    def quiet(self, wait: float = 0.3) -> bytes:
        """Whatever the server sends within `wait` seconds (b"" if nothing)."""
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            data = self.buf + self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            data = self.buf
        finally:
            self.sock.settimeout(old)
        self.buf = b""
        return data

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset) with nothing more sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return False
            except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
                return True
            if not chunk:
                return True
            self.buf += chunk
            return False
        return False


def session(port: int, helo: str = "EHLO client.test", **kw: object) -> Raw:
    r = Raw(port, **kw)  # type: ignore[arg-type]
    code, _ = r.reply()
    assert code == 220
    code, _ = r.cmd(helo)
    assert code == 250
    return r


def auth_plain(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


