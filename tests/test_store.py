"""The mailbox store through real sessions: the deliver hook filing into
folders (Maildir++ .Name) or refusing, quotas (RCPT 452 4.2.2, deferral,
then the bounce at expiry, the Maildir++ maildirsize file), a Python store
(MemoryStore) behind local delivery and POP3, and the per-folder index
keeping POP3's view right when another tool changes the Maildir."""
from __future__ import annotations

import asyncio
import poplib
import smtplib
import time
from pathlib import Path

import pytest

from conftest import free_port, make_config, run_cli
from delivery_helpers import wait_until
from mailengine import Engine, Listener, MemoryStore, Reject, TempFail

HOST = "127.0.0.1"


class Srv:
    def __init__(self, tmp_path: Path, ports, hooks=None, store=None, users=(), **kw) -> None:
        self.pop3 = free_port()
        cfg = make_config(tmp_path / "data", ports, delivery_enabled=True, dns="127.0.0.1:9",
                          allow_plain_auth=True, **kw)
        cfg.listeners.append(Listener("pop3", HOST, self.pop3))
        for addr, quota in users:
            cfg.add_user(addr, "pw", rounds=1000, quota=quota)
        self.engine = Engine(cfg, store=store)
        for name, fn in (hooks or {}).items():
            self.engine.set_hook(name, fn)
        self.events: list = []
        self.engine.on_delivery(self.events.append)
        self.engine.start()
        self.ports = ports
        self.root = tmp_path / "data" / "mailboxes" / "example.test"

    def send(self, rcpt: str, body: bytes, sender: str = "x@sender.test") -> dict:
        with smtplib.SMTP(HOST, self.ports.mx, timeout=10) as s:
            return s.sendmail(sender, [rcpt], body)

    def pop(self, user: str = "alice@example.test", password: str = "secret") -> poplib.POP3:
        p = poplib.POP3(HOST, self.pop3, timeout=10)
        p.user(user)
        p.pass_(password)
        return p

    def wait_event(self, kind: str, n: int = 1, timeout: float = 10.0) -> list:
        return wait_until(lambda: len([e for e in self.events if e.type == kind]) >= n and
                          [e for e in self.events if e.type == kind], timeout, f"{n} {kind} events")


def files(d: Path) -> list[Path]:
    return sorted(d.glob("*")) if d.exists() else []


def msg(subject: str, body: str = "hello", size: int = 0) -> bytes:
    text = body + ("x" * 70 + "\r\n") * (size // 72)
    return f"Subject: {subject}\r\nFrom: x@sender.test\r\n\r\n{text}\r\n".encode()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_deliver_hook_files_refuses_and_defers(tmp_path, ports, asynchronous):
    seen = []

    def decide(user, message, recipient):
        seen.append((user, recipient))
        if b"Subject: spam" in message:
            return "Junk"
        if b"Subject: nested" in message:
            return "Archive/2024"
        if b"Subject: refuse" in message:
            return Reject(550, "5.7.1 we do not want this")
        if b"Subject: later" in message:
            return TempFail(451, "4.7.1 try later")
        if b"Subject: soft" in message:
            return Reject(450, "4.2.0 a 4xx Reject defers too")
        if b"Subject: bad folder" in message:
            return "../escape"
        return None

    async def decide_async(user, message, recipient):
        await asyncio.sleep(0)
        return decide(user, message, recipient)

    srv = Srv(tmp_path, ports, hooks={"deliver": decide_async if asynchronous else decide},
              retry_min=30.0)
    try:
        for subject in ("plain", "spam", "nested", "refuse", "later", "bad folder", "soft"):
            srv.send("Alice+tag@example.test", msg(subject))
        alice = srv.root / "alice"
        wait_until(lambda: len(files(alice / "new")) == 2, 10, "INBOX mail")
        junk = files(alice / ".Junk" / "new")
        assert len(junk) == 1 and b"Subject: spam" in junk[0].read_bytes()
        assert (alice / ".Junk" / "maildirfolder").exists()
        assert len(files(alice / ".Archive.2024" / "new")) == 1
        # A name that cannot be a folder goes to INBOX, never outside it.
        inbox = sorted(f.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0] for f in files(alice / "new"))
        assert inbox == [b"bad folder", b"plain"]
        assert not (tmp_path / "data" / "mailboxes" / "escape").exists()
        bounced = srv.wait_event("bounced")
        assert bounced[0].code == 550 and bounced[0].enhanced == "5.7.1"
        assert "we do not want this" in bounced[0].text
        wait_until(lambda: len([e for e in srv.events if e.type == "deferred"
                                and e.recipient == "Alice+tag@example.test"]) >= 2, 10, "two deferrals")
        deferred = sorted(e.enhanced for e in srv.events
                          if e.type == "deferred" and e.recipient == "Alice+tag@example.test")
        assert deferred == ["4.2.0", "4.7.1"]
        assert len([e for e in srv.events if e.type == "bounced"]) == 1
        assert all(u == "alice@example.test" and r == "Alice+tag@example.test" for u, r in seen)
    finally:
        srv.engine.stop()


