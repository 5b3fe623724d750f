"""A first end-to-end check: smtplib in, queue out."""
import smtplib


def test_message_is_queued(engine, ports):
    with smtplib.SMTP("127.0.0.1", ports.mx, timeout=10) as s:
        s.ehlo("client.test")
        code, _ = s.noop()
        assert code == 250
        refused = s.sendmail("bob@sender.test", ["alice@example.test"],
                             b"Subject: hi\r\nMessage-ID: <smoke@test>\r\n\r\nhello\r\n")
        assert refused == {}
    entries = engine.queue.list(with_message_id=True)
    assert [e.message_id for e in entries] == ["<smoke@test>"]
    assert entries[0].envelope.rcpt_tos == ("alice@example.test",)
    entry, raw = engine.queue.show(entries[0].id)
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])")
    assert raw.endswith(b"\r\nhello\r\n")
