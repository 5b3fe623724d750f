"""Delivery Status Notifications from csrc/queue/dsn.c read by another parser.

tests/c/dsn_dump.c is compiled the way tests/test_c_units.py compiles the C
unit tests (honouring $CC, $CFLAGS, $LDFLAGS and $SAN_FLAGS); it builds a
report for a fixed scenario around an original message given on stdin.
Python's `email` package then parses each report: the multipart/report
structure (RFC 6522), the delivery-status fields (RFC 3464), the returned
original, and the line rules of RFC 5322 §2.1.1.
"""

from __future__ import annotations

import email
import email.policy
import re
import subprocess
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from test_c_units import REPO, build_c

TOOL_SRC = REPO / "tests" / "c" / "dsn_dump.c"

HEADER = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@dest.test, carol@nowhere.test\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Date: Sat, 1 Jun 2024 11:00:00 +0000\r\n"
    b"Message-ID: <m1.lunch@example.test>\r\n"
)
BODY = b"Shall we meet at noon?\r\n\r\n-- \r\nAlice\r\n"
ORIGINAL = HEADER + b"\r\n" + BODY


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("dsn_dump") / "dsn_dump"
    build_c(TOOL_SRC, exe)
    return exe


def dump(tool: Path, scenario: str, original: bytes = ORIGINAL, max_return: int | None = None) -> bytes:
    args = [str(tool), scenario] + ([str(max_return)] if max_return is not None else [])
    run = subprocess.run(args, input=original, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return run.stdout


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def assert_lines(raw: bytes) -> None:
    """Every line ends with CRLF and holds at most 998 octets; no bare CR or LF."""
    assert raw.endswith(b"\r\n")
    for n, line in enumerate(raw[:-2].split(b"\r\n"), 1):
        assert b"\n" not in line and b"\r" not in line, f"line {n}: bare CR or LF: {line[:80]!r}"
        assert len(line) <= 998, f"line {n}: {len(line)} octets"


def boundary_of(msg: EmailMessage) -> bytes:
    b = msg.get_boundary()
    assert b
    return b.encode()


def raw_part(raw: bytes, boundary: bytes, index: int) -> tuple[bytes, bytes]:
    """Part `index` cut straight out of the bytes: (header, content). The CRLF
    before a delimiter belongs to the delimiter (RFC 2046 §5.1.1)."""
    delim = b"\r\n--" + boundary
    pieces = raw.split(delim)
    # pieces[0] is header + preamble, the last one is "--\r\n" after the close
    assert pieces[-1] == b"--\r\n", pieces[-1][:40]
    part = pieces[1 + index]
    assert part.startswith(b"\r\n")
    head, _, content = part[2:].partition(b"\r\n\r\n")
    return head + b"\r\n", content


def prose(part: EmailMessage) -> str:
    """The text part with its line breaks undone, for phrases that wrap."""
    return " ".join(part.get_content().split())


def status_blocks(part: EmailMessage) -> list[EmailMessage]:
    """message/delivery-status as email parses it: one sub-message per block."""
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_failure_report(tool: Path) -> None:
    raw = dump(tool, "failed")
    assert_lines(raw)
    msg = parse(raw)

    assert msg.is_multipart()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.example.test"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<6b04822b0000000001.1@mail.example.test>"
    assert msg["Date"].datetime == parsedate_to_datetime("Sat, 01 Jun 2024 12:00:00 +0000")

    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]

    text = parts[0].get_content()
    assert parts[0].get_content_charset() == "us-ascii"
    assert "<bob@dest.test>: delivery failed (status 5.1.1)" in text
    assert "550 5.1.1 Please check the address: <bob@dest.test>" in text
    assert "mx1.dest.test" in text and "6b04822b0000000001" in text
    assert all(len(line) <= 78 for line in text.splitlines())

    per_msg, bob, carol = status_blocks(parts[1])
    assert per_msg["Reporting-MTA"] == "dns; mail.example.test"
    assert per_msg["Original-Envelope-Id"] == "QQ+314159"   # ENVID decoded (RFC 3461 §6.3)
    assert parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == 1717243200 - 3600
    assert bob["Original-Recipient"] == "rfc822; bob@dest.test"
    assert bob["Final-Recipient"] == "rfc822; bob@dest.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.dest.test"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550-5.1.1 The email account that you tried to reach does not exist. "
        "550 5.1.1 Please check the address: <bob@dest.test>")
    assert parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == 1717243200 - 60
    assert bob["Will-Retry-Until"] is None
    assert carol["Final-Recipient"] == "rfc822; carol@nowhere.test"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-mailengine; No mail server for nowhere.test (null MX)"
    assert carol["Original-Recipient"] is None

    # The original, byte for byte where it sits, and as email reads it.
    head, content = raw_part(raw, boundary_of(msg), 2)
    assert head == b"Content-Type: message/rfc822\r\nContent-Description: Undelivered message\r\n"
    assert content == ORIGINAL
    inner = parts[2].get_payload()[0]
    assert inner["Message-ID"] == "<m1.lunch@example.test>"
    assert inner["Subject"] == "Lunch on Friday"
    assert inner.get_content() == BODY.decode()