def test_quota_rcpt_defer_then_bounce(tmp_path, ports):
    srv = Srv(tmp_path, ports, users=[("carol@example.test", "8K")],
              retry_min=0.3, retry_max=0.3, queue_lifetime=2.0)
    try:
        carol = srv.root / "carol"
        srv.send("carol@example.test", msg("first", size=5000))
        wait_until(lambda: len(files(carol / "new")) == 1, 10, "first message")
        # Maildir++ quota file: the limits, then the usage.
        text = (carol / "maildirsize").read_text()
        assert text.splitlines()[0] == "8192S"
        # An SMTP client that announces a size over what is left is told
        # at RCPT, with RFC 3463's mailbox-full code.
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            s.ehlo()
            s.mail("x@sender.test", ["SIZE=5000"])
            code, text_ = s.rcpt("carol@example.test")
            assert code == 452 and b"4.2.2" in text_
            code, _ = s.rcpt("alice@example.test")      # the transaction goes on
            assert code == 250
            s.rset()
        # Without SIZE the message is accepted, deferred with 4.2.2, and
        # bounced once the queue's lifetime is over.
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:   # smtplib's sendmail would add SIZE=
            s.ehlo()
            assert s.mail("alice@example.test")[0] == 250
            assert s.rcpt("carol@example.test")[0] == 250
            assert s.data(msg("second", size=5000))[0] == 250
        deferred = srv.wait_event("deferred")
        assert deferred[0].enhanced == "4.2.2" and "over quota" in deferred[0].text
        expired = srv.wait_event("expired", timeout=15)
        assert expired[0].recipient == "carol@example.test"
        # The bounce reaches the sender's own mailbox.
        wait_until(lambda: any(b"Subject: second" in f.read_bytes() and b"delivery-status" in f.read_bytes()
                               for f in files(srv.root / "alice" / "new")), 10, "the bounce")
        assert len(files(carol / "new")) == 1
    finally:
        srv.engine.stop()


def test_quota_freed_by_pop3_delete(tmp_path, ports):
    srv = Srv(tmp_path, ports, users=[("dave@example.test", "6K")], retry_min=0.3, retry_max=0.3)
    try:
        dave = srv.root / "dave"
        srv.send("dave@example.test", msg("one", size=4000))
        wait_until(lambda: len(files(dave / "new")) == 1, 10, "first")
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:   # no SIZE=: accepted, then deferred
            s.ehlo()
            s.mail("x@sender.test")
            s.rcpt("dave@example.test")
            assert s.data(msg("two", size=4000))[0] == 250
        srv.wait_event("deferred")
        p = srv.pop("dave@example.test", "pw")
        assert p.stat()[0] == 1
        p.dele(1)
        p.quit()
        # Room again: the next retry delivers the deferred one.
        wait_until(lambda: [f for f in files(dave / "new") if b"Subject: two" in f.read_bytes()], 10,
                   "the deferred message after the delete")
        lines = (dave / "maildirsize").read_text().splitlines()
        assert lines[0] == "6144S" and any(line.startswith("-") for line in lines[1:])
    finally:
        srv.engine.stop()


