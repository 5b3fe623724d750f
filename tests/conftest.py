"""Shared fixtures: free ports, an in-process engine, a CLI engine process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mailengine
from mailengine import Config, Engine, Limits, Listener

ROOT = Path(__file__).resolve().parent.parent
ASAN = bool(os.environ.get("MAILENGINE_ASAN"))


# Ports are handed out from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range starts at 32768), so an outgoing connection of
# another test can never take a port between its allocation and the engine's
# bind, and no port is given twice in one test process. Each run starts at an
# offset derived from the pid, so two suites on one machine rarely meet.
_PORT_LO, _PORT_HI = 20000, 32000
_next_port = _PORT_LO + (os.getpid() * 97) % (_PORT_HI - _PORT_LO)
_given: set[int] = set()


def free_port() -> int:
    global _next_port
    for _ in range(_PORT_HI - _PORT_LO):
        port = _next_port
        _next_port = _PORT_LO if _next_port + 1 >= _PORT_HI else _next_port + 1
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class Ports:
    def __init__(self) -> None:
        self.mx = free_port()
        self.submission = free_port()
        self.smtps = free_port()


@pytest.fixture
def ports() -> Ports:
    return Ports()


def make_config(data_dir: Path, ports: Ports, **kw: object) -> Config:
    """A test configuration: three listeners on free loopback ports, local
    domain example.test with user alice@example.test / password 'secret'
    (fast hash), loopback trusted unless told otherwise, no auth delay.
    Delivery is off (mail for other domains stays queued) unless a test
    turns it on with its own DNS."""
    limits = kw.pop("limits", None) or Limits(auth_fail_delay=0.0)
    cfg = Config(
        data_dir=str(data_dir),
        hostname="mx.example.test",
        listeners=[
            Listener("mx", "127.0.0.1", ports.mx),
            Listener("submission", "127.0.0.1", ports.submission),
            Listener("smtps", "127.0.0.1", ports.smtps),
        ],
        domains=["example.test"],
        workers=2,
        limits=limits,  # type: ignore[arg-type]
        delivery_enabled=False,
    )
    cfg.add_user("alice@example.test", "secret", rounds=1000)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def engine_factory(tmp_path: Path, ports: Ports) -> Iterator[Callable[..., Engine]]:
    """engine_factory(**config_overrides, hooks={name: fn}) -> started Engine."""
    started: list[Engine] = []

    def make(hooks: dict[str, Callable[..., object]] | None = None, **kw: object) -> Engine:
        cfg = make_config(tmp_path / "data", ports, **kw)
        eng = Engine(cfg)
        for name, fn in (hooks or {}).items():
            eng.set_hook(name, fn)
        eng.start()
        started.append(eng)
        return eng

    yield make
    for eng in started:
        eng.stop(timeout=2)


@pytest.fixture
def engine(engine_factory: Callable[..., Engine]) -> Engine:
    return engine_factory()


class CliServer:
    def __init__(self, proc: subprocess.Popen[str], data: Path, ports: Ports) -> None:
        self.proc = proc
        self.data = data
        self.ports = ports

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def run_cli(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailengine", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


@pytest.fixture
def cli_server(tmp_path: Path, ports: Ports) -> Iterator[Callable[..., CliServer]]:
    """cli_server(*extra_flags) -> a `mailengine serve` process on free ports."""
    procs: list[CliServer] = []

    def start(*extra: str, data: Path | None = None) -> CliServer:
        d = data or tmp_path / "cli-data"
        cmd = [sys.executable, "-m", "mailengine", "serve", "--data", str(d),
               "--smtp", f"127.0.0.1:{ports.mx}", "--submission", f"127.0.0.1:{ports.submission}",
               "--smtps", f"127.0.0.1:{ports.smtps}", "--workers", "2", "--no-delivery", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        srv = CliServer(proc, d, ports)
        procs.append(srv)
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"mailengine serve exited: {proc.wait()}")
            if "ready" in line:
                return srv
        raise TimeoutError("mailengine serve did not become ready")

    yield start
    for srv in procs:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


__all__ = ["mailengine", "free_port", "wait_port", "make_config", "run_cli", "ASAN", "ROOT"]

