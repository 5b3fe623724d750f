"""The user file: DATA/users, one ``address:hash`` line per user (the hash
formats of ``mailengine hash-password``), kept by ``mailengine user
add|del|list|passwd`` and read at start in addition to ``Config.users``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import User
from .errors import ConfigError

FILE_NAME = "users"


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
        addr, sep, hashed = line.partition(":")
        if not sep or "@" not in addr or not hashed:
            raise ConfigError("users", f"{path}:{n}: expected address:hash")
        users.append(User(addr.strip().lower(), hashed.strip()))
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
                f.write(f"{u.address}:{u.password_hash}\n")
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
    users = [u for u in users if u.address != address] + [User(address, hashed)]
    save(data_dir, users)
    return True


def delete(data_dir: str, address: str) -> bool:
    address = address.strip().lower()
    users = load(data_dir)
    left = [u for u in users if u.address != address]
    if len(left) == len(users):
        return False
    save(data_dir, left)
    return True