def test_ret_hdrs_returns_the_header_only(tool: Path) -> None:
    raw = dump(tool, "hdrs")
    assert_lines(raw)
    msg = parse(raw)
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    head, content = raw_part(raw, boundary_of(msg), 2)
    assert content == HEADER
    assert b"Shall we meet" not in raw
    assert parts[2].get_content() == HEADER.decode()
    assert "you asked for the header only" in prose(parts[0])


def test_max_return(tool: Path) -> None:
    raw = dump(tool, "failed", max_return=len(ORIGINAL))
    assert parse(raw).get_payload()[2].get_content_type() == "message/rfc822"

    raw = dump(tool, "failed", max_return=len(ORIGINAL) - 1)
    assert_lines(raw)
    msg = parse(raw)
    parts = msg.get_payload()
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert raw_part(raw, boundary_of(msg), 2)[1] == HEADER
    assert f"larger than the {len(ORIGINAL) - 1} bytes" in prose(parts[0])

    raw = dump(tool, "failed", max_return=20)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.get_payload()] == ["text/plain", "message/delivery-status"]


def test_delay_notice(tool: Path) -> None:
    raw = dump(tool, "delayed")
    assert_lines(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    parts = msg.get_payload()
    assert parts[2].get_content_type() == "text/rfc822-headers"   # never the whole message
    _, bob = status_blocks(parts[1])
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.4.1"
    assert bob["Diagnostic-Code"] == "smtp; 421 4.4.1 Connection timed out"
    until = parsedate_to_datetime(bob["Will-Retry-Until"])
    assert until.timestamp() == 1717243200 + 4 * 86400
    assert "still queued" in prose(parts[0])


def test_success_report(tool: Path) -> None:
    raw = dump(tool, "delivered")
    assert_lines(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    parts = msg.get_payload()
    _, bob = status_blocks(parts[1])
    assert (bob["Action"], bob["Status"]) == ("delivered", "2.0.0")
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_mixed_actions(tool: Path) -> None:
    raw = dump(tool, "mixed")
    assert_lines(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(msg.get_payload()[1])
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "relayed"]
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@dest.test", "rfc822; dave@slow.test", "rfc822; erin@fine.test"]
    assert blocks[2]["Will-Retry-Until"] is not None
    assert blocks[1]["Will-Retry-Until"] is None and blocks[3]["Will-Retry-Until"] is None


def test_long_diagnostic_is_folded(tool: Path) -> None:
    raw = dump(tool, "longdiag")
    assert_lines(raw)
    msg = parse(raw)
    _, bob = status_blocks(msg.get_payload()[1])
    diag = str(bob["Diagnostic-Code"])
    assert diag.startswith("smtp; 550 5.7.1 abcdefghij")
    assert "word0 word1 word2" in diag and diag.endswith("word58 word59")
    # the 5000-letter word comes back whole but for the blanks of its cuts
    letters = re.sub(r"\s", "", diag[len("smtp; 550 5.7.1 "):diag.index("word0")])
    assert letters == "".join(chr(ord("a") + i % 26) for i in range(5000))
    # folded before blanks: the word lines stay within 78 columns
    block = raw[raw.index(b"Diagnostic-Code:"):]
    block = block[:block.index(b"\r\nLast-Attempt-Date")]
    for line in block.split(b"\r\n"):
        if b"word" in line:
            assert len(line) <= 78, line


def test_boundary_collision(tool: Path) -> None:
    original = HEADER + b"\r\n--=_6b04822b0000000001.1\r\nlooks like a delimiter\r\n" \
        b"--=_6b04822b0000000001.1--\r\n"
    raw = dump(tool, "failed", original)
    assert_lines(raw)
    msg = parse(raw)
    b = boundary_of(msg)
    assert b != b"=_6b04822b0000000001.1"
    assert raw.count(b"--" + b) == 4          # three delimiters and the close
    assert len(msg.get_payload()) == 3
    assert raw_part(raw, b, 2)[1] == original


def test_utf8_report(tool: Path) -> None:
    raw = dump(tool, "utf8")
    assert_lines(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/global-delivery-status", "message/rfc822"]
    assert parts[0].get_content_charset() == "utf-8"
    assert "<jörg@dést.test>: delivery failed" in parts[0].get_content()
    # email has no parser for message/global-delivery-status: read the blocks
    # from the bytes (RFC 6533: UTF-8 fields, "utf-8" address type)
    _, content = raw_part(raw, boundary_of(msg), 1)
    blocks = [email.message_from_bytes(blk + b"\r\n", policy=email.policy.default)
              for blk in content.rstrip(b"\r\n").split(b"\r\n\r\n")]
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.test"
    assert blocks[1]["Final-Recipient"] == "utf-8; jörg@dést.test"
    assert blocks[1]["Original-Recipient"] == "utf-8; jörg@dést.test"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 <jörg@dést.test>: unbekannt"
    assert raw_part(raw, boundary_of(msg), 2)[1] == ORIGINAL


def test_eight_bit_originals(tool: Path) -> None:
    body8 = HEADER + b"\r\nGr\xc3\xbc\xc3\x9fe aus M\xc3\xbcnchen\r\n"
    raw = dump(tool, "failed", body8)
    assert_lines(raw)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    part = msg.get_payload()[2]
    assert (part.get_content_type(), part["Content-Transfer-Encoding"]) == ("message/rfc822", "8bit")
    assert raw_part(raw, boundary_of(msg), 2)[1] == body8

    hdr8 = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n" + HEADER + b"\r\n" + BODY
    raw = dump(tool, "failed", hdr8)
    msg = parse(raw)
    assert msg.get_payload()[2].get_content_type() == "message/global"   # RFC 6532 §3.7
    assert raw_part(raw, boundary_of(msg), 2)[1] == hdr8
    raw = dump(tool, "hdrs", hdr8)
    msg = parse(raw)
    assert msg.get_payload()[2].get_content_type() == "message/global-headers"  # RFC 6533


def test_unreturnable_original(tool: Path) -> None:
    long_line = HEADER + b"\r\n" + b"x" * 1500 + b"\r\n"
    raw = dump(tool, "failed", long_line)
    assert_lines(raw)        # the 1500-octet line is not in the report
    msg = parse(raw)
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert raw_part(raw, boundary_of(msg), 2)[1] == HEADER

    bare_lf = HEADER.replace(b"\r\n", b"\n") + b"\nbody\n"
    raw = dump(tool, "failed", bare_lf)
    assert_lines(raw)
    msg = parse(raw)
    assert len(msg.get_payload()) == 2
    assert "not attached" in prose(msg.get_payload()[0])
