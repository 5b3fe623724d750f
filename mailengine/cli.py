"""The `mailengine` command: serve, queue, hash-password."""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from .config import Config, Listener, parse_hostport
from .engine import Engine
from .errors import Error


def _serve(args: argparse.Namespace) -> int:
    demo_password = None
    if args.config:
        cfg = Config.from_toml(args.config)
    elif not (args.smtp or args.submission or args.smtps or args.domain or args.user):
        cfg, demo_password = Config.embedded_default(args.data or "./mail-data")
    else:
        cfg = Config()
    if args.data:
        cfg.data_dir = args.data
    listeners = []
    for kind, values in (("mx", args.smtp), ("submission", args.submission), ("smtps", args.smtps)):
        for v in values or []:
            host, port = parse_hostport(v, f"--{'smtp' if kind == 'mx' else kind}")
            listeners.append(Listener(kind, host, port))
    if listeners:
        cfg.listeners = listeners
    if args.domain:
        cfg.domains = list(args.domain)
    for spec in args.user or []:
        addr, sep, pw = spec.partition(":")
        if not sep:
            print(f"mailengine: --user {spec!r}: expected ADDRESS:PASSWORD", file=sys.stderr)
            return 2
        cfg.add_user(addr, pw)
    if args.trusted_network:
        cfg.trusted_networks = [] if args.trusted_network == ["none"] else list(args.trusted_network)
    if args.tls_cert or args.tls_key:
        cfg.tls_cert, cfg.tls_key = args.tls_cert, args.tls_key
    if args.workers is not None:
        cfg.workers = args.workers
    if args.hostname:
        cfg.hostname = args.hostname
    if args.log_level:
        cfg.log_level = args.log_level
    if args.allow_plain_auth:
        cfg.allow_plain_auth = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    engine = Engine(cfg, events=bool(args.print_received))
    if args.print_received:
        @engine.on_received
        def _show(ev: Any) -> None:
            print(f"received {ev.queue_id} from <{ev.envelope.mail_from}> to "
                  f"{', '.join('<' + r + '>' for r in ev.envelope.rcpt_tos)} ({ev.size} bytes)",
                  flush=True)
    # Handlers first: a SIGTERM right after "ready" must stop us cleanly.
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        engine.start()
    except Error as e:
        print(f"mailengine: {e}", file=sys.stderr)
        return 1
    for ls in cfg.listeners:
        print(f"mailengine: {ls.kind} listening on {ls.host}:{ls.port}", flush=True)
    print(f"mailengine: data directory {os.path.abspath(cfg.data_dir)}, local domains: "
          f"{', '.join(cfg.domains) or '(none)'}", flush=True)
    if demo_password:
        print(f"mailengine: demo user demo@example.test, password {demo_password}", flush=True)
    print("mailengine: ready", flush=True)
    while not stop["now"] and engine.running:
        time.sleep(0.2)
    engine.stop(timeout=args.drain_timeout)
    print("mailengine: stopped", flush=True)
    return 0


def _queue(args: argparse.Namespace) -> int:
    from .queue import Queue

    q = Queue(args.data)
    try:
        if args.action == "list":
            entries = q.list(with_message_id=True)
            if args.json:
                print(json.dumps([e.to_json() for e in entries], indent=None))
            else:
                for e in entries:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.arrival))
                    print(f"{e.id}  {when}  {e.size:>8}  <{e.envelope.mail_from}> -> "
                          + ", ".join(f"<{r}>" for r in e.envelope.rcpt_tos))
                print(f"-- {len(entries)} message(s) queued")
        elif args.action == "show":
            entry, raw = q.show(args.id)
            if args.json:
                data = entry.to_json()
                data["message"] = raw.decode("utf-8", "replace")
                print(json.dumps(data))
            else:
                sys.stdout.buffer.write(raw)
        elif args.action == "delete":
            for qid in args.id:
                q.delete(qid)
                print(f"deleted {qid}")
    except Error as e:
        print(f"mailengine: {e}", file=sys.stderr)
        return 1
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    from . import _core

    pw = args.password
    if pw is None:
        pw = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass()
    print(_core.hash_password(pw))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailengine", description="A mail engine for Python.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the engine")
    s.add_argument("--config", help="TOML configuration file (flags override it)")
    s.add_argument("--data", help="data directory (default ./mail-data)")
    s.add_argument("--smtp", action="append", metavar="HOST:PORT", help="MX listener (repeatable)")
    s.add_argument("--submission", action="append", metavar="HOST:PORT",
                   help="submission listener: AUTH required, STARTTLS")
    s.add_argument("--smtps", action="append", metavar="HOST:PORT",
                   help="implicit-TLS submission listener")
    s.add_argument("--domain", action="append", metavar="NAME", help="local domain (repeatable)")
    s.add_argument("--user", action="append", metavar="ADDR:PASSWORD", help="user (repeatable)")
    s.add_argument("--trusted-network", action="append", metavar="CIDR",
                   help="network allowed to relay (repeatable; 'none' for none; default loopback)")
    s.add_argument("--tls-cert", help="PEM certificate chain (default: self-signed in DATA/tls)")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--workers", type=int, help="worker threads (default: CPU count)")
    s.add_argument("--hostname", help="name in greetings and Received: headers")
    s.add_argument("--log-level", choices=["error", "warning", "info", "debug"])
    s.add_argument("--allow-plain-auth", action="store_true",
                   help="allow AUTH without TLS (refused with 538 otherwise)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let transactions finish on stop")
    s.add_argument("--print-received", action="store_true", help="print a line per received message")
    s.set_defaults(func=_serve)
    q = sub.add_parser("queue", help="list, show or delete queued messages")
    qs = q.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "list queued messages"), ("show", "print one message"),
                           ("delete", "delete messages")):
        a = qs.add_parser(name, help=helptext)
        a.add_argument("--data", default="./mail-data", help="data directory")
        a.add_argument("--json", action="store_true", help="JSON output")
        if name == "show":
            a.add_argument("id")
        elif name == "delete":
            a.add_argument("id", nargs="+")
        a.set_defaults(func=_queue)
    h = sub.add_parser("hash-password", help="print a password hash for the users list")
    h.add_argument("password", nargs="?", help="(read from stdin or prompted when absent)")
    h.set_defaults(func=_hash_password)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Error as e:
        print(f"mailengine: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
