"""The queue as Python sees it: list, show and delete messages in the spool.

Works on a running engine's data directory and on a stopped one alike: the
spool files are the queue.
"""
from __future__ import annotations

import email.parser
import email.policy
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import _core
from .errors import QueueError
from .hooks import Envelope, parse_envelope


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    arrival: float          # Unix time
    envelope: Envelope
    size: int
    message_id: str | None = None

    def to_json(self) -> dict[str, object]:
        e = self.envelope
        return {
            "id": self.id,
            "arrival": self.arrival,
            "sender": e.mail_from,
            "recipients": list(e.rcpt_tos),
            "size": self.size,
            "message_id": self.message_id,
            "client_ip": e.client_ip,
            "helo": e.helo,
            "auth_user": e.auth_user,
            "listener": e.listener,
            "protocol": e.protocol,
        }


def _message_id(raw: bytes) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0]
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    mid = msg.get("Message-ID")
    return str(mid).strip() if mid else None


class Queue:
    """Queue control for a data directory."""

    def __init__(self, data_dir: Callable[[], str] | str) -> None:
        self._dir = data_dir if callable(data_dir) else (lambda: data_dir)

    @property
    def data_dir(self) -> str:
        return os.path.abspath(self._dir())

    def list(self, *, with_message_id: bool = False) -> list[QueuedMessage]:
        try:
            rows = _core.queue_list(self.data_dir)
        except OSError as e:
            raise QueueError(f"cannot read the spool in {self.data_dir}: {e}") from None
        out = []
        for qid, arrival_ms, env, size, head in rows:
            mid = _message_id(head) if with_message_id else None
            out.append(QueuedMessage(qid, arrival_ms / 1000.0,
                                     parse_envelope(env.decode("utf-8", "surrogateescape")),
                                     size, mid))
        return out

    def show(self, queue_id: str) -> tuple[QueuedMessage, bytes]:
        """The message's queue entry and its bytes (Received: header first)."""
        try:
            row = _core.queue_read(self.data_dir, queue_id)
        except OSError as e:
            raise QueueError(f"cannot read the spool in {self.data_dir}: {e}") from None
        if row is None:
            raise QueueError(f"no queued message {queue_id!r}")
        qid, arrival_ms, env, raw = row
        entry = QueuedMessage(qid, arrival_ms / 1000.0,
                              parse_envelope(env.decode("utf-8", "surrogateescape")), len(raw),
                              _message_id(raw))
        return entry, raw

    def delete(self, queue_id: str) -> None:
        try:
            ok = _core.queue_delete(self.data_dir, queue_id)
        except OSError as e:
            raise QueueError(f"cannot delete {queue_id}: {e}") from None
        if not ok:
            raise QueueError(f"no queued message {queue_id!r}")

    def hold(self, queue_id: str | None, on: bool = True) -> int:
        """Hold (or release) a message, or all, in the spool of an engine
        that is not running: the queue reads the mark when it starts.
        Returns how many messages were marked."""
        ids = [queue_id] if queue_id else [e.id for e in self.list()]
        n = 0
        for qid in ids:
            try:
                ok = _core.queue_mark(self.data_dir, qid, "H" if on else "U")
            except OSError as e:
                raise QueueError(f"cannot mark {qid}: {e}") from None
            if not ok and queue_id:
                raise QueueError(f"no queued message {queue_id!r}")
            n += bool(ok)
        return n