def test_python_store_behind_delivery_and_pop3(tmp_path, ports):
    store = MemoryStore()

    def deliver(user, message):
        return "Junk" if b"Subject: spam" in message else None

    srv = Srv(tmp_path, ports, store=store, hooks={"deliver": deliver})
    try:
        srv.send("alice@example.test", msg("hello", ".leading dot"))
        srv.send("alice@example.test", msg("spam"))
        srv.send("alice@example.test", msg("again"))
        wait_until(lambda: len(store.list("alice@example.test", "INBOX")) == 2, 10, "two in INBOX")
        wait_until(lambda: len(store.list("alice@example.test", "Junk")) == 1, 10, "one in Junk")
        assert store.folders("alice@example.test") == ["INBOX", "Junk"]
        assert not (srv.root / "alice").exists()          # nothing went to the Maildir store
        p = srv.pop()
        count, size = p.stat()
        assert count == 2 and size == sum(m.size for m in store.list("alice@example.test", "INBOX"))
        resp, lines, _ = p.retr(1)
        assert resp.startswith(b"+OK") and b"Subject: hello" in lines and b".leading dot" in lines
        assert lines[0].startswith(b"Return-Path: <x@sender.test>")
        uidl = p.uidl()[1]
        assert len(uidl) == 2 and uidl[0].split()[1] != uidl[1].split()[1]
        p.dele(1)
        p.quit()
        left = store.list("alice@example.test", "INBOX")
        assert len(left) == 1 and b"Subject: again" in store.read("alice@example.test", "INBOX", left[0].uid)
        delivered = srv.wait_event("delivered", 3)
        assert len(delivered) == 3 and all(e.mx == "local" for e in delivered)
    finally:
        srv.engine.stop()


def test_python_store_quota_and_failures(tmp_path, ports):
    class Flaky(MemoryStore):
        fail = True

        def deliver(self, user, folder, message):
            if self.fail and b"Subject: flaky" in message:
                self.fail = False
                raise RuntimeError("backend down")
            return super().deliver(user, folder, message)

    store = Flaky(quota=9000)
    folders_seen = []
    orig = store.deliver

    def deliver_spy(user, folder, message):
        folders_seen.append(folder)
        return orig(user, folder, message)

    store.deliver = deliver_spy
    srv = Srv(tmp_path, ports, store=store, retry_min=0.3, retry_max=0.3,
              hooks={"deliver": lambda user, message: "../escape" if b"Subject: esc" in message else None})
    try:
        srv.send("alice@example.test", msg("flaky"))
        # A store that raises defers the message; the retry delivers it.
        d = srv.wait_event("deferred")
        assert d[0].enhanced == "4.3.0"
        wait_until(lambda: len(store.list("alice@example.test", "INBOX")) == 1, 10, "retried delivery")
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:   # no SIZE=: the RCPT check lets it in
            s.ehlo()
            s.mail("x@sender.test")
            s.rcpt("alice@example.test")
            assert s.data(msg("big", size=9000))[0] == 250
        d = srv.wait_event("deferred", 2)
        assert d[1].enhanced == "4.2.2"
        # The store's own check_quota is asked at RCPT with the announced size.
        with smtplib.SMTP(HOST, ports.mx, timeout=10) as s:
            s.ehlo()
            s.mail("x@sender.test", ["SIZE=9000"])
            code, text = s.rcpt("alice@example.test")
            assert code == 452 and b"4.2.2" in text
            s.rset()
            s.mail("x@sender.test", ["SIZE=100"])
            assert s.rcpt("alice@example.test")[0] == 250
            assert s.data(msg("esc"))[0] == 250
        # A folder name that cannot be one never reaches the store.
        wait_until(lambda: len(folders_seen) >= 3, 10, "the esc delivery")
        assert "../escape" not in folders_seen and folders_seen[-1] == "INBOX"
    finally:
        srv.engine.stop()


