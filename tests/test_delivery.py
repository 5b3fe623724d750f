"""Outbound delivery end to end, through real sockets: the engine resolves MX
hosts through a real unbound on loopback (never the machine's resolver) and
delivers to programmable SMTP sinks on 127.0.0.x (tests/sinks.py).

Layout: one DNS zone for the whole module (tests/delivery_helpers.py lists
it); each test starts its own sinks (a SinkGroup on one port, since
Config.remote_port is the port of every MX host) and its own engines, with
short retry times. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import ROOT, Ports, make_config
from delivery_helpers import (DEAD_IP, DOMAINS, MX_IPS, RELAY_IP, RELAY_NAME, SENDER,
                              SERVFAIL_ZONES, SRC_IP, EngineFactory, Groups, LineReader,
                              data_dir, dkim_dns, make_dkim_key, message, parse_dsn,
                              subject_of, wait_events_file, wait_final, wait_until,
                              zone_records)
from mailengine import DkimKey, Engine, Policy, Relay
from mailengine.testing.dns import LocalDNS, unbound_path
from sinks import Rule, self_signed_cert

try:
    import dkim
except ImportError:  # reported by the DKIM test, not a skip of the module
    dkim = None

pytestmark = [pytest.mark.skipif(unbound_path() is None, reason="unbound is not installed"),
              pytest.mark.timeout(60)]


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory):
    server = LocalDNS(tmp_path_factory.mktemp("dns"), zone_records(),
                      servfail_zones=SERVFAIL_ZONES).start()
    yield server
    server.stop()


@pytest.fixture
def groups():
    """Sinks for one test. Whatever the test checks, the engine's SMTP client
    must not break a protocol rule on any of them (sinks.py writes each
    one down), and no sink may have hit an internal error."""
    g = Groups()
    yield g
    broken = [(s.name, v) for grp in g.groups for s in grp for v in s.protocol_violations]
    errors = [(s.name, e) for grp in g.groups for s in grp for e in s.errors]
    g.stop_all()
    assert broken == [], f"protocol violations by the engine: {broken}"
    assert errors == [], f"sink errors: {errors}"


@pytest.fixture
def engines(tmp_path: Path, dns: LocalDNS, groups: Groups):
    """Depends on `groups` so that engines stop before their sinks do."""
    f = EngineFactory(tmp_path, dns.address)
    yield f
    f.stop_all()


def norm(text: str | None) -> str:
    """Header text with folding and runs of white space collapsed."""
    return re.sub(r"\s+", " ", str(text or "")).strip()


def no_mail_commands(sink) -> bool:
    return not any(line.upper().startswith(("MAIL", "RCPT", "DATA"))
                   for t in sink.transcripts for line in t)


# ---- MX delivery -----------------------------------------------------------------------


def test_mx_delivery_to_eight_domains(engines, groups):
    g = groups(MX_IPS)
    eng = engines.make(remote_port=g.port)
    ids = {}
    for i, dom in enumerate(DOMAINS):
        rcpt = f"user{i}@{dom}"
        ids[rcpt] = eng.send(message(f"mx {i}", to=rcpt), sender=SENDER, recipients=[rcpt])
    assert len(set(ids.values())) == 8

    g.wait_for(8, timeout=15)
    for i, (ip, dom) in enumerate(zip(MX_IPS, DOMAINS)):
        got = g[ip].messages
        assert [m.rcpt_tos for m in got] == [[f"user{i}@{dom}"]], (ip, got)
        assert got[0].mail_from == SENDER
        assert subject_of(got[0].data) == f"mx {i}"
        assert got[0].data.endswith(b"\r\n\r\nhello\r\n")
    assert g.protocol_violations == []

    delivered = eng.events.wait(8, "delivered")
    assert len(delivered) == 8
    for ev in delivered:
        i = int(ev.recipient[4])
        assert ev.queue_id == ids[ev.recipient]
        assert ev.sender == SENDER
        assert ev.mx == f"mx.{DOMAINS[i]}"
        assert ev.ip == MX_IPS[i]
        assert ev.code == 250
        assert ev.attempt == 1
        assert ev.tags == ()
    assert [e for e in eng.events.snapshot() if e.type != "delivered"] == []

    # Every event is also a line in events.jsonl, the same as the callback got.
    on_disk = wait_events_file(data_dir(eng), 8)
    key = lambda e: (e.queue_id, e.recipient, e.type, e.attempt)  # noqa: E731
    assert sorted(on_disk, key=key) == sorted(eng.events.snapshot(), key=key)
    wait_until(lambda: eng.queue_stats()["messages"] == 0, 5, "the queue empties")
    stats = eng.queue_stats()
    assert (stats["delivered"], stats["deferred"], stats["bounced"]) == (8, 0, 0), stats


def test_message_content_arrives_byte_exact(engines, groups):
    """Dot-stuffing (RFC 5321 §4.5.2), 8-bit text, long lines and a body of
    several megabytes (many partial writes) come out as they went in."""
    g = groups(["127.0.0.2"])
    eng = engines.make(remote_port=g.port)
    dots = ".\r\n..\r\n.leading dot\r\n. \r\n.\r\n\r\n.\r\nend\r\n"
    small = message("dots", body=dots, extra="Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n")
    eight = message("eight bit", extra="Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                    "Content-Type: text/plain; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: 8bit\r\n",
                    body="Gr\u00fc\u00dfe \u2014 \u65e5\u672c\r\n" + "x" * 990 + "\r\n")
    line = b"The quick brown fox jumps over the lazy dog.\r\n.and a dot line\r\n"
    big = message("big", extra="Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n").rstrip(b"\r\n") \
        + b"\r\n" + line * 60000
    sent = {"dots": small, "eight bit": eight, "big": big}
    for data in sent.values():
        eng.send(data, sender=SENDER, recipients=["x@dest.test"])
    got = {subject_of(m.data): m for m in g["127.0.0.2"].wait_for(3, timeout=20)}
    for subj, data in sent.items():
        assert got[subj].data == data, subj
    assert "BODY=8BITMIME" in [o.upper() for o in got["eight bit"].mail_options]
    assert g.protocol_violations == []


# ---- implicit MX and CNAME'd MX host ---------------------------------------------------


def test_implicit_mx_and_cname_mx_host(engines, groups):
    g = groups(["127.0.0.3", "127.0.0.4"])
    eng = engines.make(remote_port=g.port)
    q1 = eng.send(message("implicit", to="a@implicit.test"), sender=SENDER,
                  recipients=["a@implicit.test"])
    q2 = eng.send(message("cname", to="b@cname.test"), sender=SENDER, recipients=["b@cname.test"])
    ev1 = eng.events.wait(1, "delivered", queue_id=q1)[0]
    ev2 = eng.events.wait(1, "delivered", queue_id=q2)[0]
    assert [m.rcpt_tos for m in g["127.0.0.3"].wait_for(1)] == [["a@implicit.test"]]
    assert [m.rcpt_tos for m in g["127.0.0.4"].wait_for(1)] == [["b@cname.test"]]
    # RFC 5321 §5.1: no MX, so the domain itself is the host.
    assert (ev1.mx, ev1.ip, ev1.attempt) == ("implicit.test", "127.0.0.3", 1)
    assert ev2.ip == "127.0.0.4" and ev2.attempt == 1
    assert ev2.mx in ("mx.cname.test", "real.target.test"), ev2.mx


# ---- smarthost -------------------------------------------------------------------------


def test_relay_starttls_auth_verified(engines, groups):
    g = groups([RELAY_IP], starttls=True, tls_name=RELAY_NAME,
               auth={"relayuser": "relay pass:1"})
    relay = Relay(RELAY_NAME, g.port, "relayuser", "relay pass:1", tls="starttls",
                  tls_verify=True, tls_ca_file=str(g.cert_path))
    # remote_port points nowhere: only the relay's own port can work.
    eng = engines.make(relay=relay, remote_port=1)
    rcpts = ["a@d1.test", "b@d2.test"]
    q1 = eng.send(message("relay one", to=", ".join(rcpts)), sender=SENDER, recipients=rcpts)
    # A domain that does not even resolve: the relay does the routing.
    q2 = eng.send(message("relay two", to="c@unresolvable.example"), sender=SENDER,
                  recipients=["c@unresolvable.example"])
    sink = g[RELAY_IP]
    got = sink.wait_for(2, timeout=15)
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(rcpts + ["c@unresolvable.example"])
    for m in got:
        assert m.tls, "mail to the relay went in clear"
        assert m.auth_user == "relayuser"
        assert m.mail_from == SENDER
        assert m.sni == RELAY_NAME
    assert sink.protocol_violations == [] and sink.tls_errors == []
    evs = eng.events.wait(3, "delivered")
    assert {e.queue_id for e in evs} == {q1, q2}
    assert all(e.ip == RELAY_IP and e.code == 250 and e.attempt == 1 for e in evs), evs


def test_relay_implicit_tls(engines, groups):
    g = groups([RELAY_IP], implicit_tls=True, tls_name=RELAY_NAME, auth={"u": "p"})
    relay = Relay(RELAY_NAME, g.port, "u", "p", tls="implicit", tls_verify=True,
                  tls_ca_file=str(g.cert_path))
    eng = engines.make(relay=relay, remote_port=1)
    qid = eng.send(message("implicit tls"), sender=SENDER, recipients=["x@d3.test"])
    got = g[RELAY_IP].wait_for(1, timeout=15)
    assert got[0].tls and got[0].auth_user == "u" and got[0].rcpt_tos == ["x@d3.test"]
    assert g[RELAY_IP].protocol_violations == []
    assert eng.events.wait(1, "delivered", queue_id=qid)[0].ip == RELAY_IP


def test_relay_failures_defer_and_send_nothing(engines, groups):
    """tls='starttls' is required TLS: a relay that does not offer it, or whose
    certificate does not verify, gets nothing (not even the password). A
    refused login is our configuration's fault, not the message's: deferred,
    never bounced."""
    g = groups([RELAY_IP, "127.0.0.12", SRC_IP], auth={"u": "p"}, auth_required=False,
               per_sink={"127.0.0.12": {"starttls": True, "tls_name": RELAY_NAME,
                                        "auth_required": True}})
    good_ca = str(g["127.0.0.12"].cert_path)
    wrong_ca, _ = self_signed_cert(RELAY_NAME)   # same name, another key
    cases = [("no STARTTLS", Relay(RELAY_IP, g.port, "u", "p", tls="starttls", tls_verify=False)),
             ("wrong CA", Relay("127.0.0.12", g.port, "u", "p", tls="starttls",
                                tls_ca_file=str(wrong_ca))),
             ("wrong password", Relay("127.0.0.12", g.port, "u", "bad", tls="starttls",
                                      tls_ca_file=good_ca))]
    for what, relay in cases:
        eng = engines.make(relay=relay, remote_port=1)
        qid = eng.send(message(f"relay {what}"), sender=SENDER, recipients=["x@d1.test"])
        d = eng.events.wait(1, "deferred", queue_id=qid)[0]
        assert d.enhanced and d.enhanced.startswith("4.7." if what != "wrong password" else ""), \
            (what, d)
        assert eng.events.select("bounced", queue_id=qid) == [], what
    for sink in g:
        assert sink.messages == [], sink.name
    lines = [ln.upper() for sink in g for t in sink.transcripts for ln in t]
    assert not any(ln.startswith("MAIL") for ln in lines), lines
    # The password went only over TLS, to the server whose certificate verified.
    assert sum(ln.startswith("AUTH") for ln in lines) >= 1
    for sink in g:
        for t in sink.transcripts:
            if any(ln.upper().startswith("AUTH") for ln in t):
                assert sink.host == "127.0.0.12" and "STARTTLS" in t, (sink.name, t)
    assert g[SRC_IP].messages == []


# ---- temporary failures: retries with backoff ------------------------------------------


def test_temporary_failure_retried_with_backoff(engines, groups):
    # Four 451s: gaps should be about 0.25, 0.5, then capped at 0.6 (not 1.0, 2.0).
    g = groups(["127.0.0.2"], rcpt_rules={"temp": Rule(451, "4.3.0 later", times=4)})
    eng = engines.make(remote_port=g.port, retry_min=0.25, retry_max=0.6)
    qid = eng.send(message("backoff"), sender=SENDER, recipients=["temp@dest.test"])
    done = eng.events.wait(1, "delivered", queue_id=qid, timeout=15)[0]
    deferred = eng.events.select("deferred", queue_id=qid)
    assert [e.attempt for e in deferred] == [1, 2, 3, 4]
    assert done.attempt == 5
    for e in deferred:
        assert (e.code, e.enhanced, e.recipient) == (451, "4.3.0", "temp@dest.test")
        assert "later" in e.text
        assert e.mx == "mx.dest.test" and e.ip == "127.0.0.2"
    times = [e.time for e in deferred] + [done.time]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.2, gaps                 # not before retry_min
    assert gaps[1] >= 0.4, gaps                 # doubled
    # Capped at retry_max: uncapped, the last two gaps would be 1 s and 2 s
    # (each gap is also one attempt's time, so the bound leaves room).
    assert max(gaps) < 1.6, gaps
    assert [m.rcpt_tos for m in g["127.0.0.2"].wait_for(1)] == [["temp@dest.test"]]


def test_reply_timeout_defers(engines, groups):
    """A server that does not answer the end of the message within
    reply_timeout: deferred (we cannot know it took the message), retried."""
    g = groups(["127.0.0.2"], data_reply=Rule(250, "2.0.0 too late", delay=2.5, times=1))
    eng = engines.make(remote_port=g.port, reply_timeout=0.8)
    t0 = time.monotonic()
    qid = eng.send(message("slow server"), sender=SENDER, recipients=["x@dest.test"])
    d = eng.events.wait(1, "deferred", queue_id=qid, timeout=5)[0]
    # Deferred at all proves the timeout: waited out, the 250 would deliver.
    assert time.monotonic() - t0 >= 0.6, time.monotonic() - t0
    assert d.attempt == 1 and d.enhanced and d.enhanced.startswith("4.4."), d
    ok = eng.events.wait(1, "delivered", queue_id=qid, timeout=5)[0]
    assert ok.attempt == 2


def test_unreachable_destination_keeps_being_retried(engines, groups):
    """Every connection refused: the destination counts as dead for a while
    (retry_min), and its mail, what was waiting and what arrives meanwhile,
    is tried again afterwards, and again after each failure."""
    g = groups(["127.0.0.2"])
    with pytest.raises(OSError):
        socket.create_connection((DEAD_IP, g.port), timeout=2).close()
    eng = engines.make(remote_port=g.port, retry_min=0.3, retry_max=0.3)
    first = eng.send(message("dead 0"), sender=SENDER, recipients=["r0@dead.test"])
    d = eng.events.wait(1, "deferred", queue_id=first)[0]
    assert d.enhanced and d.enhanced.startswith("4.4."), d
    later = [eng.send(message(f"dead {i}"), sender=SENDER, recipients=[f"r{i}@dead.test"])
             for i in range(1, 5)]
    ids = [first] + later

    def counts() -> dict[str, int]:
        return {q: len(eng.events.select("deferred", queue_id=q)) for q in ids}

    # Six rounds each (about 2 s): a stall in any round shows.
    deadline = time.monotonic() + (15 if os.environ.get("MAILENGINE_ASAN") else 8)
    while min(counts().values()) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert min(counts().values()) >= 6, f"deferred events per message: {counts()}"
    assert eng.events.select("bounced") == [] and eng.events.select("delivered") == []


def test_connection_lost_at_end_of_data_is_retried(engines, groups):
    """No reply to the end of the message: not delivered as far as we know,
    so it is deferred and sent again (RFC 5321 §6.1 accepts the duplicate)."""
    g = groups(["127.0.0.2"], data_reply=Rule(drop=True, times=1))
    eng = engines.make(remote_port=g.port)
    qid = eng.send(message("dropped"), sender=SENDER, recipients=["x@dest.test"])
    d = eng.events.wait(1, "deferred", queue_id=qid)[0]
    assert d.attempt == 1 and d.enhanced and d.enhanced.startswith("4."), d
    ok = eng.events.wait(1, "delivered", queue_id=qid)[0]
    assert ok.attempt == 2
    assert [m.rcpt_tos for m in g["127.0.0.2"].wait_for(1)] == [["x@dest.test"]]


# ---- permanent failures: bounces -------------------------------------------------------


def test_permanent_failure_bounces_with_dsn(engines, groups):
    g = groups(["127.0.0.2", SRC_IP], rcpt_rules={"nobody": (550, "5.1.1 no such user here")})
    eng = engines.make(remote_port=g.port)
    original = message("will bounce", to="nobody@dest.test", body="the original body\r\n")
    qid = eng.send(original, sender=SENDER, recipients=["nobody@dest.test"])
    ev = eng.events.wait(1, "bounced", queue_id=qid)[0]
    assert (ev.code, ev.enhanced, ev.attempt) == (550, "5.1.1", 1)
    assert ev.recipient == "nobody@dest.test" and "no such user here" in ev.text
    assert g["127.0.0.2"].messages == []

    rec = g[SRC_IP].wait_for(1, timeout=10)[0]
    assert rec.mail_from == "", "a DSN goes out with the null reverse path"
    assert rec.rcpt_tos == [SENDER]
    dsn = parse_dsn(rec)
    assert dsn.msg.get_param("report-type") == "delivery-status"
    assert "MAILER-DAEMON" in str(dsn.msg["From"]).upper()
    assert SENDER in str(dsn.msg["To"])
    assert "no such user here" in dsn.human.get_content()
    assert len(dsn.per_recipient) == 1
    r = dsn.per_recipient[0]
    assert norm(r["Final-Recipient"]).lower().replace(" ", "") == "rfc822;nobody@dest.test"
    assert norm(r["Action"]) == "failed"
    assert norm(r["Status"]) == "5.1.1"
    diag = norm(r["Diagnostic-Code"])
    assert diag.lower().startswith("smtp;"), diag
    assert "550 5.1.1 no such user here" in diag, diag
    assert "mx.dest.test" in norm(r["Remote-MTA"]), r["Remote-MTA"]
    assert dsn.returned is not None, "the original message is returned"
    assert dsn.returned["Subject"] == "will bounce"
    assert "the original body" in dsn.returned.get_content()
    # The DSN itself was delivered, from <>.
    dsn_ev = eng.events.wait(1, "delivered", recipient=SENDER)[0]
    assert dsn_ev.sender == "" and dsn_ev.ip == SRC_IP


def test_no_bounce_to_null_sender(engines, groups):
    g = groups(["127.0.0.2", "127.0.0.9", SRC_IP],
               rcpt_rules={"nobody": (550, "5.1.1 no such user")},
               per_sink={"127.0.0.9": {"rcpt_rules": {"*": (550, "5.1.1 mailbox gone")}}})
    eng = engines.make(remote_port=g.port)
    # 1. A message from <> that bounces: nothing to tell anybody.
    q1 = eng.send(message("from null"), sender="", recipients=["nobody@dest.test"])
    ev = eng.events.wait(1, "bounced", queue_id=q1)[0]
    assert ev.sender == "" and ev.enhanced == "5.1.1"
    # 2. A bounce that bounces: its DSN (from <>) fails, and no DSN about the DSN.
    q2 = eng.send(message("double bounce", frm="someone@reject.test"),
                  sender="someone@reject.test", recipients=["nobody@dest.test"])
    eng.events.wait(1, "bounced", queue_id=q2)
    dsn_fail = eng.events.wait(1, "bounced", recipient="someone@reject.test")[0]
    assert dsn_fail.sender == "" and dsn_fail.code == 550
    time.sleep(1.0)
    assert [m for s in g for m in s.messages] == []
    assert [(s.name, r.rcpt_tos) for s in g for r in s.rejected] == []
    evs = eng.events.snapshot()
    assert len(evs) == 3, evs     # the two bounces and the failed DSN, nothing more
    wait_until(lambda: eng.queue_stats()["messages"] == 0, 5, "the queue empties")


# ---- per-recipient results in one transaction ------------------------------------------


def test_mixed_recipient_results_in_one_transaction(engines, groups):
    g = groups(["127.0.0.2", SRC_IP],
               rcpt_rules={"temp": Rule(451, "4.2.0 mailbox busy", times=1),
                           "perm": (550, "5.1.1 no such user")})
    eng = engines.make(remote_port=g.port)
    rcpts = ["ok@dest.test", "temp@dest.test", "perm@dest.test"]
    qid = eng.send(message("mixed"), sender=SENDER, recipients=rcpts)
    assert eng.events.wait(1, "delivered", recipient="ok@dest.test")[0].attempt == 1
    d = eng.events.wait(1, "deferred", recipient="temp@dest.test")[0]
    b = eng.events.wait(1, "bounced", recipient="perm@dest.test")[0]
    assert (d.code, d.enhanced, d.attempt) == (451, "4.2.0", 1)
    assert (b.code, b.enhanced, b.attempt) == (550, "5.1.1", 1)
    assert {e.queue_id for e in (d, b)} == {qid}

    sink = g["127.0.0.2"]
    first = sink.wait_for(1)[0]
    assert first.rcpt_tos == ["ok@dest.test"]
    assert first.rejected_rcpts == [("temp@dest.test", 451), ("perm@dest.test", 550)]
    lines = sink.transcript(first.session)
    assert sum(ln.upper().startswith("MAIL FROM:") for ln in lines) == 1, lines
    assert [ln for ln in lines if ln.upper().startswith("RCPT TO:")] == \
        [f"RCPT TO:<{r}>" for r in rcpts], lines

    # The temporary one is retried alone.
    again = eng.events.wait(1, "delivered", recipient="temp@dest.test", timeout=10)[0]
    assert again.attempt == 2 and again.queue_id == qid
    got = sink.wait_for(2)
    assert len(got) == 2 and got[1].rcpt_tos == ["temp@dest.test"]
    lines = sink.transcript(got[1].session)
    last_mail = max(i for i, ln in enumerate(lines) if ln.upper().startswith("MAIL FROM:"))
    assert [ln for ln in lines[last_mail:] if ln.upper().startswith("RCPT")] == \
        ["RCPT TO:<temp@dest.test>"], lines
    # One DSN, about the permanent failure only.
    dsn = parse_dsn(g[SRC_IP].wait_for(1)[0])
    finals = [norm(r["Final-Recipient"]).lower() for r in dsn.per_recipient]
    assert finals == ["rfc822;perm@dest.test"] or finals == ["rfc822; perm@dest.test"], finals
    time.sleep(0.3)
    assert len(g[SRC_IP].messages) == 1
    assert len(sink.messages) == 2


def test_max_recipients_per_transaction(engines, groups):
    g = groups(["127.0.0.2", "127.0.0.3"])
    eng = engines.make(remote_port=g.port, destinations={"dest.test": Policy(max_recipients=2)})
    rcpts = [f"r{i}@dest.test" for i in range(5)] + [f"s{i}@other.test" for i in range(5)]
    qid = eng.send(message("many rcpts"), sender=SENDER, recipients=rcpts)
    assert {e.recipient for e in eng.events.wait(10, "delivered", queue_id=qid)} == set(rcpts)
    limited = g["127.0.0.2"].wait_for(3)
    assert sorted(len(m.rcpt_tos) for m in limited) == [1, 2, 2]
    assert sorted(r for m in limited for r in m.rcpt_tos) == rcpts[:5]
    assert [m.rcpt_tos for m in g["127.0.0.3"].wait_for(1)] == [rcpts[5:]]


def test_452_too_many_recipients_go_in_the_next_transaction(engines, groups):
    """A server that takes 3 recipients per transaction and answers 452
    4.5.3 to the rest: the rest go at once in further transactions (no
    deferral, no waiting for a retry), and later messages to it carry at
    most 3 recipients from the start."""
    g = groups(["127.0.0.2"], max_recipients=3)
    eng = engines.make(remote_port=g.port, retry_min=60.0, retry_max=120.0)
    rcpts = [f"r{i}@d1.test" for i in range(8)]
    qid = eng.send(message("limit"), sender=SENDER, recipients=rcpts)
    assert {e.recipient for e in eng.events.wait(8, "delivered", queue_id=qid, timeout=10)} == set(rcpts)
    assert not eng.events.select("deferred")
    got = g["127.0.0.2"].wait_for(3)
    assert sorted(len(m.rcpt_tos) for m in got) == [2, 3, 3]
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(rcpts)
    qid2 = eng.send(message("limit 2"), sender=SENDER, recipients=[f"t{i}@d1.test" for i in range(5)])
    eng.events.wait(5, "delivered", queue_id=qid2, timeout=10)
    later = [m for m in g["127.0.0.2"].wait_for(5) if m.rcpt_tos[0].startswith("t")]
    assert sorted(len(m.rcpt_tos) for m in later) == [2, 3]
    assert all(not m.rejected_rcpts for m in later)


def test_refused_recipient_bounces_even_if_connection_is_lost(engines, groups):
    """A 5xx to RCPT is final whatever happens to the rest of the transaction."""
    g = groups(["127.0.0.2", SRC_IP], rcpt_rules={"perm": (550, "5.1.1 no such user")},
               per_sink={"127.0.0.2": {"data_reply": Rule(drop=True, times=1)}})
    eng = engines.make(remote_port=g.port)
    qid = eng.send(message("lost"), sender=SENDER, recipients=["ok@dest.test", "perm@dest.test"])
    b = eng.events.wait(1, "bounced", recipient="perm@dest.test", timeout=5)[0]
    assert (b.code, b.enhanced, b.attempt, b.queue_id) == (550, "5.1.1", 1, qid)
    ok = eng.events.wait(1, "delivered", recipient="ok@dest.test")[0]
    assert ok.attempt == 2
    assert eng.events.select("deferred", recipient="perm@dest.test") == []
    sink = g["127.0.0.2"]
    assert [m.rcpt_tos for m in sink.wait_for(1)] == [["ok@dest.test"]]
    rcpt_lines = [ln for t in sink.transcripts for ln in t if ln.upper().startswith("RCPT")]
    assert rcpt_lines.count("RCPT TO:<perm@dest.test>") == 1, rcpt_lines


# ---- throttles -------------------------------------------------------------------------


def test_max_connections(engines, groups):
    g = groups(["127.0.0.2"], delay=0.05)
    sink = g["127.0.0.2"]
    eng = engines.make(remote_port=g.port, destinations={"slow.test": Policy(max_connections=2)})
    eng.send_many((message(f"c{i}"), SENDER, [f"r{i}@slow.test"]) for i in range(40))
    sink.wait_for(40, timeout=20)
    assert 0 < sink.max_concurrent <= 2, sink.max_concurrent
    eng.events.wait(40, "delivered")
    # The same load to a domain under the default policy (20 connections)
    # opens more than two at once: the limit above is what held it back.
    sink.wait_idle(timeout=5)
    sink.reset()
    eng.send_many((message(f"d{i}"), SENDER, [f"r{i}@dest.test"]) for i in range(40))
    sink.wait_for(40, timeout=20)
    assert sink.max_concurrent > 2, sink.max_concurrent


def test_max_messages_per_connection(engines, groups):
    g = groups(["127.0.0.2"])
    sink = g["127.0.0.2"]
    eng = engines.make(remote_port=g.port,
                       default_policy=Policy(max_connections=2, max_messages_per_connection=5))
    eng.send_many((message(f"m{i}"), SENDER, [f"r{i}@dest.test"]) for i in range(40))
    got = sink.wait_for(40, timeout=20)
    per_session = Counter(m.session for m in got)
    assert max(per_session.values()) <= 5, per_session
    assert sink.connections_total >= 40 // 5, sink.connections_total
    assert sink.protocol_violations == []
    eng.events.wait(40, "delivered")


def test_rate_limit_applies_to_its_destination_only(engines, groups):
    g = groups(["127.0.0.2", "127.0.0.3"])
    eng = engines.make(remote_port=g.port, destinations={"slow.test": Policy(rate_per_second=10)})
    t0 = time.monotonic()
    eng.send_many((message(f"s{i}"), SENDER, [f"r{i}@slow.test"]) for i in range(30))
    eng.send_many((message(f"f{i}"), SENDER, [f"r{i}@fast.test"]) for i in range(30))
    fast = g["127.0.0.3"].wait_for(30, timeout=10)
    fast_done = max(m.time for m in fast)
    slow = g["127.0.0.2"].wait_for(30, timeout=15)
    times = sorted(m.time for m in slow)
    # 30 messages at 10/s with a burst of one: about 2.9 s from first to last.
    assert times[-1] - times[0] >= 2.4, times[-1] - times[0]
    # In no second are there more than the rate plus the burst (one more
    # for the jitter between sending and the sink's clock).
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 12
    # The other domain was not held to that rate: it was done long before
    # (held back, its 30 would have ended with the slow ones, about 6 s in).
    assert fast_done < times[-1] - 1.0, (fast_done - t0, times[-1] - t0)


# ---- connection reuse and pipelining ---------------------------------------------------


def test_connection_reuse_and_pipelining(engines, groups):
    g = groups(["127.0.0.2", "127.0.0.3"], per_sink={"127.0.0.3": {"pipelining": False}})
    eng = engines.make(remote_port=g.port, default_policy=Policy(max_connections=1))
    eng.send_many((message(f"p{i}"), SENDER, [f"r{i}@dest.test"]) for i in range(20))
    eng.send_many((message(f"n{i}"), SENDER, [f"r{i}@other.test"]) for i in range(20))
    piped, plain = g["127.0.0.2"], g["127.0.0.3"]
    piped.wait_for(20, timeout=15)
    plain.wait_for(20, timeout=15)
    assert piped.connections_total == 1
    assert piped.pipelined_batches >= 1
    assert piped.protocol_violations == []
    assert plain.protocol_violations == []
    assert plain.pipelined_batches == 0
    assert plain.connections_total == 1
    eng.events.wait(40, "delivered")


# ---- DKIM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("dkim")
    return {"rsa": make_dkim_key(d, "rsa", "r2048", "rsakey.test"),
            "ed25519": make_dkim_key(d, "ed25519", "ed1", "edkey.test")}


def test_dkim_signing(engines, groups, dkim_keys):
    if dkim is None:
        pytest.fail("dkimpy is required (pip install dkimpy pynacl)")
    rsa, ed = dkim_keys["rsa"], dkim_keys["ed25519"]
    g = groups(["127.0.0.2"])
    eng = engines.make(remote_port=g.port, dkim=[
        DkimKey(rsa.domain, rsa.selector, str(rsa.path)),
        DkimKey(ed.domain, ed.selector, str(ed.path))])
    for subj, frm in (("rsa", "a@rsakey.test"), ("ed", "b@edkey.test"), ("none", "c@nokey.test")):
        eng.send(message(f"dkim {subj}", frm=f"Someone <{frm}>", body="Signed body.  \r\n\r\n"),
                 sender=SENDER, recipients=["x@dest.test"])
    got = {subject_of(m.data): m.data for m in g["127.0.0.2"].wait_for(3, timeout=15)}
    lookup = dkim_dns(rsa, ed)
    for subj, algo, key in (("dkim rsa", b"rsa-sha256", rsa), ("dkim ed", b"ed25519-sha256", ed)):
        data = got[subj]
        assert data.startswith(b"DKIM-Signature:"), data[:200]
        head = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
        assert b"a=" + algo in head and b"d=" + key.domain.encode() in head, head
        assert b"s=" + key.selector.encode() in head
        assert dkim.verify(data, dnsfunc=lookup), subj
        # The verification is real: a changed body fails it.
        assert not dkim.verify(data.replace(b"Signed body.", b"Signed b0dy."), dnsfunc=lookup)
    assert b"DKIM-Signature" not in got["dkim none"]


# ---- TLS policies ----------------------------------------------------------------------


def tls_groups(groups):
    return groups(["127.0.0.4", "127.0.0.5", "127.0.0.6"], per_sink={
        "127.0.0.4": {"starttls": True, "tls_name": "mx.tls.test"},
        "127.0.0.6": {"starttls": True, "tls_name": "mx.verify.test"},
    })


def test_tls_opportunistic_and_none(engines, groups):
    g = tls_groups(groups)
    eng = engines.make(remote_port=g.port, destinations={"cleartext.test": Policy(tls="none")})
    q1 = eng.send(message("may"), sender=SENDER, recipients=["a@tls.test"])
    eng.events.wait(1, "delivered", queue_id=q1)
    q2 = eng.send(message("none"), sender=SENDER, recipients=["b@cleartext.test"])
    eng.events.wait(1, "delivered", queue_id=q2)
    q3 = eng.send(message("no starttls offered"), sender=SENDER, recipients=["c@notls.test"])
    eng.events.wait(1, "delivered", queue_id=q3)
    by_rcpt = {m.rcpt_tos[0]: m for m in g.wait_for(3)}
    assert by_rcpt["a@tls.test"].tls, "STARTTLS was offered and not used (policy 'may')"
    assert not by_rcpt["b@cleartext.test"].tls, "policy tls='none' must not start TLS"
    assert not by_rcpt["c@notls.test"].tls
    assert g.protocol_violations == []


def test_tls_may_falls_back_to_plaintext_after_a_failed_handshake(engines, groups):
    """Policy "may": a server that offers STARTTLS and then breaks the
    handshake gets the mail in plaintext on a new connection (Postfix's
    opportunistic TLS); policy "required" keeps it deferred instead."""
    from sinks import _Closed

    g = tls_groups(groups)
    sink = g["127.0.0.4"]

    async def broken_handshake(conn, sess):
        conn.transport.write(b"this is not a TLS record\r\n")
        raise _Closed()

    sink._upgrade = broken_handshake
    eng = engines.make(remote_port=g.port, destinations={"tls.test": Policy(tls="may")},
                       retry_min=30.0, retry_max=60.0)
    q1 = eng.send(message("fallback"), sender=SENDER, recipients=["a@tls.test"])
    ev = eng.events.wait(1, "delivered", queue_id=q1)[0]
    [m] = g.wait_for(1)
    assert not m.tls and list(m.rcpt_tos) == ["a@tls.test"] and m.session == 2
    assert ev.code == 250
    eng.stop()
    eng2 = engines.make(remote_port=g.port, destinations={"tls.test": Policy(tls="required")},
                        retry_min=30.0, retry_max=60.0)
    q2 = eng2.send(message("required"), sender=SENDER, recipients=["b@tls.test"])
    d = eng2.events.wait(1, "deferred", queue_id=q2)[0]
    # The handshake broke (the sink's garbage, then its close): deferred,
    # never sent in plaintext.
    assert d.enhanced in ("4.7.5", "4.4.2") and ("TLS" in d.text or "closed" in d.text), d.text
    time.sleep(0.3)
    assert len(g.all_messages()) == 1


def test_policy_hook_can_turn_certificate_checks_on(engines, groups):
    """destination_policy(...) -> Policy(tls_verify=True) checks the
    certificate against the system's CAs: the test sink's self-signed one
    fails (deferred, nothing sent); the same hook without tls_verify sends
    over TLS; and a hook's tls_verify=False never turns a configured check
    off."""
    g = tls_groups(groups)

    def hook(domain, mx_hosts):
        return Policy(tls="required", tls_verify=domain == "tls.test")

    eng = engines.make(remote_port=g.port, hooks={"destination_policy": hook},
                       retry_min=30.0, retry_max=60.0)
    q1 = eng.send(message("verified"), sender=SENDER, recipients=["a@tls.test"])
    d = eng.events.wait(1, "deferred", queue_id=q1)[0]
    assert d.enhanced == "4.7.5" and "certificate" in d.text.lower(), d.text
    q2 = eng.send(message("unverified"), sender=SENDER, recipients=["b@verify.test"])
    eng.events.wait(1, "delivered", queue_id=q2)
    [m] = g.wait_for(1)
    assert m.tls and list(m.rcpt_tos) == ["b@verify.test"]
    eng.stop()
    wrong_ca, _ = self_signed_cert("mx.verify.test")
    eng2 = engines.make(remote_port=g.port, hooks={"destination_policy": lambda d, h: Policy(tls="required")},
                        destinations={"verify.test": Policy(tls="required", tls_verify=True,
                                                            tls_ca_file=str(wrong_ca))},
                        retry_min=30.0, retry_max=60.0)
    q3 = eng2.send(message("still verified"), sender=SENDER, recipients=["c@verify.test"])
    d3 = eng2.events.wait(1, "deferred", queue_id=q3)[0]
    assert d3.enhanced == "4.7.5", d3.text
    assert len(g.all_messages()) == 1


def test_tls_required_and_verified(engines, groups):
    g = tls_groups(groups)
    good_ca = g["127.0.0.6"].cert_path
    wrong_ca, _ = self_signed_cert("mx.verify.test")  # same name, another key
    assert Path(wrong_ca).read_bytes() != Path(good_ca).read_bytes()
    eng = engines.make(remote_port=g.port, destinations={
        "notls.test": Policy(tls="required"),
        "verify.test": Policy(tls_verify=True, tls_ca_file=str(good_ca)),
        "badca.test": Policy(tls_verify=True, tls_ca_file=str(wrong_ca)),
    })
    q_req = eng.send(message("required"), sender=SENDER, recipients=["a@notls.test"])
    q_ok = eng.send(message("verified"), sender=SENDER, recipients=["b@verify.test"])
    q_bad = eng.send(message("wrong ca"), sender=SENDER, recipients=["c@badca.test"])

    d = eng.events.wait(1, "deferred", queue_id=q_req)[0]
    assert d.enhanced == "4.7.4", d
    ok = eng.events.wait(1, "delivered", queue_id=q_ok)[0]
    assert ok.ip == "127.0.0.6"
    bad = eng.events.wait(1, "deferred", queue_id=q_bad)[0]
    assert bad.enhanced and bad.enhanced.startswith("4."), bad

    plain = g["127.0.0.5"]
    assert plain.messages == [] and no_mail_commands(plain), plain.transcripts
    assert [m.rcpt_tos for m in g["127.0.0.6"].wait_for(1)] == [["b@verify.test"]]
    assert g["127.0.0.6"].messages[0].tls
    assert g["127.0.0.6"].messages[0].sni == "mx.verify.test"
    time.sleep(0.5)   # past a retry: still nothing in clear, nothing unverified
    assert plain.messages == [] and no_mail_commands(plain)
    assert [m.rcpt_tos for m in g["127.0.0.6"].messages] == [["b@verify.test"]]
    assert eng.events.select("delivered", queue_id=q_bad) == []
    assert eng.events.select("delivered", queue_id=q_req) == []


# ---- SMTPUTF8 --------------------------------------------------------------------------


def test_smtputf8(engines, groups):
    g = groups(["127.0.0.7", "127.0.0.8", SRC_IP],
               per_sink={"127.0.0.7": {"smtputf8": False}})
    eng = engines.make(remote_port=g.port)
    q1 = eng.send(message("utf8 refused"), sender=SENDER, recipients=["usér@utf8no.test"])
    q2 = eng.send(message("utf8 ok"), sender=SENDER, recipients=["usér@utf8yes.test"])
    b = eng.events.wait(1, "bounced", queue_id=q1)[0]
    assert b.enhanced == "5.6.7" and b.recipient == "usér@utf8no.test", b
    ok = eng.events.wait(1, "delivered", queue_id=q2)[0]
    assert ok.recipient == "usér@utf8yes.test"
    no, yes = g["127.0.0.7"], g["127.0.0.8"]
    assert no.messages == [] and no.protocol_violations == []
    assert no_mail_commands(no), no.transcripts
    got = yes.wait_for(1)[0]
    assert got.rcpt_tos == ["usér@utf8yes.test"]
    assert "SMTPUTF8" in [o.upper() for o in got.mail_options], got.mail_options
    assert yes.protocol_violations == []
    # The sender hears about the refused one, in a UTF-8 report (RFC 6533).
    dsn = parse_dsn(g[SRC_IP].wait_for(1)[0])
    r = dsn.per_recipient[0]
    assert "usér@utf8no.test" in norm(r["Final-Recipient"]), r["Final-Recipient"]
    assert norm(r["Status"]) == "5.6.7"


def test_smtputf8_refusal_is_not_reported_as_a_server_reply(engines, groups):
    """The refusal is our own decision (nothing was sent): the DSN must not
    claim that the server answered 553 (RFC 3464 §2.3.6: diagnostic type
    'smtp' is a reply the remote MTA issued)."""
    g = groups(["127.0.0.7", SRC_IP], per_sink={"127.0.0.7": {"smtputf8": False}})
    eng = engines.make(remote_port=g.port)
    eng.send(message("utf8 refused"), sender=SENDER, recipients=["usér@utf8no.test"])
    dsn = parse_dsn(g[SRC_IP].wait_for(1)[0])
    r = dsn.per_recipient[0]
    assert norm(r["Status"]) == "5.6.7"
    assert not norm(r["Diagnostic-Code"]).lower().startswith("smtp;"), r["Diagnostic-Code"]
    assert "SMTPUTF8" in norm(r["Diagnostic-Code"])
    assert " answered" not in dsn.human.get_content(), dsn.human.get_content()
    assert not any(ln.upper().startswith(("MAIL", "RCPT")) for t in g["127.0.0.7"].transcripts
                   for ln in t)


# ---- DNS verdicts ----------------------------------------------------------------------


def test_dns_verdicts(engines, groups):
    g = groups([SRC_IP])
    eng = engines.make(remote_port=g.port)
    q_null = eng.send(message("null mx"), sender=SENDER, recipients=["a@nullmx.test"])
    q_nx = eng.send(message("nxdomain"), sender=SENDER, recipients=["b@nosuch.nx.test"])
    q_fail = eng.send(message("servfail"), sender=SENDER, recipients=["c@broken.test"])
    null = eng.events.wait(1, "bounced", queue_id=q_null)[0]
    assert (null.enhanced, null.attempt, null.ip) == ("5.1.10", 1, None), null
    assert 500 <= null.code < 600 or null.code == 0, null
    nx = eng.events.wait(1, "bounced", queue_id=q_nx)[0]
    assert (nx.enhanced, nx.attempt, nx.ip) == ("5.1.2", 1, None), nx
    sf = eng.events.wait(1, "deferred", queue_id=q_fail)[0]
    assert (sf.enhanced, sf.attempt, sf.ip) == ("4.4.3", 1, None), sf
    assert eng.events.select("bounced", queue_id=q_fail) == []
    # Two DSNs, one per bounced message; nothing else reached a sink.
    dsns = [parse_dsn(m) for m in g[SRC_IP].wait_for(2)]
    status = sorted(norm(d.per_recipient[0]["Status"]) for d in dsns)
    assert status == ["5.1.10", "5.1.2"], status


# ---- next MX ---------------------------------------------------------------------------


def test_next_mx_after_refused_connection_and_421_greeting(engines, groups):
    g = groups(["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"],
               per_sink={"127.0.0.4": {"greeting": (421, "4.3.2 busy, try another")},
                         "127.0.0.6": {"greeting": (554, "5.3.2 no service here")}})
    with pytest.raises(OSError):   # the preferred MX of nextmx.test refuses connections
        socket.create_connection((DEAD_IP, g.port), timeout=2).close()
    eng = engines.make(remote_port=g.port)
    q1 = eng.send(message("next after refused"), sender=SENDER, recipients=["a@nextmx.test"])
    q2 = eng.send(message("next after 421"), sender=SENDER, recipients=["b@busy.test"])
    e1 = eng.events.wait(1, "delivered", queue_id=q1)[0]
    e2 = eng.events.wait(1, "delivered", queue_id=q2)[0]
    assert (e1.mx, e1.ip, e1.attempt) == ("mx2.nextmx.test", "127.0.0.3", 1)
    assert (e2.mx, e2.ip, e2.attempt) == ("mx2.busy.test", "127.0.0.5", 1)
    assert g["127.0.0.4"].connections_total >= 1      # it was asked first
    assert g["127.0.0.4"].messages == []
    # The next address of the same host.
    q4 = eng.send(message("next address"), sender=SENDER, recipients=["d@multi.test"])
    e4 = eng.events.wait(1, "delivered", queue_id=q4)[0]
    assert (e4.mx, e4.ip, e4.attempt) == ("mx.multi.test", "127.0.0.3", 1)
    # A 554 greeting (RFC 5321 §3.1): QUIT, and the next MX.
    q3 = eng.send(message("next after 554"), sender=SENDER, recipients=["c@refusing.test"])
    e3 = eng.events.wait(1, "delivered", queue_id=q3)[0]
    assert (e3.mx, e3.ip, e3.attempt) == ("mx2.refusing.test", "127.0.0.5", 1)
    assert g["127.0.0.6"].connections_total >= 1 and g["127.0.0.6"].messages == []
    assert g.protocol_violations == []
    assert eng.events.select("deferred") == []


# ---- expiry and delay notices ----------------------------------------------------------


def test_queue_lifetime_expiry(engines, groups):
    g = groups(["127.0.0.2", SRC_IP],
               per_sink={"127.0.0.2": {"rcpt_rules": {"*": (451, "4.2.1 try much later")}}})
    eng = engines.make(remote_port=g.port, queue_lifetime=1.5, retry_min=0.3, retry_max=0.5)
    t0 = time.monotonic()
    qid = eng.send(message("expires"), sender=SENDER, recipients=["x@dest.test"])
    ex = eng.events.wait(1, "expired", queue_id=qid, timeout=10)[0]
    assert time.monotonic() - t0 >= 1.2
    assert ex.enhanced == "4.4.7" and ex.recipient == "x@dest.test", ex
    assert len(eng.events.select("deferred", queue_id=qid)) >= 2
    dsn = parse_dsn(g[SRC_IP].wait_for(1, timeout=10)[0])
    assert dsn.received.mail_from == ""
    r = dsn.per_recipient[0]
    assert norm(r["Action"]) == "failed"
    assert norm(r["Status"]) == "4.4.7"
    # Status says why we gave up; Diagnostic-Code quotes what the server said.
    assert "451 4.2.1 try much later" in norm(r["Diagnostic-Code"]), r["Diagnostic-Code"]
    time.sleep(0.7)   # no attempt after expiry
    assert len(eng.events.select("expired", queue_id=qid)) == 1
    n = len(eng.events.select("deferred", queue_id=qid))
    time.sleep(0.7)
    assert len(eng.events.select("deferred", queue_id=qid)) == n
    assert g["127.0.0.2"].messages == []


def test_delay_warning(engines, groups):
    g = groups(["127.0.0.2", SRC_IP],
               per_sink={"127.0.0.2": {"rcpt_rules": {"*": (451, "4.2.1 still busy")}}})
    eng = engines.make(remote_port=g.port, delay_warning=0.5, queue_lifetime=30.0,
                       retry_min=0.3, retry_max=0.3)
    qid = eng.send(message("slow going"), sender=SENDER, recipients=["x@dest.test"])
    dsn = parse_dsn(g[SRC_IP].wait_for(1, timeout=10)[0])
    r = dsn.per_recipient[0]
    assert norm(r["Action"]) == "delayed" and norm(r["Status"]).startswith("4."), r
    assert "451 4.2.1 still busy" in norm(r["Diagnostic-Code"]), r["Diagnostic-Code"]
    ev = eng.events.wait(1, "delayed", queue_id=qid, timeout=3)[0]
    assert ev.recipient == "x@dest.test" and ev.enhanced and ev.enhanced.startswith("4."), ev
    time.sleep(1.0)    # retries go on, and the warning is not repeated
    assert len(eng.events.select("deferred", queue_id=qid)) >= 3
    assert len(g[SRC_IP].messages) == 1
    assert len(eng.events.select("delayed", queue_id=qid)) == 1


# ---- queue control ---------------------------------------------------------------------


def test_queued_while_disabled_then_delivered_after_restart(engines, groups, tmp_path):
    g = groups(["127.0.0.2"])
    data = tmp_path / "restart-data"
    first = engines.make(data, remote_port=g.port, delivery_enabled=False)
    ids = [first.send(message(f"later {i}"), sender=SENDER, recipients=[f"r{i}@dest.test"])
           for i in range(3)]
    time.sleep(0.5)
    assert g["127.0.0.2"].messages == [] and g["127.0.0.2"].connections_total == 0
    assert first.queue_stats()["messages"] == 3
    first.stop(timeout=2)
    engines.started.remove(first)
    second = engines.make(data, remote_port=g.port)
    evs = second.events.wait(3, "delivered", timeout=10)
    assert sorted(e.queue_id for e in evs) == sorted(ids)
    assert len(g["127.0.0.2"].wait_for(3)) == 3
    wait_until(lambda: second.queue_stats()["messages"] == 0, 5, "the queue empties")


def test_restart_keeps_holds_and_does_not_resend(engines, groups, tmp_path):
    """What a restart remembers: recipients already delivered are not sent
    again, deferred ones are tried at start, a hold survives."""
    g = groups(["127.0.0.2"], rcpt_rules={"temp": Rule(451, "4.3.0 not yet"),
                                          "held": Rule(451, "4.3.0 not yet")})
    sink = g["127.0.0.2"]
    data = tmp_path / "restart-holds"
    first = engines.make(data, remote_port=g.port, retry_min=30.0, retry_max=60.0)
    q1 = first.send(message("partly"), sender=SENDER, recipients=["ok@dest.test", "temp@dest.test"])
    q2 = first.send(message("held"), sender=SENDER, recipients=["held@dest.test"])
    first.events.wait(1, "delivered", recipient="ok@dest.test")
    first.events.wait(1, "deferred", recipient="temp@dest.test")
    first.events.wait(1, "deferred", queue_id=q2)
    assert first.hold(q2) == 1
    first.stop(timeout=2)
    engines.started.remove(first)
    sink.rcpt_rules.clear()                  # everything would be accepted now

    second = engines.make(data, remote_port=g.port)
    ev = second.events.wait(1, "delivered", recipient="temp@dest.test", timeout=10)[0]
    assert ev.queue_id == q1
    time.sleep(1.0)
    assert second.events.select("delivered", recipient="ok@dest.test") == []
    assert second.events.select(queue_id=q2) == [], "a held message was sent after a restart"
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == ["ok@dest.test", "temp@dest.test"]
    assert second.release(q2) == 1
    second.events.wait(1, "delivered", queue_id=q2, timeout=5)
    wait_until(lambda: second.queue_stats()["messages"] == 0, 5, "the queue empties")


def test_queue_control_sends_nothing_while_delivery_is_off(engines, groups):
    g = groups(["127.0.0.2"])
    eng = engines.make(remote_port=g.port, delivery_enabled=False)
    ids = [eng.send(message(f"off {i}"), sender=SENDER, recipients=[f"r{i}@dest.test"])
           for i in range(2)]
    eng.retry()
    eng.release(ids[0])
    eng.retry(ids[1])
    time.sleep(0.5)
    assert g["127.0.0.2"].messages == [] and g["127.0.0.2"].connections_total == 0
    assert eng.events.snapshot() == []
    assert eng.queue_stats()["messages"] == 2


def test_hold_retry_release(engines, groups):
    g = groups(["127.0.0.2"], rcpt_rules={"held": Rule(451, "4.3.0 not yet"),
                                          "again": Rule(451, "4.3.0 not yet")})
    sink = g["127.0.0.2"]
    # The retry timer is long: only queue control can make these go out soon.
    eng = engines.make(remote_port=g.port, retry_min=30.0, retry_max=60.0)
    q_held = eng.send(message("held"), sender=SENDER, recipients=["held@dest.test"])
    q_again = eng.send(message("again"), sender=SENDER, recipients=["again@dest.test"])
    eng.events.wait(1, "deferred", queue_id=q_held)
    eng.events.wait(1, "deferred", queue_id=q_again)
    assert eng.hold(q_held) == 1
    del sink.rcpt_rules["held"], sink.rcpt_rules["again"]   # now it would accept

    eng.retry(q_held)             # held: retry does nothing
    assert eng.retry(q_again) >= 1
    eng.events.wait(1, "delivered", queue_id=q_again, timeout=5)
    time.sleep(0.5)
    assert eng.events.select("delivered", queue_id=q_held) == []
    assert [m.rcpt_tos for m in sink.messages] == [["again@dest.test"]]

    t0 = time.monotonic()
    assert eng.release(q_held) == 1
    ev = eng.events.wait(1, "delivered", queue_id=q_held, timeout=5)[0]
    assert time.monotonic() - t0 < 5 and ev.attempt == 2
    assert sorted(m.rcpt_tos[0] for m in sink.wait_for(2)) == ["again@dest.test", "held@dest.test"]


def test_delete_deferred_message(engines, groups):
    g = groups(["127.0.0.2", SRC_IP],
               per_sink={"127.0.0.2": {"rcpt_rules": {"*": (451, "4.2.1 busy")}}})
    eng = engines.make(remote_port=g.port)
    qid = eng.send(message("to delete"), sender=SENDER, recipients=["x@dest.test"])
    eng.events.wait(1, "deferred", queue_id=qid)
    eng.delete(qid)
    wait_until(lambda: eng.queue_stats()["messages"] == 0, 5, "the queue empties")
    n = len(eng.events.select(queue_id=qid))
    time.sleep(1.0)    # past several retry times: no attempt, and no bounce
    assert len(eng.events.select(queue_id=qid)) == n
    assert g[SRC_IP].messages == [] and g[SRC_IP].connections_total == 0
    with pytest.raises(Exception):
        eng.delete(qid)


# ---- source pools ----------------------------------------------------------------------


def test_source_pools(engines, groups):
    g = groups(["127.0.0.2"])
    sink = g["127.0.0.2"]
    eng = engines.make(remote_port=g.port, source_pools={"bulk": ["127.0.0.5"]},
                       connection_idle_time=1.0)

    def deliver(rcpt: str, pool: str | None) -> None:
        qid = eng.send(message(rcpt), sender=SENDER, recipients=[rcpt], pool=pool)
        eng.events.wait(1, "delivered", queue_id=qid)

    # Each pair back to back, so the first one's connection is still idle
    # (connection_idle_time) when the second goes: it must not be reused
    # across pools, in either direction.
    deliver("a@dest.test", "bulk")
    deliver("b@dest.test", None)
    sink.wait_idle(timeout=5)
    deliver("c@dest.test", None)
    deliver("d@dest.test", "bulk")
    peers = {m.rcpt_tos[0]: m.peer[0] for m in sink.wait_for(4)}
    assert peers == {"a@dest.test": "127.0.0.5", "b@dest.test": "127.0.0.1",
                     "c@dest.test": "127.0.0.1", "d@dest.test": "127.0.0.5"}, peers


# ---- the Python API --------------------------------------------------------------------


def test_send_email_message(engines, groups):
    g = groups(["127.0.0.2"])
    eng = engines.make(remote_port=g.port)
    msg = EmailMessage()
    msg["From"] = "Sender <sender@src.test>"
    msg["To"] = "x@dest.test"
    msg["Subject"] = "an EmailMessage"
    msg.set_content("Grüße aus Köln\n")
    qid = eng.send(msg, sender=SENDER, recipients="x@dest.test", tags=["api"])
    ev = eng.events.wait(1, "delivered", queue_id=qid)[0]
    assert ev.tags == ("api",)
    data = g["127.0.0.2"].wait_for(1)[0].data
    assert b"\n" not in data.replace(b"\r\n", b"")
    got = email.message_from_bytes(data, policy=email.policy.default)
    assert got["Subject"] == "an EmailMessage"
    assert got["Date"] and got["Message-ID"]     # added by send()
    assert got.get_content().replace("\r\n", "\n") == "Grüße aus Köln\n"
    # What send() refuses, it refuses at once, with an exception.
    from mailengine.delivery import SendError
    for bad in ([], ["no-at-sign"], ["a b@dest.test"], ["<x@dest.test>"]):
        with pytest.raises(SendError):
            eng.send(msg, sender=SENDER, recipients=bad)
    with pytest.raises(SendError):
        eng.send(msg, sender="not an address", recipients=["x@dest.test"])


def test_send_many_generator(engines, groups):
    g = groups(["127.0.0.2", "127.0.0.3"])
    eng = engines.make(remote_port=g.port)
    n = 500

    def items():
        for i in range(n):
            dom = "dest.test" if i % 2 else "other.test"
            if i % 10 == 0:
                yield {"message": message(f"bulk {i}"), "sender": SENDER,
                       "recipients": [f"r{i}@{dom}"], "tags": ["bulk", f"n{i}"]}
            else:
                yield (message(f"bulk {i}"), SENDER, [f"r{i}@{dom}"], None, ["bulk", f"n{i}"])

    ids = eng.send_many(items(), batch=64)
    assert len(ids) == n and len(set(ids)) == n
    evs = eng.events.wait(n, "delivered", timeout=30)
    assert {e.queue_id for e in evs} == set(ids)
    for e in evs:
        i = int(e.recipient[1:].split("@")[0])
        assert e.queue_id == ids[i]
        assert e.tags == ("bulk", f"n{i}"), e
    got = g.wait_for(n, timeout=10)
    assert sorted(subject_of(m.data) for m in got) == sorted(f"bulk {i}" for i in range(n))


def test_async_deliveries_iterator(dns, groups, tmp_path):
    g = groups(["127.0.0.2"])
    cfg = make_config(tmp_path / "async-data", Ports(), delivery_enabled=True, dns=dns.address,
                      remote_port=g.port, retry_min=0.3, retry_max=1.0)
    eng = Engine(cfg)
    eng.watch_deliveries()

    async def main() -> tuple[list, str, bool]:
        server = asyncio.create_task(eng.serve())
        seen: list = []
        got_it = asyncio.Event()
        qid_box: list[str] = []

        async def collect() -> None:
            async for ev in eng.deliveries():
                seen.append(ev)
                if qid_box and ev.queue_id == qid_box[0] and ev.type == "delivered":
                    got_it.set()

        collector = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(10):
                while not eng.running:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)            # the collector is registered
            qid_box.append(eng.send(message("async"), sender=SENDER, recipients=["a@dest.test"],
                                    tags=["async"]))
            await asyncio.wait_for(got_it.wait(), 10)
        finally:
            eng.stop()
            await asyncio.wait_for(server, 10)
        # The iterator ends when the engine stops.
        await asyncio.wait_for(collector, 5)
        return seen, qid_box[0], collector.done()

    seen, qid, ended = asyncio.run(main())
    assert ended
    ev = [e for e in seen if e.queue_id == qid and e.type == "delivered"]
    assert len(ev) == 1 and ev[0].tags == ("async",) and ev[0].ip == "127.0.0.2"
    assert len(g["127.0.0.2"].wait_for(1)) == 1


# ---- mail received over SMTP and relayed -----------------------------------------------


def test_smtp_received_mail_is_relayed_with_only_dsn_parameters(engines, groups):
    """Mail a trusted client hands to the MX listener for a remote domain goes
    out with the DSN parameters (RFC 3461 §4) passed on, and only those:
    SIZE and BODY are the client's business with us, not with the next hop."""
    g = groups(["127.0.0.2", SRC_IP], dsn=True)
    sink = g["127.0.0.2"]
    eng = engines.make(remote_port=g.port)
    body = message("relayed over smtp", to="b@d1.test")
    with smtplib.SMTP("127.0.0.1", eng.config.listeners[0].port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.has_extn("dsn")
        code, _ = c.mail("a@src.test", ["SIZE=%d" % len(body), "BODY=8BITMIME", "RET=HDRS",
                                        "ENVID=env-42"])
        assert code == 250
        assert c.rcpt("b@d1.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;b@d1.test"])[0] == 250
        code, reply = c.data(body)
        assert code == 250, reply
    ev = wait_final(eng.events, recipient="b@d1.test")
    assert ev.type == "delivered", ev
    assert ev.sender == "a@src.test"
    got = sink.wait_for(1)[0]
    opts = {o.upper() for o in got.mail_options}
    assert {"RET=HDRS", "ENVID=ENV-42"} <= opts, got.mail_options
    assert not any(o.startswith("SIZE=") for o in opts), got.mail_options
    assert [o.upper() for o in got.rcpt_options[0]] == ["NOTIFY=FAILURE", "ORCPT=RFC822;B@D1.TEST"]
    assert sink.protocol_violations == []


