"""The `mailengine` command: serve, queue, hash-password."""
from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from . import control
from .config import Config, Listener, Relay, parse_hostport, parse_size
from .engine import Engine
from .errors import ConfigError, Error


def _serve(args: argparse.Namespace) -> int:
    demo_password = None
    if args.config:
        cfg = Config.from_toml(args.config)
    elif not (args.smtp or args.submission or args.smtps or args.pop3 or args.pop3s or args.domain
              or args.user):
        cfg, demo_password = Config.embedded_default(args.data or "./mail-data")
    else:
        cfg = Config()
    if args.data:
        cfg.data_dir = args.data
    listeners = []
    for kind, values in (("mx", args.smtp), ("submission", args.submission), ("smtps", args.smtps),
                         ("pop3", args.pop3), ("pop3s", args.pop3s)):
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
    for spec in args.alias or []:
        key, sep, targets = spec.partition(":")
        if not sep or not targets.strip():
            print(f"mailengine: --alias {spec!r}: expected ADDRESS:TARGET[,TARGET...]", file=sys.stderr)
            return 2
        cfg.aliases[key.strip()] = [t.strip() for t in targets.split(",") if t.strip()]
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
    if args.dns:
        cfg.dns = args.dns
    if args.remote_port:
        cfg.remote_port = args.remote_port
    if args.no_delivery:
        cfg.delivery_enabled = False
    if args.relay:
        host, port = parse_hostport(args.relay, "--relay")
        password = os.environ.get("MAILENGINE_RELAY_PASSWORD") if args.relay_user else None
        cfg.relay = Relay(host, port, args.relay_user, password, args.relay_tls or "starttls",
                          tls_verify=not args.relay_no_verify)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    engine = Engine(cfg, events=bool(args.print_received))
    if args.print_deliveries:
        @engine.on_delivery
        def _delivered(ev: Any) -> None:
            print(f"{ev.type} {ev.queue_id} to <{ev.recipient}> via {ev.mx or '-'}: "
                  f"{ev.code or ''} {ev.text}".rstrip(), flush=True)
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
        if args.action in ("hold", "release", "retry"):
            ids = args.id or [None]
            for qid in ids:
                res = control.request(args.data, {"op": args.action, "id": qid})
                if res is None:
                    if args.action == "retry":
                        print("mailengine: no engine is running; deferred mail is retried when it starts",
                              file=sys.stderr)
                        return 1
                    n = q.hold(qid, args.action == "hold")
                else:
                    n = res["count"]
                print(f"{args.action}: {n} message(s)")
            return 0
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
                if control.request(args.data, {"op": "delete", "id": qid}) is None:
                    q.delete(qid)
                print(f"deleted {qid}")
    except Error as e:
        print(f"mailengine: {e}", file=sys.stderr)
        return 1
    return 0


def _send(args: argparse.Namespace) -> int:
    import base64

    data = sys.stdin.buffer.read()
    if not data.strip():
        print("mailengine: send: no message on standard input", file=sys.stderr)
        return 2
    req = {"op": "send", "sender": args.sender, "recipients": args.to,
           "message": base64.b64encode(data).decode(), "pool": args.pool, "tags": args.tag or None}
    res = control.request(args.data, req)
    if res is None:
        # No engine running: queue it into the spool; the next start delivers it.
        cfg = Config(data_dir=args.data, listeners=[], workers=1, delivery_enabled=False)
        if args.hostname:
            cfg.hostname = args.hostname
        eng = Engine(cfg, events=False)
        eng.start()
        try:
            qid = eng.send(data, sender=args.sender, recipients=args.to, pool=args.pool, tags=args.tag)
        finally:
            eng.stop()
        print(f"queued {qid} (no engine running: it goes out when one starts)")
    else:
        print(f"queued {res['id']}")
    return 0


