"""The control socket: a running engine listens on DATA/control.sock (a
Unix socket, mode 0600) so that `mailengine send` and `mailengine queue
hold|release|retry|delete` act on it from another process, the way
postqueue talks to a running Postfix. One JSON object per line each way."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import Error, QueueError

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 << 20


def socket_path(data_dir: str) -> str:
    return str(Path(data_dir) / SOCKET_NAME)


def engine_running(data_dir: str) -> bool:
    """True when an engine answers on data_dir's control socket."""
    path = socket_path(data_dir)
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
        return True
    except OSError:
        return False


async def serve_control(engine: Any, data_dir: str) -> asyncio.AbstractServer:
    path = socket_path(data_dir)
    if os.path.exists(path):
        # A socket left by a process that is gone; a live one answers.
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.5)
                s.connect(path)
            raise Error(f"another engine is running on {data_dir} (its {SOCKET_NAME} answers)")
        except OSError:
            os.unlink(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    res = await asyncio.to_thread(_apply, engine, req)
                    out = {"ok": True, **res}
                except (Error, ValueError, KeyError, TypeError) as e:
                    out = {"ok": False, "error": str(e)}
                writer.write(json.dumps(out).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path=path, limit=MAX_REQUEST)
    finally:
        os.umask(old)
    return server


def _apply(engine: Any, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "send":
        msg = base64.b64decode(req["message"])
        qid = engine.send(msg, sender=req["sender"], recipients=req["recipients"],
                          pool=req.get("pool"), tags=req.get("tags"))
        return {"id": qid}
    if op in ("hold", "release", "retry"):
        return {"count": getattr(engine, op)(req.get("id") or None)}
    if op == "delete":
        engine.delete(req["id"])
        return {"count": 1}
    if op == "stats":
        return {"stats": engine.queue_stats()}
    raise ValueError(f"unknown operation {op!r}")


def request(data_dir: str, req: dict[str, Any], timeout: float = 60.0) -> dict[str, Any] | None:
    """Ask the engine running on data_dir; None when none is running."""
    path = socket_path(data_dir)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    with s:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise QueueError("the engine closed the control connection")
            buf += chunk
    res = json.loads(buf)
    if not res.get("ok"):
        raise QueueError(res.get("error", "request refused"))
    return res
