"""What hooks receive and return.

Hooks get small immutable views of the session and the transaction, and
return a decision: ``Accept()``, ``Reject(code, text)`` or
``TempFail(code, text)``. Returning ``None`` accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Accept:
    """Go on as the engine's own policy says."""


@dataclass(frozen=True)
class Reject:
    """Refuse permanently with a 5xx reply. ``text`` may start with an enhanced code."""

    code: int = 550
    text: str = "5.7.1 Rejected by policy"


@dataclass(frozen=True)
class TempFail:
    """Refuse for now with a 4xx reply; the client will retry."""

    code: int = 451
    text: str = "4.7.1 Try again later"


Decision = Accept | Reject | TempFail


@dataclass(frozen=True)
class Session:
    """The client connection a hook is called for."""

    id: str
    peer_ip: str
    peer_port: int
    listener: str
    helo: str | None
    auth_user: str | None
    tls: bool


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: sender, recipients and their ESMTP parameters."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_params: dict[str, str | None] = field(default_factory=dict)
    rcpt_params: tuple[dict[str, str | None], ...] = ()
    queue_id: str | None = None
    client_ip: str | None = None
    helo: str | None = None
    auth_user: str | None = None
    listener: str | None = None
    protocol: str | None = None


@dataclass(frozen=True)
class ReceivedEvent:
    """A message was accepted and is on stable storage in the queue."""

    queue_id: str
    envelope: Envelope
    size: int
    session: Session


def parse_params(raw: str | None) -> dict[str, str | None]:
    """ESMTP parameters "KEY=VALUE KEY2" as a dict with upper-case keys."""
    out: dict[str, str | None] = {}
    for item in (raw or "").split():
        key, eq, value = item.partition("=")
        out[key.upper()] = value if eq else None
    return out


def parse_envelope(text: str) -> Envelope:
    """Parse the envelope lines the engine writes (see docs/internals.md)."""
    mail_from = ""
    mail_params: dict[str, str | None] = {}
    rcpts: list[str] = []
    rparams: list[dict[str, str | None]] = []
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if len(line) < 2 or line[1] != " ":
            continue
        key, value = line[0], line[2:]
        addr, _, params = value.partition("\t")
        if key == "F":
            mail_from, mail_params = addr, parse_params(params)
        elif key == "R":
            rcpts.append(addr)
            rparams.append(parse_params(params))
        else:
            fields[key] = value
    client = fields.get("C", "").split("\t")[0] or None
    queue_id = fields.get("I")
    if queue_id and set(queue_id) == {"0"}:
        queue_id = None
    return Envelope(
        mail_from=mail_from,
        rcpt_tos=tuple(rcpts),
        mail_params=mail_params,
        rcpt_params=tuple(rparams),
        queue_id=queue_id,
        client_ip=client,
        helo=fields.get("H"),
        auth_user=fields.get("A"),
        listener=fields.get("L"),
        protocol=fields.get("P"),
    )


HOOK_NAMES = ("connect", "helo", "mail_from", "rcpt_to", "data", "auth", "destination_policy", "deliver")
