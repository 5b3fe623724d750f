"""Mailbox stores kept by Python.

By default mailboxes are Maildir++ directories that the C core writes and
reads itself. Give ``Engine(config, store=...)`` an object of a
:class:`Store` subclass to keep mail in your own system instead (a
database, an object store, a remote service): local delivery calls its
``deliver``, POP3 (and later IMAP) its ``list``, ``read``, ``delete`` and
``set_flags``.

The methods are called from the engine's background store threads, with
the GIL taken, one call at a time per mailbox session but possibly several
at once for different mailboxes: make them thread-safe, and plain (not
``async def``) functions. A method that raises makes the operation fail
temporarily (delivery is retried later, POP3 answers -ERR) and the
traceback is logged; :class:`QuotaExceeded` from ``deliver`` defers the
message with 4.2.2 (mailbox full) until the queue gives up and bounces it.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import Error

log = logging.getLogger("mailengine")

__all__ = ["MemoryStore", "QuotaExceeded", "Store", "StoredMessage", "FLAG_LETTERS"]

# IMAP system flags and the Maildir letters that carry them (the letters are
# what the C core passes around; Python sees the IMAP names).
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "$Forwarded": "P", "\\Answered": "R",
                "\\Seen": "S", "\\Deleted": "T"}
_LETTER_FLAGS = {v: k for k, v in FLAG_LETTERS.items()}


class QuotaExceeded(Error):
    """Raised by Store.deliver when the user's mailbox is full."""


@dataclass(frozen=True)
class StoredMessage:
    """One message of a folder as ``Store.list`` describes it. ``uid`` is
    unique in the folder and never reused while ``uidvalidity`` stays the
    same; ``id`` is a stable name (POP3 UIDL; default: the uid)."""

    uid: int
    size: int
    flags: frozenset[str] = frozenset()
    internal_date: float = 0.0
    id: str | None = None
    modseq: int = 1


class Store:
    """Base class of a Python mailbox store. ``user`` is the mailbox's
    address in lower case without "+tag"; ``folder`` is "INBOX" or a name
    like "Junk" or "Archive.2024" (what the deliver hook returned)."""

    def deliver(self, user: str, folder: str, message: bytes) -> str | None:
        """Store a new message (Return-Path and Delivered-To already on top);
        return an id for the log, or None. Raise QuotaExceeded when full."""
        raise NotImplementedError

    def list(self, user: str, folder: str) -> Iterable[StoredMessage]:
        """The folder's messages (any order; an unknown folder is empty)."""
        raise NotImplementedError

    def read(self, user: str, folder: str, uid: int) -> bytes:
        """The whole message; raise KeyError when it is gone."""
        raise NotImplementedError

    def delete(self, user: str, folder: str, uids: list[int]) -> None:
        """Remove these messages (ones already gone are not an error)."""
        raise NotImplementedError

    def set_flags(self, user: str, folder: str, uid: int, flags: frozenset[str]) -> None:
        """Replace a message's flags (IMAP names: \\Seen, \\Answered, ...)."""
        raise NotImplementedError

    def uidvalidity(self, user: str, folder: str) -> int:
        """IMAP's UIDVALIDITY of the folder: change it when uids are reused."""
        return 1

    def check_quota(self, user: str, size: int) -> bool:
        """May one more message of size bytes be delivered to user? (Asked
        when an SMTP client announces a message; deliver decides anyway.)"""
        return True

    def usage(self, user: str) -> tuple[int, int]:
        """(bytes, messages) the user keeps, for the users' configured
        quotas (default: what INBOX lists)."""
        msgs = list(self.list(user, "INBOX"))
        return sum(m.size for m in msgs), len(msgs)


