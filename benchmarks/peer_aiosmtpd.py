#!/usr/bin/env python3
"""Durable aiosmtpd peer used by the mailengine benchmarks.

Accepts every message and stores it maildir-style before answering 250:

    write tmp/NAME  ->  fsync(file)  ->  rename to new/NAME  ->  fsync(new/)

so a 250 reply means the message survives a crash, like Postfix's queue and
mailengine's spool.  The blocking file work runs in a thread pool so that
fsyncs of concurrent sessions overlap (the filesystem can batch them into
one journal commit) instead of serialising the event loop; pass
--threads 0 to do it inline on the event loop instead.

Prints a line containing "ready" once the listener is open.  Listens on
the address given with --host/--port only (the benchmarks use 127.0.0.1).
"""

import argparse
import asyncio
import concurrent.futures
import itertools
import os
import resource
import signal
import sys
import time

from aiosmtpd.smtp import SMTP


class DurableMaildirHandler:
    def __init__(self, root: str, threads: int) -> None:
        self.tmp_dir = os.path.join(root, "tmp")
        self.new_dir = os.path.join(root, "new")
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.new_dir, exist_ok=True)
        self.new_dir_fd = os.open(self.new_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.seq = itertools.count()
        self.prefix = f"{time.time_ns()}.{os.getpid()}"
        self.executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=threads)
            if threads > 0
            else None
        )

    def _store(self, name: str, payload: bytes) -> None:
        tmp_path = os.path.join(self.tmp_dir, name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(self.new_dir, name))
        os.fsync(self.new_dir_fd)

    async def handle_DATA(self, server, session, envelope):
        name = f"{self.prefix}.{next(self.seq)}"
        header = "Return-Path: <{}>\r\nX-Envelope-To: {}\r\n".format(
            envelope.mail_from or "", ", ".join(envelope.rcpt_tos)
        ).encode("utf-8", "surrogateescape")
        body = envelope.original_content or envelope.content or b""
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        payload = header + body
        if self.executor is None:
            self._store(name, payload)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self._store, name, payload)
        return "250 2.0.0 Ok: queued as " + name


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    handler = DurableMaildirHandler(args.dir, args.threads)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=args.hostname, ident="peer_aiosmtpd"),
        host=args.host,
        port=args.port,
        backlog=args.backlog,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"peer_aiosmtpd ready on {args.host}:{args.port} dir={args.dir}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    if handler.executor is not None:
        handler.executor.shutdown(wait=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True, help="maildir root (tmp/ and new/ are created)")
    ap.add_argument("--threads", type=int, default=16,
                    help="fsync thread pool size; 0 = store inline on the event loop")
    ap.add_argument("--backlog", type=int, default=1024)
    ap.add_argument("--hostname", default="bench.test")
    args = ap.parse_args()
    raise_nofile()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
