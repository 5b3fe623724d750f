"""DKIM signatures from csrc/smtp/dkim.c checked by another implementation.

tests/c/dkim_sign_tool.c is compiled the way tests/test_c_units.py compiles
the C unit tests (honouring $CC, $CFLAGS, $LDFLAGS and $SAN_FLAGS), keys are
made with `openssl genpkey`, and dkimpy verifies every signed message with a
DNS lookup answered from the generated keys. Tampered messages must fail, so
a signer that got everything wrong cannot pass.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import dkim
except ImportError as e:  # a missing verifier must fail the run, not skip it
    dkim = None
    DKIM_IMPORT_ERROR: ImportError | None = e
else:
    DKIM_IMPORT_ERROR = None

from test_c_units import REPO, build_c

TOOL_SRC = REPO / "tests" / "c" / "dkim_sign_tool.c"
DOMAIN = "example.com"


@pytest.fixture(scope="module", autouse=True)
def need_dkimpy() -> None:
    if dkim is None:
        pytest.fail(f"dkimpy is required for these tests (pip install dkimpy pynacl): {DKIM_IMPORT_ERROR}")
    try:
        import nacl.signing  # noqa: F401  dkimpy verifies ed25519 with it
    except ImportError as e:
        pytest.fail(f"pynacl is required for ed25519 verification (pip install pynacl): {e}")


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("dkim_tool") / "dkim_sign_tool"
    build_c(TOOL_SRC, exe)
    return exe


@dataclass
class Key:
    kind: str  # "rsa" or "ed25519"
    path: Path
    selector: str
    record: bytes  # the TXT record built here from openssl's output


def make_key(directory: Path, kind: str, selector: str) -> Key:
    path = directory / f"{selector}.pem"
    if kind == "rsa":
        args = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    else:
        args = ["-algorithm", "ED25519"]
    subprocess.run(["openssl", "genpkey", *args, "-out", str(path)], check=True, capture_output=True)
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
        check=True, capture_output=True,
    ).stdout
    if kind == "rsa":
        p = base64.b64encode(der)  # SubjectPublicKeyInfo
    else:
        # RFC 8463 §4.2: the bare key, which ends the 44-byte SubjectPublicKeyInfo.
        assert len(der) == 44
        p = base64.b64encode(der[-32:])
    return Key(kind, path, selector, b"v=DKIM1; k=" + kind.encode() + b"; p=" + p)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    d = tmp_path_factory.mktemp("dkim_keys")
    return {"rsa": make_key(d, "rsa", "rsa2048"), "ed25519": make_key(d, "ed25519", "ed1")}


def dns_for(*ks: Key):
    records = {f"{k.selector}._domainkey.{DOMAIN}.".encode(): k.record for k in ks}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


def sign(tool: Path, key: Key, msg: bytes, tmp_path: Path, *extra: str) -> bytes:
    f = tmp_path / "message.eml"
    f.write_bytes(msg)
    run = subprocess.run(
        [str(tool), "sign", str(key.path), DOMAIN, key.selector, str(f), *extra],
        capture_output=True,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout.endswith(msg)
    return run.stdout


def verifies(signed: bytes, key: Key) -> bool:
    try:
        return bool(dkim.verify(signed, dnsfunc=dns_for(key)))
    except dkim.MessageFormatError:  # dkimpy raises for some tampered header sections
        return False


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


MESSAGES = {
    "plain": crlf(
        "From: Joe SixPack <joe@example.com>\n"
        "To: Suzie Q <suzie@shopping.example.net>\n"
        "Subject: Is dinner ready?\n"
        "Date: Fri, 11 Jul 2003 21:00:37 -0700\n"
        "Message-ID: <20030712040037.46341.5F8J@example.com>\n"
        "\n"
        "Hi.\n"
        "\n"
        "We lost the game.  Are you hungry yet?\n"
        "\n"
        "Joe.\n"
    ),
    "folded": crlf(
        "From: \"A  Person\"\n <a@example.com>\n"
        "To: one@example.net,\n\ttwo@example.net,\n   three@example.net\n"
        "Subject: a subject \t that is\n  folded  over\n\tthree lines   \n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/alternative;\n boundary=\"b1\"\n"
        "List-Unsubscribe: <https://example.com/u?x=1>,\n <mailto:u@example.com>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        "\n"
        "--b1\n"
        "Content-Type: text/plain\n"
        "\n"
        "text   with \t runs\n"
        "--b1--\n"
    ),
    "repeated": crlf(
        "Received: from a.example.net by mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\n"
        "To: first@example.net\n"
        "Received: from b.example.net by a.example.net; Mon, 1 Jan 2024 00:00:00 +0000\n"
        "From: someone@example.com\n"
        "CC: c1@example.net\n"
        "To: second@example.net\n"
        "cc: c2@example.net\n"
        "Comments: one\n"
        "Comments: two\n"
        "SUBJECT: case and repeats\n"
        "\n"
        "body\n"
    ),
    "trailing_blank_lines": crlf(
        "From: a@example.com\n"
        "Subject: blank lines\n"
        "\n"
        "first  line   \n"
        "\n"
        "  \n"
        "last line\t\n"
        "\n"
        "\n"
        "   \n"
        "\t\n"
        "\n"
    ),
    "eight_bit": (
        "From: Jos\u00e9 <jose@example.com>\r\n"
        "Subject: caf\u00e9 \u00fcber \u65e5\u672c\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Gr\u00fc\u00dfe   aus K\u00f6ln \u2014 \u65e5\u672c\u8a9e\r\n"
    ).encode("utf-8") + b"raw \xff\xfe\x80 bytes\r\n",
    "no_body": crlf("From: a@example.com\nTo: b@example.net\nSubject: headers only\n\n"),
    "header_only_no_blank_line": crlf("From: a@example.com\nSubject: no separator\n"),
    "no_final_crlf": crlf("From: a@example.com\nSubject: s\n\nlast line") ,
    "long_lines": crlf(
        "From: a@example.com\n"
        "Subject: " + "word " * 200 + "\n"
        "References: " + " ".join(f"<id{i}@example.com>" for i in range(60)) + "\n"
        "\n" + ("x" * 990 + "\n") * 3
    ),
}


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_signed_message_verifies(tool: Path, keys: dict[str, Key], tmp_path: Path,
                                 kind: str, name: str) -> None:
    key = keys[kind]
    msg = MESSAGES[name]
    signed = sign(tool, key, msg, tmp_path)
    assert verifies(signed, key), signed[: len(signed) - len(msg)].decode()

    header = signed[: len(signed) - len(msg)]
    assert header.startswith(b"DKIM-Signature: v=1; a=" +
                             (b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256"))
    lines = header[:-2].split(b"\r\n")
    assert all(len(line) <= 78 for line in lines), header
    assert all(line.startswith(b"\t") for line in lines[1:]), header
    assert b"\n" not in header.replace(b"\r\n", b"")

    # A verifier that says yes to everything would pass the above.
    assert not verifies(signed + b"tampered\r\n", key)
    assert not verifies(signed.replace(b"@example.com", b"@examp1e.com", 1), key)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_modified_body_or_header_fails(tool: Path, keys: dict[str, Key], tmp_path: Path,
                                       kind: str) -> None:
    key = keys[kind]
    msg = MESSAGES["plain"]
    signed = sign(tool, key, msg, tmp_path)
    assert verifies(signed, key)

    # Body: one letter, an added line, a removed line.
    assert not verifies(signed.replace(b"hungry", b"Hungry"), key)
    assert not verifies(signed.replace(b"Joe.\r\n", b"Joe.\r\nP.S.\r\n"), key)
    assert not verifies(signed.replace(b"Hi.\r\n\r\n", b""), key)
    # Signed headers.
    assert not verifies(signed.replace(b"dinner", b"lunch"), key)
    assert not verifies(signed.replace(b"Date: Fri, 11", b"Date: Fri, 12"), key)
    assert not verifies(signed.replace(b"suzie@", b"susie@"), key)
    # A second From or Subject: below the signed one it is what a verifier
    # picks (bottom-up), above it only oversigning catches it.
    assert not verifies(signed.replace(b"\r\n\r\nHi.", b"\r\nSubject: Free money\r\n\r\nHi."), key)
    assert not verifies(signed.replace(b"\r\nFrom: Joe", b"\r\nSubject: Free money\r\nFrom: Joe"), key)
    assert not verifies(signed.replace(b"\r\nFrom: Joe", b"\r\nFrom: evil@example.org\r\nFrom: Joe"), key)
    # To is signed but not oversigned: one added above passes, as it should.
    assert verifies(signed.replace(b"\r\nFrom: Joe", b"\r\nTo: extra@example.org\r\nFrom: Joe"), key)
    # The signature field itself.
    assert not verifies(signed.replace(b"d=example.com", b"d=example.org", 1), key)
    # What relaxed canonicalization forgives.
    assert verifies(signed.replace(b"Subject: Is dinner", b"subject:   Is \t dinner"), key)
    assert verifies(signed.replace(b"game.  Are", b"game. \t Are"), key)
    assert verifies(signed + b"\r\n\r\n", key)
    assert verifies(signed.replace(b"\r\n\r\nHi.", b"\r\nX-Added: unsigned\r\n\r\nHi."), key)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_repeated_headers_signed_bottom_up(tool: Path, keys: dict[str, Key], tmp_path: Path,
                                           kind: str) -> None:
    key = keys[kind]
    msg = MESSAGES["repeated"]
    signed = sign(tool, key, msg, tmp_path, "--headers", "From,To,Cc,Subject,Comments",
                  "--oversign", "From,Subject,Comments")
    header = signed[: len(signed) - len(msg)].decode()
    h = re.search(r"h=([^;]*);", header.replace("\r\n\t", "")).group(1)
    assert h == "From:From:To:To:Cc:Cc:Subject:Subject:Comments:Comments:Comments"
    assert verifies(signed, key), header
    # Swapping the two To fields changes what each h= entry picks.
    swapped = signed.replace(b"first@example.net", b"XXXX").replace(
        b"second@example.net", b"first@example.net").replace(b"XXXX", b"second@example.net")
    assert not verifies(swapped, key)
    # A third instance at the bottom is picked first and fails for any name.
    assert not verifies(signed.replace(b"\r\n\r\nbody", b"\r\nTo: third@example.net\r\n\r\nbody"), key)
    # At the top, only the oversigned Comments catches it.
    top = b"\r\nReceived: from a.example.net"
    assert not verifies(signed.replace(top, b"\r\nComments: three" + top), key)
    assert verifies(signed.replace(top, b"\r\nTo: third@example.net" + top), key)


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_timestamp_and_expiry(tool: Path, keys: dict[str, Key], tmp_path: Path, kind: str) -> None:
    key = keys[kind]
    msg = MESSAGES["plain"]
    now = int(time.time())
    signed = sign(tool, key, msg, tmp_path, "--timestamp", "--expire", "3600", "--now", str(now))
    flat = signed[: len(signed) - len(msg)].replace(b"\r\n\t", b" ")
    assert f" t={now}; x={now + 3600};".encode() in flat
    assert verifies(signed, key)
    # Signed two days ago with a one-hour lifetime: expired, beyond the ten
    # hours of clock slop dkimpy allows.
    old = sign(tool, key, msg, tmp_path, "--timestamp", "--expire", "3600",
               "--now", str(now - 2 * 86400))
    assert not verifies(old, key)


def test_dns_record_matches_openssl(tool: Path, keys: dict[str, Key]) -> None:
    for key in keys.values():
        out = subprocess.run([str(tool), "dns", str(key.path)], capture_output=True, check=True)
        assert out.stdout.strip() == key.record


def test_both_signatures_on_one_message(tool: Path, keys: dict[str, Key], tmp_path: Path) -> None:
    """An RSA and an Ed25519 signature side by side, as RFC 8463 §6 suggests."""
    msg = MESSAGES["folded"]
    once = sign(tool, keys["rsa"], msg, tmp_path)
    twice = sign(tool, keys["ed25519"], once, tmp_path)
    d = dkim.DKIM(twice)
    lookup = dns_for(keys["rsa"], keys["ed25519"])
    assert d.verify(idx=0, dnsfunc=lookup)  # ed25519, the top field
    assert d.verify(idx=1, dnsfunc=lookup)  # rsa


def test_rsa_1024_key(tool: Path, tmp_path: Path) -> None:
    path = tmp_path / "rsa1024.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024",
                    "-out", str(path)], check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    key = Key("rsa", path, "small", b"v=DKIM1; k=rsa; p=" + base64.b64encode(der))
    assert verifies(sign(tool, key, MESSAGES["plain"], tmp_path), key)


def test_key_errors_reach_the_user(tool: Path, tmp_path: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(MESSAGES["plain"])
    ec = tmp_path / "ec.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(ec)], check=True, capture_output=True)
    bad = {
        tmp_path / "missing.pem": "No such file",
        ec: "EC key type cannot sign",
        msg: "no PEM private key found",
    }
    for path, want in bad.items():
        run = subprocess.run([str(tool), "sign", str(path), DOMAIN, "s", str(msg)],
                             capture_output=True, text=True)
        assert run.returncode == 1 and want in run.stderr and str(path) in run.stderr, run.stderr


def test_large_body(tool: Path, keys: dict[str, Key], tmp_path: Path) -> None:
    line = b"The quick brown fox jumps over the lazy dog,  twice\t over.  \r\n"
    msg = crlf("From: a@example.com\nSubject: big\n\n") + line * 80000  # about 5 MB
    key = keys["ed25519"]
    signed = sign(tool, key, msg, tmp_path)
    assert verifies(signed, key)
    assert not verifies(signed[:-3] + b"X\r\n", key)