def test_mailbox_keeps_the_order_mail_was_queued(tmp_path, ports):
    """Local deliveries run in parallel across mailboxes, but each mailbox
    gets its messages (and UIDs) in queue order, also messages that list
    another local recipient first."""
    srv = Srv(tmp_path, ports, users=(("bob@example.test", 0),))
    try:
        n = 40
        rcpts = [["alice@example.test", "bob@example.test"] if i % 2 else ["bob@example.test"]
                 for i in range(n)]
        srv.engine.send_many((msg(f"m{i:02}"), "x@sender.test", r) for i, r in enumerate(rcpts))
        srv.wait_event("delivered", n + n // 2, timeout=30)
        for user, pw, want in (("bob@example.test", "pw", [f"m{i:02}" for i in range(n)]),
                               ("alice@example.test", "secret", [f"m{i:02}" for i in range(1, n, 2)])):
            p = srv.pop(user, pw)
            count = p.stat()[0]
            got = [next(x for x in p.top(k, 0)[1] if x.startswith(b"Subject: "))[9:].decode()
                   for k in range(1, count + 1)]
            p.quit()
            assert got == want, user
    finally:
        srv.engine.stop()


def test_index_follows_other_tools(tmp_path, ports):
    srv = Srv(tmp_path, ports)
    try:
        for s in ("a", "b", "c"):
            srv.send("alice@example.test", msg(s))
        alice = srv.root / "alice"
        wait_until(lambda: len(files(alice / "new")) == 3, 10, "three messages")
        p = srv.pop()
        before = dict(line.decode().split() for line in p.uidl()[1])
        p.quit()
        index = (alice / "mailengine-index").read_text().splitlines()
        assert index[0].startswith("mailengine-index 1 ") and len(index) == 4
        uidvalidity = index[0].split()[2]
        # A mail client reads one (new -> cur with flags) and deletes another.
        by_name = {f.name.split(":")[0]: f for f in files(alice / "new")}
        first, second = by_name[before["1"]], by_name[before["2"]]     # UIDL is the base name
        first_subject = first.read_bytes().split(b"Subject: ")[1].split(b"\r\n")[0]
        first.rename(alice / "cur" / (first.name + ":2,S"))
        second.unlink()
        p = srv.pop()
        after = dict(line.decode().split() for line in p.uidl()[1])
        assert sorted(after.values()) == sorted([before["1"], before["3"]])
        _, lines, _ = p.retr(1)
        assert b"Subject: " + first_subject in lines
        p.quit()
        # A file another tool named with a space: UIDL stays one token.
        (alice / "new" / "1999999999.other tool,S=20").write_bytes(b"Subject: z\r\n\r\nbody\r\n")
        p = srv.pop()
        assert p.uidl(3).split()[2] == b"1999999999.other_tool,S=20"
        assert b"Subject: z" in p.retr(3)[1]
        p.quit()
        (alice / "new" / "1999999999.other tool,S=20").unlink()
        index = (alice / "mailengine-index").read_text().splitlines()
        assert index[0].split()[2] == uidvalidity            # same UIDVALIDITY, uids kept
        uids = [line.split()[0] for line in index[1:]]
        assert uids == ["1", "3", "4"]
        assert any(" c S " in line for line in index[1:])   # in cur/, flag S seen
    finally:
        srv.engine.stop()


def test_user_quota_cli(tmp_path):
    data = str(tmp_path / "d")
    r = run_cli("user", "add", "--data", data, "--quota", "2M", "--quota-messages", "100",
                "q@example.test", "--password-stdin", input="pw\n")
    assert r.returncode == 0, r.stderr
    r = run_cli("user", "list", "--data", data)
    assert r.stdout.split() == ["q@example.test", f"quota={2 << 20}", "quota_messages=100"]
    assert run_cli("user", "quota", "--data", data, "q@example.test", "512K").returncode == 0
    assert run_cli("user", "list", "--data", data).stdout.split() == ["q@example.test", "quota=524288"]
    assert run_cli("user", "quota", "--data", data, "nobody@example.test", "1M").returncode == 1
    r = run_cli("user", "quota", "--data", data, "q@example.test", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    r = run_cli("user", "passwd", "--data", data, "q@example.test", "--password-stdin", input="pw2\n")
    assert r.returncode == 0
    assert "quota=524288" in run_cli("user", "list", "--data", data).stdout   # passwd keeps the quota


def test_deliver_command_folders_and_quota(tmp_path):
    """`mailengine deliver --folder` files into a Maildir++ folder; a user's
    quota from DATA/users makes it exit 75 (temporary) when full."""
    data = str(tmp_path / "data")
    assert run_cli("user", "add", "--data", data, "--quota", "3K", "eve@example.test",
                   "--password-stdin", input="pw\n").returncode == 0
    msg = "Subject: lda\n\n" + "y" * 2000 + "\n"
    r = run_cli("deliver", "--data", data, "--folder", "Lists", "eve+x@example.test", input=msg)
    assert r.returncode == 0, r.stderr
    eve = tmp_path / "data" / "mailboxes" / "example.test" / "eve"
    assert len(files(eve / ".Lists" / "new")) == 1 and (eve / ".Lists" / "maildirfolder").exists()
    r = run_cli("deliver", "--data", data, "eve@example.test", input=msg)
    assert r.returncode == 75 and "over quota" in r.stderr
    assert not files(eve / "new")
    r = run_cli("deliver", "--data", data, "--folder", "a..b", "eve@example.test", input="x\n")
    assert r.returncode == 64


def test_pop3_without_local_delivery_and_a_foreign_maildirsize(tmp_path, ports):
    """Another MTA delivers (here `mailengine deliver`), mailengine only
    serves POP3 (local_delivery off); a maildirsize another tool keeps is
    kept in step by our deliveries and deletions."""
    data = tmp_path / "data"
    alice = data / "mailboxes" / "example.test" / "alice"
    alice.mkdir(parents=True)
    (alice / "maildirsize").write_text("1000000S\n0 0\n")
    for i in range(2):
        r = run_cli("deliver", "--data", str(data), "alice@example.test", input=f"Subject: m{i}\n\nbody\n")
        assert r.returncode == 0, r.stderr
    lines = (alice / "maildirsize").read_text().splitlines()
    assert lines[0] == "1000000S" and len(lines) == 4 and lines[2].endswith(" 1")
    srv = Srv(tmp_path, ports, local_delivery=False)
    try:
        p = srv.pop()
        assert p.stat()[0] == 2
        size1 = int(p.list(1).split()[2])
        p.dele(1)
        p.quit()
        assert (alice / "maildirsize").read_text().splitlines()[-1] == f"-{size1} -1"
        # Local mail stays queued: POP3 works without local delivery.
        srv.send("alice@example.test", msg("queued"))
        time.sleep(0.3)
        assert len(files(alice / "new")) + len(files(alice / "cur")) == 1
    finally:
        srv.engine.stop()


def test_pop3_sizes_of_files_other_tools_wrote(tmp_path, ports):
    """LIST gives the size as sent (CRLF): a file written with LF ends and
    no size in its name is counted as CRLF, and a Dovecot-style ",W="
    (virtual size) wins over ",S=" (file size)."""
    srv = Srv(tmp_path, ports)
    try:
        new = srv.root / "alice" / "new"
        new.mkdir(parents=True)
        lf = b"Subject: lf\nFrom: a@b.test\n\nline one\nline two\n"
        (new / "1700000001.lf-tool").write_bytes(lf)
        (new / "1700000002.dove,S=32,W=36").write_bytes(b"Subject: w\n\nabcdefghijklmnopqrst\n")
        noend = b"Subject: n\n\nno end of line"
        (new / "1700000003.noend").write_bytes(noend)
        p = srv.pop()
        sizes = [int(x.split()[1]) for x in p.list()[1]]
        assert sizes == [len(lf) + lf.count(b"\n"), 36, len(noend) + 2 + 2]
        # What RETR sends (CRLF lines) is exactly what LIST said.
        for n in (1, 3):
            _, lines, _ = p.retr(n)
            assert sum(len(x) + 2 for x in lines) == sizes[n - 1]
        p.quit()
    finally:
        srv.engine.stop()
