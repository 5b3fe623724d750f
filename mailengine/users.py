"""The user file: DATA/users, one ``address:hash`` line per user (the hash
formats of ``mailengine hash-password``), optionally followed by
``quota=BYTES`` and ``quota_messages=N``, kept by ``mailengine user
add|del|list|passwd`` and read at start in addition to ``Config.users``."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .config import User, parse_size
from .errors import ConfigError

FILE_NAME = "users"
_EXTRA = re.compile(r"quota(_messages)?=\S*")


def user_file(data_dir: str) -> Path:
    return Path(data_dir) / FILE_NAME


def load(data_dir: str) -> list[User]:
    """Users of DATA/users (none when it does not exist)."""
    path = user_file(data_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError("users", f"cannot read {path}: {e.strerror}") from None
    users = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        addr, sep, rest = line.partition(":")
        # The hash, then optional "quota=..." and "quota_messages=..." words
        # (a {PLAIN} hash may hold spaces itself).
        words = rest.split(" ")
        extra: list[str] = []
        while words and _EXTRA.fullmatch(words[-1]):
            extra.insert(0, words.pop())
        hashed = " ".join(words).strip()
        if not sep or "@" not in addr or not hashed:
            raise ConfigError("users", f"{path}:{n}: expected address:hash")
        u = User(addr.strip().lower(), hashed)
        for word in extra:
            key, _, value = word.partition("=")
            if key == "quota":
                u.quota = parse_size(value, f"users: {path}:{n}: quota")
            elif value.isdigit():
                u.quota_messages = int(value)
            else:
                raise ConfigError("users", f"{path}:{n}: quota_messages={value!r} is not a count")
        users.append(u)
    return users


def save(data_dir: str, users: list[User]) -> None:
    """Write the file whole: a temporary file, fsync, rename (mode 0600)."""
    path = user_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# mailengine users: address:hash (mailengine user add|del|passwd)\n")
            for u in sorted(users, key=lambda u: u.address):
                extra = (f" quota={parse_size(u.quota, 'quota')}" if u.quota else "") + \
                    (f" quota_messages={u.quota_messages}" if u.quota_messages else "")
                f.write(f"{u.address}:{u.password_hash}{extra}\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def set_password(data_dir: str, address: str, hashed: str, *, create: bool) -> bool:
    """Add (create) or change a user; False when add finds it there already
    or passwd does not find it."""
    address = address.strip().lower()
    users = load(data_dir)
    found = [u for u in users if u.address == address]
    if create == bool(found):
        return False
    old = found[0] if found else User(address, hashed)
    users = [u for u in users if u.address != address] + [
        User(address, hashed, old.quota, old.quota_messages)]
    save(data_dir, users)
    return True


def set_quota(data_dir: str, address: str, quota: int, quota_messages: int) -> bool:
    """Change a user's quota (0: unlimited); False when there is no such user."""
    if quota < 0 or quota_messages < 0:
        raise ConfigError("quota", "must not be negative")
    address = address.strip().lower()
    users = load(data_dir)
    found = False
    for u in users:
        if u.address == address:
            u.quota, u.quota_messages, found = quota, quota_messages, True
    if found:
        save(data_dir, users)
    return found


def delete(data_dir: str, address: str) -> bool:
    address = address.strip().lower()
    users = load(data_dir)
    left = [u for u in users if u.address != address]
    if len(left) == len(users):
        return False
    save(data_dir, left)
    return True