class MemoryStore(Store):
    """Mailboxes in memory (lost when the process ends): for tests, and the
    reference for writing a store. ``quota`` limits each user's bytes."""

    def __init__(self, quota: int = 0) -> None:
        self.quota = quota
        self._lock = threading.Lock()
        # (user, folder) -> {uid: [message bytes, flags, date, id]}
        self._boxes: dict[tuple[str, str], dict[int, list]] = {}
        self._next: dict[tuple[str, str], int] = {}
        self._count = 0

    def _used(self, user: str) -> int:
        return sum(len(m[0]) for (u, _), box in self._boxes.items() if u == user for m in box.values())

    def usage(self, user: str) -> tuple[int, int]:
        with self._lock:
            return self._used(user), sum(len(b) for (u, _), b in self._boxes.items() if u == user)

    def deliver(self, user: str, folder: str, message: bytes) -> str | None:
        with self._lock:
            if self.quota and self._used(user) + len(message) > self.quota:
                raise QuotaExceeded(f"{user} is over its quota of {self.quota} bytes")
            key = (user, folder)
            uid = self._next.get(key, 1)
            self._next[key] = uid + 1
            self._count += 1
            mid = f"{int(time.time())}.mem{self._count}"
            self._boxes.setdefault(key, {})[uid] = [bytes(message), frozenset(), time.time(), mid]
            return mid

    def list(self, user: str, folder: str) -> list[StoredMessage]:
        with self._lock:
            box = self._boxes.get((user, folder), {})
            return [StoredMessage(uid, len(m[0]), m[1], m[2], m[3]) for uid, m in sorted(box.items())]

    def read(self, user: str, folder: str, uid: int) -> bytes:
        with self._lock:
            return self._boxes[(user, folder)][uid][0]

    def delete(self, user: str, folder: str, uids: list[int]) -> None:
        with self._lock:
            box = self._boxes.get((user, folder), {})
            for uid in uids:
                box.pop(uid, None)

    def set_flags(self, user: str, folder: str, uid: int, flags: frozenset[str]) -> None:
        with self._lock:
            self._boxes[(user, folder)][uid][1] = frozenset(flags)

    def check_quota(self, user: str, size: int) -> bool:
        with self._lock:
            return not self.quota or self._used(user) + size <= self.quota

    def folders(self, user: str) -> list[str]:
        with self._lock:
            return sorted(f for (u, f) in self._boxes if u == user)


@dataclass
class _Adapter:
    """What the C core calls: plain tuples and -errno codes in, every
    exception logged and turned into a code here."""

    store: Store
    _seen: set[str] = field(default_factory=set)

    def _fail(self, what: str, e: BaseException) -> int:
        if isinstance(e, QuotaExceeded):
            return -errno.EDQUOT
        if isinstance(e, KeyError):
            return -errno.ENOENT
        log.error("mailengine: store %s failed", what, exc_info=e)
        return -errno.EIO

    def deliver(self, user: str, folder: str, data: bytes, quota_bytes: int, quota_messages: int) -> tuple[int, str]:
        try:
            if self._over(user, len(data), quota_bytes, quota_messages):
                return -errno.EDQUOT, ""
            mid = self.store.deliver(user, folder, data)
            return 0, str(mid or "")
        except BaseException as e:  # noqa: BLE001 - every failure becomes a code
            return self._fail("deliver", e), ""

    def _over(self, user: str, size: int, quota_bytes: int, quota_messages: int) -> bool:
        """Would one more message of size bytes exceed the user's configured quota?"""
        if not (quota_bytes or quota_messages):
            return False
        used, count = self.store.usage(user)
        return bool((quota_bytes and used + size > quota_bytes) or
                    (quota_messages and count + 1 > quota_messages))

    def quota_check(self, user: str, size: int, quota_bytes: int, quota_messages: int) -> int:
        try:
            if self._over(user, size, quota_bytes, quota_messages):
                return -errno.EDQUOT
            return 0 if self.store.check_quota(user, size) else -errno.EDQUOT
        except BaseException as e:  # noqa: BLE001
            return self._fail("check_quota", e)

    def open(self, user: str, folder: str) -> tuple[int, int, int, int, list[tuple]]:
        try:
            msgs = sorted(self.store.list(user, folder), key=lambda m: m.uid)
            out = []
            for m in msgs:
                letters = "".join(sorted(FLAG_LETTERS[f] for f in m.flags if f in FLAG_LETTERS))
                ident = str(m.id if m.id is not None else m.uid)
                ident = "".join(c if 0x21 <= ord(c) <= 0x7E else "_" for c in ident)[:70] or str(m.uid)
                out.append((int(m.uid), int(m.modseq), int(m.size), int(m.internal_date), letters, ident))
            uidnext = (out[-1][0] + 1) if out else 1
            hms = max((o[1] for o in out), default=1)
            return 0, int(self.store.uidvalidity(user, folder)), uidnext, hms, out
        except BaseException as e:  # noqa: BLE001
            return self._fail("list", e), 0, 0, 0, []

    def read(self, user: str, folder: str, uid: int) -> tuple[int, bytes]:
        try:
            return 0, bytes(self.store.read(user, folder, uid))
        except BaseException as e:  # noqa: BLE001
            return self._fail("read", e), b""

    def expunge(self, user: str, folder: str, uids: list[int]) -> int:
        try:
            self.store.delete(user, folder, list(uids))
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail("delete", e)

    def set_flags(self, user: str, folder: str, uid: int, letters: str) -> int:
        try:
            self.store.set_flags(user, folder, uid, frozenset(_LETTER_FLAGS[c] for c in letters
                                                              if c in _LETTER_FLAGS))
            return 0
        except BaseException as e:  # noqa: BLE001
            return self._fail("set_flags", e)
