"""Build mailengine._core from csrc/ (liburing, OpenSSL, libcrypt)."""
import os
from glob import glob

from setuptools import Extension, setup

sources = sorted(
    f for f in glob("csrc/**/*.c", recursive=True) if not f.startswith("csrc/fuzz/")
)
extra_compile = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror",
                 "-Wno-missing-field-initializers", "-fvisibility=hidden"]
extra_link = []
san = os.environ.get("SAN_FLAGS", "")
if san:
    extra_compile += san.split() + ["-O1", "-fno-omit-frame-pointer"]
    extra_link += san.split()
else:
    extra_compile += ["-O2"]

setup(
    ext_modules=[
        Extension(
            "mailengine._core",
            sources=sources,
            include_dirs=["csrc"],
            libraries=["uring", "ssl", "crypto", "crypt", "pthread"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ],
)
