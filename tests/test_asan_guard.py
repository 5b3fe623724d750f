"""`make test-asan` must really run the sanitized extension."""
import subprocess

import pytest

import mailengine._core
from conftest import ASAN


def test_sanitized_extension_is_loaded():
    if not ASAN:
        pytest.skip("not an ASan run")
    out = subprocess.run(["ldd", mailengine._core.__file__], capture_output=True, text=True).stdout
    assert "libasan" in out and "libubsan" in out