def _deliver(args: argparse.Namespace) -> int:
    """A local delivery agent: the message on stdin into RECIPIENT's Maildir.
    Exit codes as sendmail(8)'s sysexits, so an MTA calling us knows what
    to do: 0 delivered, 64 bad address, 75 temporary failure."""
    import socket as _socket

    from . import _core
    from .delivery import message_bytes

    from . import users

    root = os.path.abspath(args.mail_dir or os.path.join(args.data, "mailboxes"))
    try:
        mdir = _core.maildir_path(root, args.recipient)
    except ValueError as e:
        print(f"mailengine: deliver: {e}", file=sys.stderr)
        return 64
    data = sys.stdin.buffer.read()
    if not data:
        print("mailengine: deliver: no message on standard input", file=sys.stderr)
        return 64
    host = args.hostname or _socket.gethostname()
    prefix = (f"Return-Path: <{args.sender}>\r\n" if args.sender is not None else "")
    prefix += f"Delivered-To: {args.recipient}\r\n"
    # The user's quota from DATA/users, as the engine applies it.
    quota = (0, 0)
    mailbox = args.recipient.lower()
    for u in users.load(args.data):
        if u.address == mailbox or u.address == _untagged(mailbox):
            quota = (parse_size(u.quota, "quota"), u.quota_messages)
    try:
        ident = _core.store_deliver(root, host, args.recipient, args.folder, prefix.encode(),
                                    message_bytes(data, host), *quota)
    except ValueError as e:
        print(f"mailengine: deliver: {e}", file=sys.stderr)
        return 64
    except OSError as e:
        # Over quota is temporary too: the calling MTA retries, then bounces.
        print(f"mailengine: deliver: {'mailbox full (over quota)' if e.errno == errno.EDQUOT else e}",
              file=sys.stderr)
        return 75
    print(f"delivered to {mdir} ({args.folder}) as {ident}")
    return 0


def _untagged(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0] if not local.startswith('+') else local}@{domain}"


