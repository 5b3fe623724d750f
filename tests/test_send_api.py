"""send() refusals a user can meet, and one engine per data directory."""
from __future__ import annotations

import pytest

from conftest import make_config
from mailengine import Engine, Limits, SendError, StartError


def test_send_refuses_a_message_over_the_size_limit(engine_factory):
    eng = engine_factory(limits=Limits(max_message_size=10_000, auth_fail_delay=0.0))
    with pytest.raises(SendError) as exc:
        eng.send(b"Subject: big\r\n\r\n" + b"x" * 20_000, sender="a@src.test",
                 recipients=["b@dest.test"])
    assert "max_message_size" in str(exc.value)
    assert eng.send(b"Subject: small\r\n\r\nhello\r\n", sender="a@src.test",
                    recipients=["b@dest.test"])


@pytest.mark.parametrize("sender,rcpts", [("a b@src.test", ["b@dest.test"]),
                                          ("a@src.test", []),
                                          ("a@src.test", ["no-at-sign"]),
                                          ("a@src.test", ["b@dest.test\r\nRCPT TO:<c@x>"])])
def test_send_refuses_bad_addresses(engine_factory, sender, rcpts):
    eng = engine_factory()
    with pytest.raises(SendError):
        eng.send(b"Subject: x\r\n\r\nx\r\n", sender=sender, recipients=rcpts)


def test_a_second_engine_on_the_same_data_directory_is_refused(engine_factory, tmp_path, ports):
    first = engine_factory()
    assert first.running
    other_ports = type(ports)()
    second = Engine(make_config(tmp_path / "data", other_ports))
    with pytest.raises(StartError) as exc:
        second.start()
    assert "another engine" in str(exc.value)
