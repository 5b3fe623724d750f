"""Build and run every C unit test in tests/c/.

Each tests/c/test_*.c starts with two comment lines naming what it links:

    /* sources: csrc/smtp/parse.c */
    /* libs: -lssl -lcrypto */

The compiler comes from $CC (default cc); $CFLAGS, $LDFLAGS and $SAN_FLAGS
are appended, so a sanitizer build reuses this driver, e.g.
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all".
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
C_TESTS = sorted((REPO / "tests" / "c").glob("test_*.c"))

BASE_FLAGS = ["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-Icsrc"]
HEADER_RE = {
    "sources": re.compile(r"^/\*\s*sources:(.*?)\*/\s*$"),
    "libs": re.compile(r"^/\*\s*libs:(.*?)\*/\s*$"),
}
SUMMARY_RE = re.compile(r"^(\d+) passed, (\d+) failed$")
RUN_TIMEOUT = 600


def read_header(path: Path) -> tuple[list[str], list[str]]:
    """The sources and libs named by the first two lines of a C test."""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = [f.readline().rstrip("\n") for _ in range(2)]
    found = {}
    for key, line in zip(("sources", "libs"), first):
        m = HEADER_RE[key].match(line.strip())
        if not m:
            pytest.fail(
                f"{path.relative_to(REPO)}: line {len(found) + 1} must be "
                f"'/* {key}: ... */', found {line!r}"
            )
        found[key] = shlex.split(m.group(1))
    return found["sources"], found["libs"]


def env_flags(name: str) -> list[str]:
    return shlex.split(os.environ.get(name, ""))


def output_of(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"


def build_c(source: Path, exe: Path) -> None:
    """Compile and link one C program of tests/c/ as its header says, with
    $CC, $CFLAGS, $LDFLAGS and $SAN_FLAGS (once serves both steps)."""
    sources, libs = read_header(source)
    san = env_flags("SAN_FLAGS")
    cmd = (
        shlex.split(os.environ.get("CC", "cc"))
        + BASE_FLAGS
        + env_flags("CFLAGS")
        + san
        + sources
        + [str(source.relative_to(REPO)), "-o", str(exe)]
        + libs
        + env_flags("LDFLAGS")
        + san
    )
    build = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"build failed: {shlex.join(cmd)}\n{output_of(build)}")


@pytest.mark.parametrize("test_file", C_TESTS, ids=[p.stem for p in C_TESTS])
def test_c_unit(test_file: Path, tmp_path: Path) -> None:
    sources, libs = read_header(test_file)
    for src in sources:
        if not (REPO / src).is_file():
            pytest.fail(f"{test_file.relative_to(REPO)}: source {src} does not exist")

    exe = tmp_path / test_file.stem
    build_c(test_file, exe)

    try:
        run = subprocess.run(
            [str(exe)], cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{exe.name} ran longer than {RUN_TIMEOUT}s\n{e.stdout!r}\n{e.stderr!r}")
    lines = run.stdout.strip().splitlines()
    summary = SUMMARY_RE.match(lines[-1]) if lines else None
    assert run.returncode == 0, f"{exe.name} exited {run.returncode}\n{output_of(run)}"
    assert summary, f"{exe.name} did not end with 'N passed, M failed'\n{output_of(run)}"
    assert int(summary.group(2)) == 0, output_of(run)
