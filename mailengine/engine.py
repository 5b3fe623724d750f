"""The Engine: configure, register hooks, run.

    engine = Engine(config)

    @engine.hook("rcpt_to")
    async def rcpt(session, address, params):
        if address.endswith("@blocked.test"):
            return Reject(550, "5.7.1 Not here")

    engine.run()                 # blocks; or `await engine.serve()`

The C workers never wait for Python: a hook call suspends only its own
session. Requests arrive on an eventfd that the asyncio loop watches; each
plain function runs directly, each coroutine as a task.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from . import _core
from .config import Config, Policy
from .delivery import DeliveryEvent, SendError, envelope_bytes, message_bytes, outgoing_item
from .errors import ConfigError, Error, QueueError, StartError
from .hooks import (HOOK_NAMES, Accept, Envelope, ReceivedEvent, Reject, Session, TempFail,
                    parse_envelope, parse_params)
from .queue import Queue
from .storage import Store, _Adapter

log = logging.getLogger("mailengine")

_HOOK_KINDS = {
    "connect": _core.HOOK_CONNECT,
    "helo": _core.HOOK_HELO,
    "mail_from": _core.HOOK_MAIL,
    "rcpt_to": _core.HOOK_RCPT,
    "data": _core.HOOK_DATA,
    "auth": _core.HOOK_AUTH,
    "destination_policy": _core.HOOK_POLICY,
    "deliver": _core.HOOK_DELIVER,
}
_KIND_NAMES = {v: k for k, v in _HOOK_KINDS.items()}


class Engine:
    """A mail engine: listeners, policy hooks, the durable queue."""

    def __init__(self, config: Config | None = None, *, events: bool = True,
                 store: Any = None) -> None:
        """``events=False`` keeps received events from ever reaching Python
        (for pure throughput: no per-message Python work at all).
        ``store``: a mailengine.storage.Store keeping the mailboxes instead
        of the Maildir store under mail_dir."""
        self.config = config if config is not None else Config()
        self._events = events
        if store is not None and not isinstance(store, Store):
            raise ConfigError("store", "must be a mailengine.storage.Store")
        self.store = store
        self._hooks: dict[str, Callable[..., Any]] = {}
        self._received_callbacks: list[Callable[[ReceivedEvent], Any]] = []
        self._received_queues: set[asyncio.Queue[ReceivedEvent | None]] = set()
        self._delivery_callbacks: list[Callable[[DeliveryEvent], Any]] = []
        self._delivery_queues: set[asyncio.Queue[DeliveryEvent | None]] = set()
        self._want_deliveries = False
        self._core: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_timeout = 30.0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.queue = Queue(lambda: self.config.data_dir)

    # -- hooks and events ---------------------------------------------------

    def hook(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a hook: connect(session), helo(session, name),
        mail_from(session, address, params), rcpt_to(session, address, params),
        data(session, envelope, message), auth(session, mechanism, username,
        password), for delivery destination_policy(domain, mx_hosts) ->
        Policy (or None for the configured one), asked once per destination
        before its first connection, and for local delivery deliver(user,
        message[, recipient]) -> folder name (None: INBOX), Reject or
        TempFail, asked once per local recipient. Plain functions and
        ``async def`` both work."""
        if name not in HOOK_NAMES:
            raise ConfigError("hook", f"unknown hook {name!r}; known: {', '.join(HOOK_NAMES)}")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.set_hook(name, fn)
            return fn

        return register

    def set_hook(self, name: str, fn: Callable[..., Any] | None) -> None:
        if name not in HOOK_NAMES:
            raise ConfigError("hook", f"unknown hook {name!r}; known: {', '.join(HOOK_NAMES)}")
        if self._core is not None:
            raise ConfigError("hook", "hooks are set before the engine starts")
        if fn is None:
            self._hooks.pop(name, None)
        else:
            self._hooks[name] = fn

    def on_received(self, fn: Callable[[ReceivedEvent], Any]) -> Callable[[ReceivedEvent], Any]:
        """Decorator: fn(event) for every message accepted into the queue."""
        self._received_callbacks.append(fn)
        return fn

    async def received(self) -> AsyncIterator[ReceivedEvent]:
        """Async iterator over received events, from now until the engine stops.
        Register it before serving (or call once) so no event is missed."""
        async for ev in _drain_queue(self._received_queues):
            yield ev

    def on_delivery(self, fn: Callable[[DeliveryEvent], Any]) -> Callable[[DeliveryEvent], Any]:
        """Decorator: fn(event) for every recipient's outcome (delivered,
        deferred, bounced, expired). Register before the engine starts."""
        if self._core is not None:
            raise ConfigError("on_delivery", "register delivery callbacks before the engine starts")
        self._delivery_callbacks.append(fn)
        return fn

    def watch_deliveries(self) -> None:
        """Ask for delivery events in Python (for ``deliveries()``) before
        the engine starts. Every event is also in data_dir/events.jsonl."""
        if self._core is not None:
            raise ConfigError("deliveries", "ask for delivery events before the engine starts")
        self._want_deliveries = True

    async def deliveries(self) -> AsyncIterator[DeliveryEvent]:
        """Async iterator over delivery events from now until the engine
        stops (call watch_deliveries() before starting)."""
        async for ev in _drain_queue(self._delivery_queues):
            yield ev

    # -- sending ---------------------------------------------------------------

    def _running_core(self) -> Any:
        core = self._core
        if core is None:
            raise StartError("the engine is not running: start() or serve() it first")
        return core

    def send(self, message: bytes | str | Any, *, sender: str, recipients: Any,
             pool: str | None = None, tags: Any = None) -> str:
        """Queue one message durably and return its queue id. ``message`` is
        bytes, str or an email.message.EmailMessage; Date: and Message-ID:
        are added when missing. Returns once the message is on disk."""
        core = self._running_core()
        self._check_pool(pool)
        item = (envelope_bytes(sender, recipients, pool, tags),
                self._message(message))
        ids = self._submit(core, [item])
        if not ids or ids[0] is None:
            raise SendError("the spool could not store the message (see the log)")
        return ids[0]

    def send_many(self, items: Any, *, batch: int = 256) -> list[str]:
        """Queue many messages: items are (message, sender, recipients)
        tuples (optionally with pool and tags) or dicts. They are written in
        batches of ``batch`` (one disk sync each), so memory stays bounded
        by the batch whatever the iterable's length. Returns the queue ids."""
        core = self._running_core()
        if batch < 1:
            raise ValueError("batch must be at least 1")
        host = self.config.hostname
        ids: list[str] = []
        chunk: list[tuple[bytes, bytes]] = []
        for it in items:
            msg, sender, rcpts, pool, tags = outgoing_item(it)
            self._check_pool(pool)
            chunk.append((envelope_bytes(sender, rcpts, pool, tags), self._message(msg, host)))
            if len(chunk) >= batch:
                ids.extend(self._submit(core, chunk))
                chunk = []
        if chunk:
            ids.extend(self._submit(core, chunk))
        return ids

    def _message(self, message: Any, host: str | None = None) -> bytes:
        data = message_bytes(message, host or self.config.hostname)
        limit = self.config.limits.max_message_size
        if limit and len(data) > limit:
            # The same limit as SMTP's SIZE (Postfix applies message_size_limit to sendmail too).
            raise SendError(f"message of {len(data)} bytes is over limits.max_message_size ({limit})")
        return data

    def _check_pool(self, pool: str | None) -> None:
        if pool is not None and pool not in self.config.source_pools:
            raise SendError(f"pool: no source pool named {pool!r} (configured: "
                            f"{', '.join(self.config.source_pools) or 'none'})")

    @staticmethod
    def _submit(core: Any, chunk: list[tuple[bytes, bytes]]) -> list[str]:
        try:
            got = core.submit(chunk)
        except ValueError as e:        # an alias that loops
            raise SendError(str(e)) from None
        if any(i is None for i in got):
            raise SendError(f"the spool could not store {sum(i is None for i in got)} message(s)")
        return got

    # -- queue control on the running engine -------------------------------------

    def _control(self, op: int, queue_id: str | None) -> int:
        rc = self._running_core().queue_control(op, queue_id)
        if rc < 0:
            raise QueueError(f"no queued message {queue_id}" if queue_id else "queue control failed")
        return rc

    def hold(self, queue_id: str | None = None) -> int:
        """Stop delivery of a message (or of all); returns how many."""
        return self._control(_core.QOP_HOLD, queue_id)

    def release(self, queue_id: str | None = None) -> int:
        """Undo hold(): the message is delivered now."""
        return self._control(_core.QOP_RELEASE, queue_id)

    def retry(self, queue_id: str | None = None) -> int:
        """Try deferred messages now instead of waiting for their next retry."""
        return self._control(_core.QOP_RETRY, queue_id)

    def delete(self, queue_id: str) -> None:
        """Remove a message from the queue without a bounce."""
        if not queue_id:
            raise QueueError("delete needs a queue id")
        self._control(_core.QOP_DELETE, queue_id)

    def queue_stats(self) -> dict[str, int]:
        """Messages queued, open connections, and counts of outcomes so far."""
        return dict(self._running_core().queue_stats())

    # -- running ------------------------------------------------------------

    def _hooks_mask(self) -> int:
        mask = 0
        for name in self._hooks:
            mask |= 1 << _HOOK_KINDS[name]
        if self._events or self._received_callbacks:
            mask |= 1 << _core.EVENT_RECEIVED  # posted after commit, never waited on
        return mask

    def _make_core(self) -> Any:
        from . import users as user_file

        # Users kept with `mailengine user` (DATA/users) join the configured
        # ones; a configured user wins over the file.
        known = {u.address.lower() for u in self.config.users}
        self.config.users = self.config.users + [
            u for u in user_file.load(str(self.config.data_dir)) if u.address not in known]
        self.config.validate()
        try:
            wants = bool(self._delivery_callbacks) or self._want_deliveries
            cfg = self.config.to_core(self._hooks_mask(), events_to_python=wants)
            cfg["delivery"]["policy_hook"] = "destination_policy" in self._hooks
        except OSError as e:
            raise StartError(f"cannot prepare TLS certificate: {e}") from e
        try:
            core = _core.Engine(cfg)
        except ValueError as e:
            key, _, msg = str(e).partition(": ")
            raise ConfigError(key, msg or str(e)) from None
        if self.store is not None:
            core.set_store(_Adapter(self.store))
        return core

    async def serve(self) -> None:
        """Run inside the caller's asyncio loop until stop() is called."""
        if self._core is not None:
            raise StartError("engine is already running")
        core = self._make_core()
        from .control import engine_running

        if engine_running(self.config.data_dir):
            raise StartError(f"another engine is running on {self.config.data_dir} "
                             "(its control socket answers)")
        try:
            core.start()
        except OSError as e:
            raise StartError(str(e)) from None
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._loop.add_reader(core.fileno(), self._on_requests)
        control = None
        try:
            from .control import serve_control

            control = await serve_control(self, self.config.data_dir)
        except (OSError, Error) as e:
            log.warning("mailengine: no control socket: %s", e)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            if control is not None:
                control.close()
                from .control import socket_path

                try:
                    os.unlink(socket_path(self.config.data_dir))
                except OSError:
                    pass
            timeout = self._stop_timeout
            core.stop(timeout)
            # Hooks still pending are answered while the workers drain; at
            # the deadline, hooks still running are cancelled (they answer
            # 451) so that no worker waits on Python.
            join = asyncio.ensure_future(asyncio.to_thread(core.join))
            deadline = self._loop.time() + timeout
            while not join.done():
                self._on_requests()
                if self._loop.time() >= deadline:
                    for t in list(self._tasks):
                        t.cancel()
                await asyncio.wait([join], timeout=0.05)
            self._loop.remove_reader(core.fileno())
            self._on_requests()
            for q in list(self._received_queues):
                q.put_nowait(None)
            for dq in list(self._delivery_queues):
                dq.put_nowait(None)
            for t in list(self._tasks):
                t.cancel()
            self._core = None
            self._ready.clear()

    def run(self) -> None:
        """Run until stop() (or Ctrl-C). Blocks; the GIL is free while idle."""
        try:
            asyncio.run(self.serve())
        except KeyboardInterrupt:
            pass

    def start(self) -> "Engine":
        """Serve from a background thread and return once listeners are open."""
        if self._thread is not None:
            raise StartError("engine is already running")
        self._ready.clear()
        self._start_error = None

        def main() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as e:  # reported to start()'s caller
                self._start_error = e
                self._ready.set()

        self._thread = threading.Thread(target=main, name="mailengine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let transactions in flight finish (up to timeout
        seconds), then close. Safe from any thread; waits when serving from
        start()."""
        self._stop_timeout = timeout
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._core is not None and self._core.running

    # -- dispatch -------------------------------------------------------------

    def _on_requests(self) -> None:
        core = self._core
        if core is None:
            return
        for req in core.drain():
            try:
                self._dispatch(req)
            except Exception:
                log.exception("mailengine: hook dispatch failed")
                _answer_error(req)

    def _dispatch(self, req: Any) -> None:
        kind = req.kind
        if kind == _core.EVENT_DELIVERY:
            line = req.args[0]
            req.reply(_core.ACCEPT)
            dev = DeliveryEvent.from_json(line)
            for dcb in self._delivery_callbacks:
                try:
                    res = dcb(dev)
                    if inspect.isawaitable(res):
                        self._spawn(res, None)
                except Exception:
                    log.exception("mailengine: delivery callback failed")
            for dq in self._delivery_queues:
                dq.put_nowait(dev)
            return
        sid, ip, port, listener, helo, auth_user, tls = req.session
        session = Session(sid, ip, port, listener, helo, auth_user, tls)
        a1, a2, a3 = req.args
        if kind == _core.EVENT_RECEIVED:
            env = parse_envelope(a2 or "")
            event = ReceivedEvent(a1, env, int(a3 or 0), session)
            req.reply(_core.ACCEPT)
            for cb in self._received_callbacks:
                try:
                    res = cb(event)
                    if inspect.isawaitable(res):
                        self._spawn(res, None)
                except Exception:
                    log.exception("mailengine: received callback failed")
            for q in self._received_queues:
                q.put_nowait(event)
            return
        name = _KIND_NAMES[kind]
        fn = self._hooks.get(name)
        if fn is None:
            req.reply(_core.ACCEPT)
            return
        if name == "destination_policy":
            self._policy_call(req, fn)
            return
        if name == "connect":
            args: tuple[Any, ...] = (session,)
        elif name == "helo":
            args = (session, a1)
        elif name in ("mail_from", "rcpt_to"):
            args = (session, a1, parse_params(a2))
        elif name == "data":
            args = (session, parse_envelope(a1 or ""), req.data)
        elif name == "deliver":
            # deliver(user, message[, recipient]): the mailbox, the message
            # as stored (below our Return-Path/Delivered-To), and the
            # recipient address as given (with its +tag) when asked for.
            args = (a1, req.data, a2) if _wants_args(fn, 3) else (a1, req.data)
        else:  # auth
            args = (session, a1, a2, a3)
        try:
            res = fn(*args)
        except Exception:
            log.exception("mailengine: %s hook raised", name)
            _answer_error(req)
            return
        if inspect.isawaitable(res):
            self._spawn(res, (req, name))
        else:
            _answer(req, name, res)

    def _policy_call(self, req: Any, fn: Callable[..., Any]) -> None:
        a1, a2, _ = req.args
        hosts = [h for h in (a2 or "").split(" ") if h]

        def answer(res: Any) -> None:
            if res is None:
                req.reply(_core.ACCEPT)
            elif isinstance(res, Policy):
                req.reply(_core.ACCEPT, 0, _policy_words(res))
            else:
                log.error("mailengine: destination_policy returned %r; expected a Policy or None", res)
                req.reply(_core.ACCEPT)

        try:
            res = fn(a1, hosts)
        except Exception:
            log.exception("mailengine: destination_policy hook raised; the configured policy applies")
            req.reply(_core.ACCEPT)
            return
        if inspect.isawaitable(res):
            async def runner() -> None:
                try:
                    answer(await res)
                except Exception:
                    log.exception("mailengine: destination_policy hook raised; the configured policy applies")
                    req.reply(_core.ACCEPT)

            task = asyncio.ensure_future(runner())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            answer(res)

    def _spawn(self, aw: Awaitable[Any], pending: tuple[Any, str] | None) -> None:
        async def runner() -> None:
            try:
                res = await aw
            except asyncio.CancelledError:
                if pending:
                    _answer_error(pending[0])
                raise
            except Exception:
                log.exception("mailengine: %s hook raised", pending[1] if pending else "event")
                if pending:
                    _answer_error(pending[0])
                return
            if pending:
                _answer(pending[0], pending[1], res)

        task = asyncio.ensure_future(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _wants_args(fn: Callable[..., Any], n: int) -> bool:
    """Does fn take n positional arguments?"""
    try:
        inspect.signature(fn).bind(*range(n))
        return True
    except (TypeError, ValueError):
        return False


def _answer(req: Any, name: str, res: Any) -> None:
    if name == "auth" and isinstance(res, bool):
        # True: the credentials are good. False: they are not. None or
        # Accept(): let the engine's user table decide.
        if res:
            req.reply(_core.AUTHENTICATED)
        else:
            req.reply(_core.REJECT, 535, "5.7.8 Error: authentication failed")
        return
    if name == "deliver" and isinstance(res, str):
        req.reply(_core.ACCEPT, 0, res)         # the folder to file it in
        return
    if res is None or isinstance(res, Accept):
        req.reply(_core.ACCEPT)
    elif isinstance(res, Reject):
        req.reply(_core.REJECT, int(res.code), str(res.text))
    elif isinstance(res, TempFail):
        req.reply(_core.TEMPFAIL, int(res.code), str(res.text))
    else:
        log.error("mailengine: %s hook returned %r; expected Accept, Reject, TempFail or None",
                  name, res)
        _answer_error(req)


async def _drain_queue(registry: set[Any]) -> AsyncIterator[Any]:
    """Events put into a queue registered in ``registry`` until None comes."""
    q: asyncio.Queue[Any] = asyncio.Queue()
    registry.add(q)
    try:
        while True:
            ev = await q.get()
            if ev is None:
                return
            yield ev
    finally:
        registry.discard(q)


def _policy_words(p: Policy) -> str:
    """The policy as the queue reads it: key=value words."""
    words = [f"max_connections={int(p.max_connections)}",
             f"max_messages_per_connection={int(p.max_messages_per_connection)}",
             f"max_recipients={int(p.max_recipients)}", f"tls={p.tls}",
             f"tls_verify={1 if p.tls_verify else 0}"]
    if p.pool and " " not in p.pool:
        words.append(f"pool={p.pool[:63]}")
    for name in ("rate_per_second", "rate_per_minute", "rate_per_hour"):
        v = getattr(p, name)
        words.append(f"{name}={float(v) if v else 0.0}")
    return " ".join(words)


def _answer_error(req: Any) -> None:
    try:
        req.reply(_core.TEMPFAIL, 451, "4.3.0 Error: internal error in policy hook")
    except RuntimeError:
        pass  # already answered


__all__ = ["Engine", "Envelope", "QueueError"]