def _user(args: argparse.Namespace) -> int:
    from . import _core
    from . import users

    if args.action == "list":
        for u in users.load(args.data):
            quota = []
            if u.quota:
                quota.append(f"quota={parse_size(u.quota, 'quota')}")
            if u.quota_messages:
                quota.append(f"quota_messages={u.quota_messages}")
            print(" ".join([u.address] + quota))
        return 0
    if args.action == "quota":
        try:
            size = parse_size(args.size, "quota")
            if args.messages < 0:
                raise ConfigError("--messages", "must not be negative")
        except ConfigError as e:
            print(f"mailengine: {e}", file=sys.stderr)
            return 2
        if not users.set_quota(args.data, args.address, size, args.messages):
            print(f"mailengine: user {args.address} does not exist", file=sys.stderr)
            return 1
        print(f"quota of {args.address}: {size or 'unlimited'} bytes, "
              f"{args.messages or 'unlimited'} messages (a running engine sees it at its next start)")
        return 0
    if args.action == "del":
        if not users.delete(args.data, args.address):
            print(f"mailengine: user {args.address} does not exist", file=sys.stderr)
            return 1
        print(f"deleted {args.address} (a running engine sees it at its next start)")
        return 0
    if "@" not in args.address:
        print(f"mailengine: {args.address!r} is not an address", file=sys.stderr)
        return 2
    if args.action == "add" and (args.quota_messages or 0) < 0:
        print("mailengine: --quota-messages must not be negative", file=sys.stderr)
        return 2
    if args.password_stdin or not sys.stdin.isatty():
        pw = sys.stdin.readline().rstrip("\n")
    else:
        pw = getpass.getpass(f"password for {args.address}: ")
    if not pw:
        print("mailengine: empty password", file=sys.stderr)
        return 2
    ok = users.set_password(args.data, args.address, _core.hash_password(pw),
                            create=args.action == "add")
    if ok and args.action == "add" and (args.quota or args.quota_messages):
        try:
            users.set_quota(args.data, args.address, parse_size(args.quota or 0, "--quota"),
                            args.quota_messages or 0)
        except ConfigError as e:
            print(f"mailengine: {e}", file=sys.stderr)
            return 2
    if not ok:
        what = "already exists" if args.action == "add" else "does not exist"
        print(f"mailengine: user {args.address} {what}", file=sys.stderr)
        return 1
    print(f"{'added' if args.action == 'add' else 'changed password of'} {args.address} "
          "(a running engine sees it at its next start)")
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
    s.add_argument("--pop3", action="append", metavar="HOST:PORT",
                   help="POP3 listener with STLS (repeatable)")
    s.add_argument("--pop3s", action="append", metavar="HOST:PORT",
                   help="implicit-TLS POP3 listener (repeatable)")
    s.add_argument("--domain", action="append", metavar="NAME", help="local domain (repeatable)")
    s.add_argument("--user", action="append", metavar="ADDR:PASSWORD", help="user (repeatable)")
    s.add_argument("--alias", action="append", metavar="ADDR:TARGET[,TARGET]",
                   help="alias (repeatable); ADDR may be @domain (catch-all; target @other: domain alias)")
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
    s.add_argument("--print-deliveries", action="store_true",
                   help="print a line per delivery outcome")
    s.add_argument("--dns", metavar="HOST:PORT[,HOST:PORT]",
                   help="name servers for MX lookups (default: /etc/resolv.conf)")
    s.add_argument("--remote-port", type=int, help="port of remote MX hosts (default 25)")
    s.add_argument("--relay", metavar="HOST:PORT", help="send all remote mail through this smarthost")
    s.add_argument("--relay-user", help="AUTH user for the relay (password from $MAILENGINE_RELAY_PASSWORD)")
    s.add_argument("--relay-tls", choices=["none", "may", "starttls", "implicit"],
                   help="TLS to the relay (default starttls, required)")
    s.add_argument("--relay-no-verify", action="store_true",
                   help="do not verify the relay's certificate")
    s.add_argument("--no-delivery", action="store_true",
                   help="queue only: nothing is delivered (hold everything)")
    s.set_defaults(func=_serve)
    sd = sub.add_parser("send", help="queue a message read from standard input")
    sd.add_argument("--from", dest="sender", required=True, help="envelope sender ('' for <>)")
    sd.add_argument("--to", action="append", required=True, help="recipient (repeatable)")
    sd.add_argument("--data", default="./mail-data", help="data directory")
    sd.add_argument("--pool", help="source-address pool")
    sd.add_argument("--tag", action="append", help="tag carried into delivery events (repeatable)")
    sd.add_argument("--hostname", help="name for a generated Message-ID")
    sd.set_defaults(func=_send)
    dl = sub.add_parser("deliver", help="local delivery agent: standard input into a user's Maildir")
    dl.add_argument("recipient", help="the address whose Maildir receives the message")
    dl.add_argument("--from", dest="sender", help="envelope sender, for Return-Path:")
    dl.add_argument("--data", default="./mail-data", help="data directory (store under DATA/mailboxes)")
    dl.add_argument("--mail-dir", help="store root (default DATA/mailboxes)")
    dl.add_argument("--hostname", help="host name in the file name")
    dl.add_argument("--folder", default="INBOX", help="folder to file into (default INBOX)")
    dl.set_defaults(func=_deliver)
    q = sub.add_parser("queue", help="list, show, hold, release, retry or delete queued messages")
    qs = q.add_subparsers(dest="action", required=True)
    for name, helptext in (("list", "list queued messages"), ("show", "print one message"),
                           ("delete", "delete messages"), ("hold", "stop delivering messages"),
                           ("release", "deliver held messages again"),
                           ("retry", "retry deferred messages now")):
        a = qs.add_parser(name, help=helptext)
        a.add_argument("--data", default="./mail-data", help="data directory")
        a.add_argument("--json", action="store_true", help="JSON output")
        if name == "show":
            a.add_argument("id")
        elif name == "delete":
            a.add_argument("id", nargs="+")
        elif name in ("hold", "release", "retry"):
            a.add_argument("id", nargs="*", help="queue ids (none: every message)")
        a.set_defaults(func=_queue)
    u = sub.add_parser("user", help="add, delete, list users or change a password (DATA/users)")
    us = u.add_subparsers(dest="action", required=True)
    for name, helptext in (("add", "add a user (password from stdin or prompted)"),
                           ("del", "delete a user"), ("list", "list users"),
                           ("passwd", "change a user's password"),
                           ("quota", "set a user's mailbox quota (0: unlimited)")):
        a = us.add_parser(name, help=helptext)
        a.add_argument("--data", default="./mail-data", help="data directory")
        if name != "list":
            a.add_argument("address")
        if name == "quota":
            a.add_argument("size", help="bytes, or a number with K, M, G (0: unlimited)")
            a.add_argument("--messages", type=int, default=0, help="message count limit (0: none)")
        if name == "add":
            a.add_argument("--quota", help="mailbox quota: bytes, or a number with K, M, G")
            a.add_argument("--quota-messages", type=int, help="mailbox message count limit")
        if name in ("add", "passwd"):
            a.add_argument("--password-stdin", action="store_true",
                           help="read the password from standard input")
        a.set_defaults(func=_user)
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
