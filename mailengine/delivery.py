"""Outbound mail as Python sees it: what send() accepts, and the events
that tell what happened to every recipient."""
from __future__ import annotations

import email.utils
import json
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from typing import Any, Iterable

from .errors import Error

EVENT_TYPES = ("delivered", "deferred", "bounced", "expired", "delayed")


class SendError(Error):
    """send() could not queue the message (bad address, spool failure)."""


@dataclass(frozen=True)
class DeliveryEvent:
    """One recipient's outcome: ``type`` is delivered, deferred (will be
    retried), bounced (permanent failure; a DSN went to the sender),
    expired (gave up after the queue lifetime) or delayed."""

    type: str
    queue_id: str
    recipient: str
    sender: str
    mx: str | None
    ip: str | None
    code: int
    enhanced: str | None
    text: str
    attempt: int
    duration: float
    time: float
    tags: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, line: str | bytes) -> "DeliveryEvent":
        d = json.loads(line)
        return cls(d["type"], d["queue_id"], d["recipient"], d["sender"], d.get("mx"), d.get("ip"),
                   int(d.get("code") or 0), d.get("enhanced"), d.get("text", ""),
                   int(d.get("attempt") or 0), float(d.get("duration") or 0.0),
                   float(d.get("time") or 0.0), tuple(d.get("tags") or ()))


_BARE_LF = re.compile(rb"(?<!\r)\n")
_BAD_ADDR = re.compile(r"[\x00-\x20\x7f<>]")


def _check_address(addr: str, what: str, allow_empty: bool = False) -> str:
    if not isinstance(addr, str):
        raise SendError(f"{what}: {addr!r} is not a string")
    if addr == "" and allow_empty:
        return addr
    if _BAD_ADDR.search(addr) or "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        raise SendError(f"{what}: {addr!r} is not a mail address")
    if len(addr.encode()) > 512:
        raise SendError(f"{what}: {addr!r} is too long")
    return addr


def message_bytes(message: bytes | str | Message, hostname: str) -> bytes:
    """The message as CRLF bytes, with Date: and Message-ID: added when it
    has none (as Postfix's cleanup does)."""
    if isinstance(message, EmailMessage) or isinstance(message, Message):
        data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    elif isinstance(message, str):
        data = message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    else:
        raise SendError(f"message must be bytes, str or an email.message.Message, not {type(message).__name__}")
    if b"\n" in data and _BARE_LF.search(data):
        data = _BARE_LF.sub(b"\r\n", data)
    end = data.find(b"\r\n\r\n")
    head = (data if end < 0 else data[:end + 2]).lower()
    extra = b""
    if not head.startswith(b"date:") and b"\r\ndate:" not in head:
        extra += b"Date: " + email.utils.formatdate(localtime=False, usegmt=False).encode() + b"\r\n"
    if not head.startswith(b"message-id:") and b"\r\nmessage-id:" not in head:
        extra += b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode() + b"\r\n"
    if end < 0 and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return extra + data


def envelope_bytes(sender: str, recipients: Iterable[str], pool: str | None,
                   tags: Iterable[str] | None) -> bytes:
    """Envelope lines after the id (see docs/internals.md)."""
    sender = _check_address(sender, "sender", allow_empty=True)
    if isinstance(recipients, str):
        recipients = [recipients]
    rcpts = [_check_address(r, "recipient") for r in recipients]
    if not rcpts:
        raise SendError("recipients: at least one is needed")
    lines = [f"F {sender}"] + [f"R {r}" for r in rcpts]
    if pool is not None:
        if not isinstance(pool, str) or not pool or _BAD_ADDR.search(pool):
            raise SendError(f"pool: {pool!r} is not a pool name")
        lines.append(f"G {pool}")
    for t in tags or ():
        if not isinstance(t, str) or "\n" in t or "\t" in t:
            raise SendError(f"tags: {t!r} must be a string without newlines or tabs")
        lines.append(f"T {t}")
    lines.append("L python")
    lines.append("P local")
    return ("\n".join(lines) + "\n").encode("utf-8")


def outgoing_item(item: Any) -> tuple[Any, str, Any, str | None, Any]:
    """send_many() items: (message, sender, recipients) tuples, or dicts
    with message/sender/recipients and optional pool/tags."""
    if isinstance(item, dict):
        return (item["message"], item["sender"], item["recipients"], item.get("pool"), item.get("tags"))
    if isinstance(item, tuple) and len(item) in (3, 4, 5):
        msg, sender, rcpts, *rest = item
        return (msg, sender, rcpts, rest[0] if rest else None, rest[1] if len(rest) > 1 else None)
    raise SendError("send_many() items are (message, sender, recipients) tuples or dicts")


__all__ = ["DeliveryEvent", "SendError", "EVENT_TYPES"]
