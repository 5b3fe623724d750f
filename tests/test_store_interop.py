"""The Maildir store and the POP3 server with real peers: fetchmail pulls
our mail over POP3 and POP3S (with and without `keep`), Dovecot's doveadm
reads the Maildir we write (and we read the Maildir Dovecot rewrites), and
a SIGKILL in the middle of local delivery never leaves a partial message
where a reader can see it.

SMTP in -> POP3 out with poplib, and a delivery during an open POP3
session followed by DELE/QUIT, are in test_pop3.py."""
from __future__ import annotations

import email
import email.policy
import hashlib
import json
import mailbox
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import Ports, free_port, make_config
from smtpclient import client_tls
from mailengine import Engine, Listener

HOST = "127.0.0.1"
USER, PASSWORD = "alice@example.test", "secret"
FETCHMAIL = shutil.which("fetchmail")
DOVEADM = shutil.which("doveadm")


def peer_env(**extra: str) -> dict[str, str]:
    """The environment for a program that is not ours: no sanitizer runtime
    (a test-asan run preloads it), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    env.update(extra)
    return env


def maildir_files(box: Path) -> list[Path]:
    """The messages a reader sees: new/ and cur/, never tmp/."""
    return sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                  for p in (box / sub).iterdir())


def base_name(p: Path | str) -> str:
    """The Maildir unique name (what our UIDL and Dovecot's GUID are)."""
    return Path(p).name.split(":2,", 1)[0]


class Store:
    """An in-process engine that delivers locally and serves POP3/POP3S."""

    def __init__(self, data: Path, ports: Ports, **kw: object) -> None:
        self.pop3, self.pop3s = free_port(), free_port()
        cfg = make_config(data, ports, delivery_enabled=True, dns="127.0.0.1:9", **kw)
        cfg.listeners += [Listener("pop3", HOST, self.pop3), Listener("pop3s", HOST, self.pop3s)]
        self.engine = Engine(cfg, events=False).start()
        self.ports = ports
        self.data = data
        self.root = Path(str(kw.get("mail_dir") or data / "mailboxes"))
        self.box = self.root / "example.test" / "alice"

    def deliver(self, msgs: list[tuple[str, bytes]]) -> dict[str, bytes]:
        """Send (recipient, message) pairs by SMTP; wait until each is a file
        in the Maildir. Returns {file base name: message as sent}."""
        before = {base_name(p) for p in maildir_files(self.box)}
        with smtplib.SMTP(HOST, self.ports.mx, timeout=10) as s:
            for rcpt, m in msgs:
                assert s.sendmail("x@sender.test", [rcpt], m, mail_options=["BODY=8BITMIME"]) == {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new = [p for p in maildir_files(self.box) if base_name(p) not in before]
            if len(new) >= len(msgs):
                break
            time.sleep(0.02)
        assert len(new) == len(msgs), f"{len(new)} of {len(msgs)} messages reached the mailbox"
        # Match files to what was sent by the token in the Subject.
        out = {}
        for p in new:
            data = p.read_bytes()
            tok = re.search(rb"\r\nSubject: (\S+)", data).group(1)
            [sent] = [m for _, m in msgs if b"Subject: " + tok + b"\r\n" in m]
            out[base_name(p)] = sent
        return out

    def stop(self) -> None:
        self.engine.stop()


def strip_added(data: bytes, rcpt: str) -> bytes:
    """What we put in front of a message at delivery: Return-Path,
    Delivered-To, the Received header of our SMTP server. Asserts they are
    there and returns the rest (the message as the client sent it)."""
    head = b"Return-Path: <x@sender.test>\r\nDelivered-To: " + rcpt.encode() + b"\r\n"
    assert data.startswith(head), data[:200]
    rest = data[len(head):]
    assert rest.startswith(b"Received: "), rest[:200]
    line_end = rest.index(b"\r\n") + 2
    while rest[line_end:line_end + 1] in (b" ", b"\t"):        # folded continuation lines
        line_end = rest.index(b"\r\n", line_end) + 2
    return rest[line_end:]


def sample_messages(tag: str) -> list[tuple[str, bytes]]:
    """Messages that test a store and a POP3 client: dot lines (one a lone
    '.', which POP3 must stuff), 8-bit UTF-8 text, a plus-addressed
    recipient, a larger message of many lines."""
    big = b"".join(b"%s line %05d " % (tag.encode(), i) + b"y" * 70 + b"\r\n" for i in range(3000))
    return [
        ("alice@example.test",
         f"Subject: {tag}-dots\r\nFrom: x@sender.test\r\n\r\n"
         ".starts with a dot\r\n.\r\n..two dots\r\nlast line\r\n".encode()),
        ("alice@example.test",
         f"Subject: {tag}-8bit\r\nFrom: x@sender.test\r\nMIME-Version: 1.0\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         "h\u00e9llo w\u00f6rld \u2603 \u65e5\u672c\r\n".encode()),
        ("Alice+tag@example.test",
         f"Subject: {tag}-plus\r\nFrom: x@sender.test\r\nTo: Alice+tag@example.test\r\n\r\n"
         f"for the tag {tag}-plusbody\r\n".encode()),
        ("alice@example.test",
         f"Subject: {tag}-big\r\nFrom: x@sender.test\r\n\r\n".encode() + big),
    ]


# --------------------------------------------------------------------- fetchmail

MDA = """import os, sys, time
data = sys.stdin.buffer.read()
name = "%d.%d" % (time.time_ns(), os.getpid())
tmp = os.path.join(sys.argv[1], "." + name)
with open(tmp, "wb") as f:
    f.write(data)
os.rename(tmp, os.path.join(sys.argv[1], name))
"""


def fetchmail(work: Path, port: int, options: str) -> tuple[int, str, list[bytes]]:
    """One fetchmail run (foreground, private rc file and HOME) delivering
    every message through an MDA that writes it to a file. Returns the exit
    status, the log and the messages written in this run."""
    home = work / "home"
    out = work / "out"
    home.mkdir(parents=True, exist_ok=True)
    out.mkdir(exist_ok=True)
    mda = work / "mda.py"
    mda.write_text(MDA)
    rc = work / "fetchmailrc"
    # invisible: no Received header of fetchmail's own; no stripcr: keep CRLF;
    # no rewrite: headers untouched; pass8bits: 8-bit text as is.
    rc.write_text(
        "set no bouncemail\nset no syslog\nset invisible\n"
        f"poll {HOST} with proto POP3 port {port} auth password timeout 15\n"
        f'  user "{USER}" there with password "{PASSWORD}" is root here\n'
        f"  options no rewrite no stripcr pass8bits {options}\n"
        f'  mda "{sys.executable} {mda} {out}"\n')
    rc.chmod(0o600)
    before = set(out.iterdir())
    run = subprocess.run([FETCHMAIL, "-d0", "--nodetach", "-v", "-f", str(rc)], capture_output=True,
                         text=True, timeout=30, env=peer_env(HOME=str(home), FETCHMAILHOME=str(home)))
    got = [p.read_bytes() for p in sorted(set(out.iterdir()) - before, key=lambda p: p.name)]
    return run.returncode, run.stdout + run.stderr, got


@pytest.fixture
def store(tmp_path, ports):
    srv = Store(tmp_path / "data", ports, allow_plain_auth=True)
    yield srv
    srv.stop()


def check_fetched(got: list[bytes], on_disk: dict[str, bytes], sent: dict[str, bytes]) -> None:
    """Every message fetched is byte for byte the file in our Maildir, and
    that file is what the SMTP client sent behind our three headers."""
    assert len(got) == len(on_disk), f"fetched {len(got)} of {len(on_disk)}"
    by_bytes = {data: name for name, data in on_disk.items()}
    for data in got:
        assert data in by_bytes, f"fetched message differs from every stored one: {data[:300]!r}"
    assert {by_bytes[d] for d in got} == set(on_disk)          # each one once
    for name, data in on_disk.items():
        rcpt = re.search(rb"\r\nDelivered-To: (\S+)\r\n", b"\r\n" + data).group(1).decode()
        assert strip_added(data, rcpt) == sent[name]


@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed")
def test_fetchmail_plain_pop3_keep(store, tmp_path):
    """Plain POP3 (allow_plain_auth), USER/PASS, RETR, `keep`: everything
    arrives intact, nothing leaves our Maildir, and a second run (fetchmail
    remembers UIDLs) fetches nothing new."""
    sent = store.deliver(sample_messages("fmkeep"))
    on_disk = {base_name(p): p.read_bytes() for p in maildir_files(store.box)}
    # sslproto '': no opportunistic STLS, so this really is a plaintext session.
    code, log, got = fetchmail(tmp_path / "fm", store.pop3, "keep sslproto ''")
    assert code == 0, log
    assert "POP3> STLS" not in log and "POP3> RETR 4" in log, log
    check_fetched(got, on_disk, sent)
    # keep: the mailbox is as it was.
    assert {base_name(p): p.read_bytes() for p in maildir_files(store.box)} == on_disk
    # A second run: the UIDLs are the ones fetchmail saw, so there is nothing new (exit 1).
    code, log, again = fetchmail(tmp_path / "fm", store.pop3, "keep sslproto ''")
    assert code == 1 and again == [], log
    assert len(maildir_files(store.box)) == len(on_disk)
    uidls = re.findall(r"POP3< \d+ (\S+)", log)
    assert sorted(uidls) == sorted(on_disk), log


@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed")
@pytest.mark.parametrize("mode", ["pop3s", "stls"])
def test_fetchmail_tls_verified_no_keep(store, tmp_path, mode):
    """Implicit TLS (pop3s) or STLS on the pop3 port, the certificate
    checked against our self-signed one; without `keep` fetchmail fetches
    and DELEs: afterwards our Maildir is empty, and the messages it got are
    the ones sent."""
    sent = store.deliver(sample_messages("fmtls"))
    on_disk = {base_name(p): p.read_bytes() for p in maildir_files(store.box)}
    cert = store.data / "tls" / "cert.pem"
    assert cert.is_file()
    verify = f'sslcertck sslcertfile "{cert}" sslcommonname "mx.example.test"'
    if mode == "pop3s":
        code, log, got = fetchmail(tmp_path / "fm", store.pop3s, f"no keep ssl {verify}")
    else:   # sslproto auto: STLS is required, not merely tried
        code, log, got = fetchmail(tmp_path / "fm", store.pop3, f"no keep sslproto 'auto' {verify}")
        assert "POP3> STLS" in log, log
    assert code == 0, log
    assert "DELE 4" in log and "TLSv1" in log, log
    check_fetched(got, on_disk, sent)
    assert maildir_files(store.box) == []                 # deleted in the UPDATE state
    assert not list((store.box / "tmp").iterdir())
    p = poplib.POP3_SSL(HOST, store.pop3s, timeout=10, context=client_tls())
    p.user(USER)
    p.pass_(PASSWORD)
    assert p.stat() == (0, 0)
    p.quit()


# --------------------------------------------------------------------- Dovecot

FLAG_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def flags_in_name(p: Path) -> set[str]:
    info = p.name.split(":2,", 1)[1] if ":2," in p.name else ""
    return {FLAG_LETTERS[c] for c in info if c in FLAG_LETTERS}


class Doveadm:
    """doveadm against a private configuration, no daemon: a Maildir copied
    into a directory of its own, owned by an unprivileged user (Dovecot
    refuses mail access as root)."""

    def __init__(self, src_root: Path) -> None:
        try:
            pw = pwd.getpwnam("nobody")
        except KeyError:
            pw = pwd.getpwnam("dovenull")
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        # Not under tmp_path: pytest's directories are 0700 root, which the
        # unprivileged user could not traverse.
        self.dir = Path(tempfile.mkdtemp(prefix="me-dovecot-"))
        self.root = self.dir / "mailboxes"
        shutil.copytree(src_root, self.root)
        self.box = self.root / "example.test" / "alice"
        for d in ("home", "run"):
            (self.dir / d).mkdir()
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(
            f"base_dir = {self.dir}/run\nstate_dir = {self.dir}/run\nlog_path = /dev/stderr\n"
            f"mail_location = maildir:{self.box}\n"
            f"mail_uid = {self.uid}\nmail_gid = {self.gid}\n"
            "first_valid_uid = 1\nfirst_valid_gid = 1\nssl = no\n")
        for dirpath, dirnames, filenames in os.walk(self.dir):
            os.chown(dirpath, self.uid, self.gid)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), self.uid, self.gid)

    def __call__(self, *args: str) -> object:
        run = subprocess.run([DOVEADM, "-c", str(self.conf), "-f", "json", *args],
                             capture_output=True, timeout=30,
                             env=peer_env(HOME=str(self.dir / "home"), USER=pw_name(self.uid)))
        assert run.returncode == 0, (args, run.stderr.decode(errors="replace"))
        assert b"Error" not in run.stderr, (args, run.stderr.decode(errors="replace"))
        out = run.stdout.decode()
        return json.loads(out) if out.strip() else []

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def pw_name(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


@pytest.mark.skipif(DOVEADM is None, reason="doveadm (Dovecot) is not installed")
def test_dovecot_reads_our_maildir_and_we_read_dovecots(store, tmp_path):
    sent = store.deliver(sample_messages("dove"))
    # A POP3 session that reads everything and deletes nothing: leaves no flags.
    p = poplib.POP3(HOST, store.pop3, timeout=10)
    p.user(USER)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 4
    for i in range(1, 5):
        p.retr(i)
    uidl_before = sorted(x.split()[1].decode() for x in p.uidl()[1])
    p.quit()
    assert uidl_before == sorted(sent)
    # Another MUA (mutt, say) marks one message seen and flagged: new/X -> cur/X:2,FS.
    flagged = next(n for n, m in sent.items() if b"-plus\r\n" in m)
    os.rename(store.box / "new" / flagged, store.box / "cur" / (flagged + ":2,FS"))
    p = poplib.POP3(HOST, store.pop3, timeout=10)
    p.user(USER)
    p.pass_(PASSWORD)
    assert sorted(x.split()[1].decode() for x in p.uidl()[1]) == uidl_before   # UIDL unchanged
    p.quit()
    files = {base_name(f): f for f in maildir_files(store.box)}
    assert len(files) == 4

    dove = Doveadm(store.root)
    try:
        [status] = dove("mailbox", "status", "messages", "INBOX")
        assert int(status["messages"]) == 4
        fetched = dove("fetch", "uid guid flags size.physical text", "mailbox", "INBOX", "all")
        assert sorted(m["guid"] for m in fetched) == sorted(files)     # Dovecot's GUID is our name
        for m in fetched:
            f = files[m["guid"]]
            data = f.read_bytes()
            assert m["text"].encode() == data, m["guid"]              # the same bytes, 8-bit included
            assert int(m["size.physical"]) == len(data) == int(f.name.split(",S=")[1].split(":")[0])
            assert set(m["flags"].split()) - {"\\Recent"} == flags_in_name(f), (f.name, m["flags"])
        assert set(next(m for m in fetched if m["guid"] == flagged)["flags"].split()) >= \
            {"\\Seen", "\\Flagged"}
        # Dovecot's own parser finds a body word and a header.
        uid_of = {m["guid"]: m["uid"] for m in fetched}
        hits = dove("search", "mailbox", "INBOX", "body", "dove-plusbody")
        assert [h["uid"] for h in hits] == [uid_of[flagged]]
        big = next(n for n, m in sent.items() if b"-big\r\n" in m)
        hits = dove("search", "mailbox", "INBOX", "subject", "dove-big")
        assert [h["uid"] for h in hits] == [uid_of[big]]

        # Now the other way: Dovecot changes the copy (a flag, an expunge,
        # which renames files into cur/ and writes its index files next to
        # them) and our POP3 server reads what Dovecot left.
        dots = next(n for n, m in sent.items() if b"-dots\r\n" in m)
        dove("flags", "add", "\\Seen \\Answered", "mailbox", "INBOX", "uid", uid_of[dots])
        dove("expunge", "mailbox", "INBOX", "uid", uid_of[big])
        # (Dovecot keeps a \Recent message in new/, with its flags in the name.)
        assert [flags_in_name(f) for f in maildir_files(dove.box)
                if base_name(f) == dots] == [{"\\Seen", "\\Answered"}]
        assert int(dove("mailbox", "status", "messages", "INBOX")[0]["messages"]) == 3
        other = Store(tmp_path / "data2", Ports(), mail_dir=str(dove.root), allow_plain_auth=True)
        try:
            p = poplib.POP3(HOST, other.pop3, timeout=10)
            p.user(USER)
            p.pass_(PASSWORD)
            assert p.stat()[0] == 3
            uidls = {int(x.split()[0]): x.split()[1].decode() for x in p.uidl()[1]}
            assert sorted(uidls.values()) == sorted(set(files) - {big})
            for n, uid in uidls.items():
                assert b"\r\n".join(p.retr(n)[1]) + b"\r\n" == files[uid].read_bytes(), uid
            p.quit()
        finally:
            other.stop()
    finally:
        dove.cleanup()


# --------------------------------------------------------------------- crash

CRASH_MESSAGES = 120
CRASH_SENDERS = 4


def crash_message(i: int) -> tuple[str, bytes]:
    """A message with a unique token, a size between 1 KiB and ~1 MiB, and
    the SHA-256 of its body in a header; the body ends with an END line."""
    token = f"crash-{i:04d}-{os.urandom(4).hex()}"
    size = (1 << 10, 40 << 10, 300 << 10, 1 << 20)[i % 4]
    line = (token + " " + "z" * 90 + "\r\n").encode()
    body = line * (size // len(line)) + f"END {token}\r\n".encode()
    digest = hashlib.sha256(body).hexdigest()
    head = (f"From: load@sender.test\r\nTo: alice@example.test\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@crash.test>\r\nX-Body-SHA256: {digest}\r\n\r\n")
    return token, head.encode() + body


def check_integrity(box: Path) -> dict[str, int]:
    """Every message a reader can see is whole: size as in ,S=, parses,
    body matches its checksum and ends with its END line. Returns
    {token: copies}."""
    seen: dict[str, int] = {}
    for f in maildir_files(box):
        data = f.read_bytes()
        m = re.search(r",S=(\d+)", f.name)
        assert m, f.name
        assert len(data) == int(m.group(1)), f"{f.name}: {len(data)} bytes on disk"
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        token = msg["Subject"]
        assert token and token.startswith("crash-"), f.name
        assert not msg.defects, (f.name, msg.defects)
        body = data.split(b"\r\n\r\n", 1)[1]
        assert hashlib.sha256(body).hexdigest() == msg["X-Body-SHA256"], f"{f.name}: body corrupt"
        assert body.endswith(f"END {token}\r\n".encode()), f.name
        seen[token] = seen.get(token, 0) + 1
    return seen


def serve(data: Path, ports: Ports, pop3: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mailengine", "serve", "--data", str(data),
           "--smtp", f"{HOST}:{ports.mx}", "--pop3", f"{HOST}:{pop3}", "--allow-plain-auth",
           "--domain", "example.test", "--user", f"{USER}:{PASSWORD}", "--workers", "2",
           "--dns", "127.0.0.1:9", "--hostname", "mx.example.test"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"mailengine serve exited: {proc.wait()}")
        if "ready" in line:
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    proc.kill()
    raise TimeoutError("mailengine serve did not become ready")


class Sender(threading.Thread):
    """Sends the messages one by one on one connection; records the tokens
    answered 250. Stops at the first error (the kill)."""

    def __init__(self, port: int, msgs: list[tuple[str, bytes]]) -> None:
        super().__init__(daemon=True)
        self.port, self.msgs = port, msgs
        self.acked: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with smtplib.SMTP(HOST, self.port, timeout=10) as s:
                for token, m in self.msgs:
                    s.sendmail("load@sender.test", [USER], m)
                    self.acked.append(token)
        except (OSError, smtplib.SMTPException) as e:
            self.error = e


def test_sigkill_during_local_delivery_leaves_no_partial_message(tmp_path):
    data = tmp_path / "data"
    ports, pop3 = Ports(), free_port()
    box = data / "mailboxes" / "example.test" / "alice"
    msgs = [crash_message(i) for i in range(CRASH_MESSAGES)]
    proc = serve(data, ports, pop3)
    senders = [Sender(ports.mx, msgs[i::CRASH_SENDERS]) for i in range(CRASH_SENDERS)]
    writing_at_kill = False
    try:
        for t in senders:
            t.start()
        # Kill once some messages are in the mailbox, the senders are still
        # going, and preferably while a file is being written in tmp/.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and all(t.is_alive() for t in senders):
            visible = len(maildir_files(box))
            writing_at_kill = (box / "tmp").is_dir() and any((box / "tmp").iterdir())
            if visible >= 40 or (visible >= 5 and writing_at_kill):
                break
            time.sleep(0.001)
        alive_at_kill = all(t.is_alive() for t in senders)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    for t in senders:
        t.join(15)
        assert not t.is_alive()
    assert alive_at_kill, "a sender finished before the kill: the kill came too late"
    visible_at_kill = len(maildir_files(box))
    assert 0 < visible_at_kill < CRASH_MESSAGES
    acked = {tok for t in senders for tok in t.acked}
    assert acked, "no message was acknowledged before the kill"
    # Right after the kill: whatever a reader sees is whole.
    seen = check_integrity(box)
    tmp_left = sorted(f.stat().st_size for f in (box / "tmp").iterdir())
    assert set(seen) <= {t for t, _ in msgs}
    # Restart on the same data: every acknowledged message arrives.
    proc = serve(data, ports, pop3)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if acked <= set(check_integrity(box)):
                break
            time.sleep(0.1)
        seen = check_integrity(box)
        missing = acked - set(seen)
        assert not missing, f"{len(missing)} acknowledged message(s) never delivered: {sorted(missing)[:5]}"
        dups = {t: n for t, n in seen.items() if n > 1}
        # Readers see exactly new/ and cur/: POP3 and Python's mailbox agree with the listing.
        files = maildir_files(box)
        assert len(mailbox.Maildir(str(box), create=False)) == len(files)
        p = poplib.POP3(HOST, pop3, timeout=10)
        p.user(USER)
        p.pass_(PASSWORD)
        count, size = p.stat()
        assert count == len(files) and size == sum(f.stat().st_size for f in files)
        assert sorted(x.split()[1].decode() for x in p.uidl()[1]) == sorted(base_name(f) for f in files)
        p.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"acked {len(acked)} of {CRASH_MESSAGES}, visible at the kill {visible_at_kill} "
          f"(a file in tmp/ then: {writing_at_kill}), "
          f"tmp/ leftovers (bytes) {tmp_left}, delivered after restart {len(seen)} "
          f"(duplicates {sum(dups.values()) - len(dups)}: {sorted(dups)[:5]})")
