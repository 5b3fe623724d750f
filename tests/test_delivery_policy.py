"""The destination_policy hook: Python decides, per destination and with
its MX hosts in hand, how mail to it is sent."""
from __future__ import annotations

import time

import pytest

from sinks import Sink
from mailengine import Policy
from mailengine.testing.dns import LocalDNS, unbound_path

pytestmark = pytest.mark.skipif(unbound_path() is None, reason="unbound is not installed")

ZONE = ["slow.test. 300 IN MX 10 mx.slow.test.", "mx.slow.test. 300 IN A 127.0.0.3",
        "fast.test. 300 IN MX 10 mx.fast.test.", "mx.fast.test. 300 IN A 127.0.0.3"]


def msg(i: int) -> bytes:
    return b"Subject: p%d\r\nFrom: a@src.test\r\n\r\nbody\r\n" % i


@pytest.mark.parametrize("style", ["plain", "async"])
def test_policy_hook_limits_one_destination(engine_factory, tmp_path, style):
    asked: list[tuple[str, list[str]]] = []

    def decide(domain, mx_hosts):
        asked.append((domain, mx_hosts))
        if domain == "slow.test":
            return Policy(max_connections=1, rate_per_second=10)
        return None

    async def decide_async(domain, mx_hosts):
        return decide(domain, mx_hosts)

    with Sink("127.0.0.3", 0) as sink, LocalDNS(tmp_path / "dns", ZONE) as dns:
        eng = engine_factory(delivery_enabled=True, dns=dns.address, remote_port=sink.port,
                             hooks={"destination_policy": decide if style == "plain" else decide_async})
        t0 = time.monotonic()
        eng.send_many((msg(i), "a@src.test", ["x@slow.test"]) for i in range(25))
        eng.send_many((msg(i), "a@src.test", ["y@fast.test"]) for i in range(25))
        got = sink.wait_for(50, timeout=20)
        slow = sorted(m.time for m in got if m.rcpt_tos == ["x@slow.test"])
        fast = sorted(m.time for m in got if m.rcpt_tos == ["y@fast.test"])
        # 25 at 10/s with a burst of 1: at least 2.4 s; the other domain is not held back.
        assert slow[-1] - t0 >= 2.0, slow[-1] - t0
        assert fast[-1] < slow[-1] - 1.0, (fast[-1] - t0, slow[-1] - t0)
        slow_sessions = {m.session for m in got if m.rcpt_tos == ["x@slow.test"]}
        assert len(slow_sessions) == 1          # max_connections=1 and the connection reused
        assert sorted(d for d, _ in asked) == ["fast.test", "slow.test"]   # once per destination
        assert dict(asked)["slow.test"] == ["mx.slow.test"]


def test_policy_hook_error_falls_back_to_configured_policy(engine_factory, tmp_path):
    def broken(domain, mx_hosts):
        raise RuntimeError("policy service down")

    with Sink("127.0.0.3", 0) as sink, LocalDNS(tmp_path / "dns", ZONE) as dns:
        eng = engine_factory(delivery_enabled=True, dns=dns.address, remote_port=sink.port,
                             hooks={"destination_policy": broken})
        eng.send(msg(1), sender="a@src.test", recipients=["x@fast.test"])
        assert len(sink.wait_for(1, timeout=10)) == 1


def test_policy_chooses_the_source_pool(engine_factory, tmp_path):
    """A message that names no pool takes the one its destination's policy
    names: statically, or from the hook; a message's own pool wins."""
    def decide(domain, mx_hosts):
        return Policy(pool="hooked") if domain == "fast.test" else None

    with Sink("127.0.0.3", 0) as sink, LocalDNS(tmp_path / "dns", ZONE) as dns:
        eng = engine_factory(delivery_enabled=True, dns=dns.address, remote_port=sink.port,
                             source_pools={"static": ["127.0.0.6"], "hooked": ["127.0.0.7"],
                                           "own": ["127.0.0.8"]},
                             destinations={"slow.test": Policy(pool="static")},
                             hooks={"destination_policy": decide})
        eng.send(msg(1), sender="a@src.test", recipients=["x@slow.test"])
        eng.send(msg(2), sender="a@src.test", recipients=["y@fast.test"])
        eng.send(msg(3), sender="a@src.test", recipients=["z@fast.test"], pool="own")
        got = sink.wait_for(3, timeout=10)
        peers = {m.rcpt_tos[0]: m.peer[0] for m in got}
        assert peers == {"x@slow.test": "127.0.0.6", "y@fast.test": "127.0.0.7",
                         "z@fast.test": "127.0.0.8"}


def test_policy_pool_must_exist(engine_factory):
    from mailengine import ConfigError

    with pytest.raises(ConfigError) as exc:
        engine_factory(destinations={"x.test": Policy(pool="nope")})
    assert exc.value.key == "destinations.x.test.pool"


def test_send_refuses_an_unknown_pool(engine_factory):
    from mailengine import SendError

    eng = engine_factory(source_pools={"bulk": ["127.0.0.5"]})
    with pytest.raises(SendError) as exc:
        eng.send(msg(1), sender="a@src.test", recipients=["x@slow.test"], pool="bluk")
    assert "bluk" in str(exc.value)
    with pytest.raises(SendError):
        eng.send_many([(msg(2), "a@src.test", ["x@slow.test"], "nope")])
    assert eng.send(msg(3), sender="a@src.test", recipients=["x@slow.test"], pool="bulk")