# ---- the CLI ---------------------------------------------------------------------------


def test_cli_serve_send_hold_release(dns, groups, tmp_path):
    g = groups(["127.0.0.2"], rcpt_rules={"temp": Rule(451, "4.3.0 later")})
    sink = g["127.0.0.2"]
    data = tmp_path / "cli-data"

    def cli(*args: str, stdin: bytes) -> str:
        res = subprocess.run([sys.executable, "-m", "mailengine", *args], input=stdin,
                             capture_output=True, timeout=30, cwd=ROOT)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res.stdout.decode()

    def send(to: str, subject: str) -> str:
        out = cli("send", "--from", "a@src.test", "--to", to, "--data", str(data),
                  stdin=f"From: a@src.test\nTo: {to}\nSubject: {subject}\n\nhi\n".encode())
        m = re.match(r"queued (\S+)", out.strip())
        assert m, out
        return m.group(1)

    # No engine running: `send` queues into the spool, the next start delivers.
    q_offline = send("early@d1.test", "queued offline")
    ports = Ports()
    cmd = [sys.executable, "-m", "mailengine", "serve", "--data", str(data),
           "--smtp", f"127.0.0.1:{ports.mx}", "--workers", "1", "--hostname", "cli.example.test",
           "--dns", dns.address, "--remote-port", str(g.port), "--print-deliveries"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        out = LineReader(proc.stdout)
        out.wait_for(r"mailengine: ready", timeout=30)
        out.wait_for(rf"delivered {q_offline} to <early@d1\.test> via mx\.d1\.test: 250")

        # Through the running engine's control socket.
        qid = send("b@d1.test", "from the cli")
        out.wait_for(rf"delivered {qid} to <b@d1\.test> via mx\.d1\.test: 250", timeout=10)
        got = {m.rcpt_tos[0]: m for m in sink.wait_for(2)}
        assert got["b@d1.test"].mail_from == "a@src.test"
        assert subject_of(got["b@d1.test"].data) == "from the cli"
        assert subject_of(got["early@d1.test"].data) == "queued offline"

        # Hold and release through the control socket (the retry timer is
        # the default 300 s: only the release can send it now).
        qid2 = send("temp@d1.test", "held by the cli")
        out.wait_for(rf"deferred {qid2} to <temp@d1\.test>", timeout=10)
        assert cli("queue", "hold", qid2, "--data", str(data), stdin=b"").strip() == \
            "hold: 1 message(s)"
        del sink.rcpt_rules["temp"]
        assert cli("queue", "release", qid2, "--data", str(data), stdin=b"").strip() == \
            "release: 1 message(s)"
        out.wait_for(rf"delivered {qid2} to <temp@d1\.test> via mx\.d1\.test: 250", timeout=10)
        assert sorted(m.rcpt_tos[0] for m in sink.wait_for(3)) == \
            ["b@d1.test", "early@d1.test", "temp@d1.test"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    assert rc == 0


def test_452_split_keeps_the_delay_notice_sent_once(engines, groups):
    """Recipients deferred in a transaction whose others got 452 go on in a
    job of their own that remembers the delay notice already sent: one
    "delayed" event per recipient, however the job is split."""
    g = groups(["127.0.0.2", SRC_IP],
               per_sink={"127.0.0.2": {"greeting": (421, "4.3.2 busy"), "max_recipients": 1,
                                       "rcpt_rules": {"busy@dest.test": (451, "4.2.1 still busy")}}})
    eng = engines.make(remote_port=g.port, delay_warning=0.2, queue_lifetime=30.0,
                       retry_min=0.3, retry_max=0.3)
    qid = eng.send(message("x"), sender=SENDER, recipients=["busy@dest.test", "a@dest.test", "b@dest.test"])
    eng.events.wait(3, "delayed", queue_id=qid, timeout=5)
    g["127.0.0.2"].greeting = Rule.of(None)
    eng.events.wait(2, "delivered", queue_id=qid, timeout=10)
    g[SRC_IP].wait_for(1, timeout=10)            # the notice, then a while for a second one
    time.sleep(1.5)
    delayed = [e.recipient for e in eng.events.select("delayed", queue_id=qid)]
    assert sorted(delayed) == ["a@dest.test", "b@dest.test", "busy@dest.test"], delayed
    assert len(g[SRC_IP].messages) == 1          # one delay notice to the sender
