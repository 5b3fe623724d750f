"""Configuration: dataclasses, a TOML file, or both (flags override the file).

Everything is checked in ``Config.validate()`` before any port is opened, and
a bad setting raises ``ConfigError`` naming its key.
"""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

LISTENER_KINDS = ("mx", "submission", "smtps", "pop3", "pop3s")
LOG_LEVELS = {"error": 0, "warning": 1, "info": 2, "debug": 3}
LOOPBACK = ["127.0.0.0/8", "::1/128"]


@dataclass
class Listener:
    """One listening socket: ``mx`` (port 25 role, no AUTH), ``submission``
    (AUTH required, STARTTLS), ``smtps`` (implicit TLS submission), ``pop3``
    (POP3 with STLS) or ``pop3s`` (implicit-TLS POP3)."""

    kind: str = "mx"
    host: str = "127.0.0.1"
    port: int = 25
    name: str | None = None


@dataclass
class Limits:
    """Every protocol limit, by name. Sizes in octets, times in seconds."""

    max_command_line: int = 2048          # RFC 5321 4.5.3.1.4 (512) plus extension room
    max_text_line: int = 65536            # RFC says 1000; real mail is longer
    max_message_size: int = 26214400      # SIZE, 25 MiB
    max_recipients: int = 1000            # per transaction; more get 452 4.5.3
    max_errors: int = 20                  # then 421 and close
    max_auth_failures: int = 3            # then 421 and close
    auth_fail_delay: float = 1.0          # seconds, times the failure count
    command_timeout: float = 300.0        # RFC 5321 4.5.3.2.7
    data_timeout: float = 600.0
    session_timeout: float = 3600.0
    pop3_idle_timeout: float = 600.0      # RFC 1939 3: autologout after at least 10 minutes
    max_connections: int = 10000
    max_connections_per_ip: int = 50      # trusted networks are exempt


@dataclass
class User:
    """A mailbox user. ``password_hash`` is "$pbkdf2-sha256$...", "{SHA512-CRYPT}$6$..."."""

    address: str
    password_hash: str
    quota: int | str = 0                  # mailbox bytes ("500M", "2G" too); 0: unlimited
    quota_messages: int = 0               # messages; 0: unlimited


@dataclass
class Policy:
    """How mail to one destination (a domain, or the relay) is sent.
    Rates are messages per second/minute/hour (None: no limit)."""

    max_connections: int = 20             # Postfix: default_destination_concurrency_limit
    max_messages_per_connection: int = 1000
    max_recipients: int = 50              # per transaction (smtp_destination_recipient_limit)
    rate_per_second: float | None = None
    rate_per_minute: float | None = None
    rate_per_hour: float | None = None
    tls: str = "may"                      # none | may (STARTTLS when offered) | required
    tls_verify: bool = False              # check the certificate against the MX host name
    tls_ca_file: str | None = None        # None: the system store (when verifying)
    pool: str | None = None               # source pool for messages that name none


@dataclass
class Relay:
    """A smarthost: every remote recipient goes through it."""

    host: str
    port: int = 587
    user: str | None = None
    password: str | None = None
    tls: str = "starttls"                 # none | may | starttls (required) | implicit (port 465)
    tls_verify: bool = True
    tls_ca_file: str | None = None


@dataclass
class DkimKey:
    """Sign mail whose From: domain is ``domain`` (or a subdomain)."""

    domain: str
    selector: str
    key_file: str
    headers: list[str] | None = None      # None: From, To, Subject, Date, Message-ID, ...


POLICY_TLS = ("none", "may", "required")
_BAD_ALIAS = re.compile(r"[\s<>,;:\x00-\x1f\x7f]")
RELAY_TLS = ("none", "may", "starttls", "implicit")


@dataclass
class Config:
    data_dir: str = "./mail-data"
    hostname: str = field(default_factory=socket.gethostname)
    listeners: list[Listener] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    trusted_networks: list[str] = field(default_factory=lambda: list(LOOPBACK))
    tls_cert: str | None = None           # None: a self-signed one in data_dir/tls/
    tls_key: str | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    allow_plain_auth: bool = False        # AUTH without TLS (538 5.7.11 otherwise)
    reject_unknown_local: bool = True     # 550 5.1.1 for unknown users of local domains
    # address -> addresses; "@domain" -> catch-all address(es) or "@otherdomain" (domain alias)
    aliases: dict[str, list[str] | str] = field(default_factory=dict)
    log_level: str = "warning"
    limits: Limits = field(default_factory=Limits)
    # -- local delivery --
    local_delivery: bool = True           # mail for local domains goes into the Maildir store
    mail_dir: str | None = None           # store root (None: data_dir/mailboxes); ROOT/domain/user/
    # -- outbound delivery (times in seconds) --
    delivery_enabled: bool = True         # False: queue only, nothing leaves
    dns: str | None = None                # "HOST:PORT[,HOST:PORT]"; None: /etc/resolv.conf
    remote_port: int = 25                 # port of MX hosts
    relay: Relay | None = None
    default_policy: Policy = field(default_factory=Policy)
    destinations: dict[str, Policy] = field(default_factory=dict)
    source_pools: dict[str, list[str]] = field(default_factory=dict)
    dkim: list[DkimKey] = field(default_factory=list)
    retry_min: float = 300.0              # Postfix: minimal_backoff_time
    retry_max: float = 4000.0             # Postfix: maximal_backoff_time
    queue_lifetime: float = 5 * 86400.0   # Postfix: maximal_queue_lifetime
    delay_warning: float | None = None    # send a delay notice after this long (None: never)
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    connection_idle_time: float = 2.0     # keep an idle outbound connection this long
    bounce_max_return: int = 1 << 20      # bytes of the original returned in a bounce

    # -- building ---------------------------------------------------------

    @classmethod
    def embedded_default(cls, data_dir: str = "./mail-data") -> tuple["Config", str]:
        """The configuration ``make serve`` starts: localhost ports 2525 (MX),
        2587 (submission), 2465 (SMTPS), 2110 (POP3) and 2995 (POP3S), domains localhost and
        example.test, and a demo user whose password is returned."""
        password = secrets.token_urlsafe(12)
        cfg = cls(
            data_dir=data_dir,
            hostname="localhost",
            listeners=[
                Listener("mx", "127.0.0.1", 2525),
                Listener("submission", "127.0.0.1", 2587),
                Listener("smtps", "127.0.0.1", 2465),
                Listener("pop3", "127.0.0.1", 2110),
                Listener("pop3s", "127.0.0.1", 2995),
            ],
            domains=["localhost", "example.test"],
        )
        cfg.add_user("demo@example.test", password)
        return cfg, password

    def add_user(self, address: str, password: str, *, rounds: int = 0,
                 quota: int | str = 0, quota_messages: int = 0) -> None:
        """Add a user with a password, stored salted and slowly hashed."""
        from . import _core

        self.users.append(User(address, _core.hash_password(password, rounds), quota, quota_messages))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "Config":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(key, "unknown setting")
        kw = dict(data)
        if "listeners" in kw:
            kw["listeners"] = [_listener(i, item) for i, item in enumerate(kw["listeners"])]
        if "users" in kw:
            kw["users"] = [_user(i, item) for i, item in enumerate(kw["users"])]
        if isinstance(kw.get("relay"), dict):
            kw["relay"] = _sub(Relay, kw["relay"], "relay")
        if isinstance(kw.get("default_policy"), dict):
            kw["default_policy"] = _sub(Policy, kw["default_policy"], "default_policy")
        if isinstance(kw.get("destinations"), dict):
            kw["destinations"] = {d: _sub(Policy, p, f"destinations.{d}") if isinstance(p, dict) else p
                                  for d, p in kw["destinations"].items()}
        if isinstance(kw.get("dkim"), list):
            kw["dkim"] = [_sub(DkimKey, k, f"dkim[{i}]") if isinstance(k, dict) else k
                          for i, k in enumerate(kw["dkim"])]
        if "limits" in kw:
            lim = kw["limits"]
            if not isinstance(lim, dict):
                raise ConfigError("limits", "must be a table")
            lknown = {f.name for f in fields(Limits)}
            for key in lim:
                if key not in lknown:
                    raise ConfigError(f"limits.{key}", "unknown limit")
            kw["limits"] = Limits(**lim)
        return cls(**kw)

    def store_dir(self) -> str:
        """The Maildir store's root: mail_dir, or DATA/mailboxes."""
        return os.path.abspath(self.mail_dir or os.path.join(str(self.data_dir), "mailboxes"))

    def _alias_pairs(self) -> list[tuple[str, str]]:
        """Checked (key, target) pairs of the aliases, in lower case."""
        if not isinstance(self.aliases, dict):
            raise ConfigError("aliases", "must be a table of address = [addresses]")
        local = {d.lower().rstrip(".") for d in self.domains}
        pairs = []
        for key, targets in self.aliases.items():
            where = f"aliases.{key}"
            k, local_part, dom = _alias_address(key, where)
            if dom not in local:
                raise ConfigError(where, f"{dom} is not one of the local domains")
            if isinstance(targets, str):
                targets = [t for t in targets.replace(",", " ").split() if t]
            if not isinstance(targets, list) or not targets:
                raise ConfigError(where, "needs at least one target address")
            for target in targets:
                t, tl, _ = _alias_address(target, where)
                if not tl and local_part:
                    raise ConfigError(where, f"{t!r}: only a @domain key can map onto a whole domain")
                pairs.append((k, t))
        return pairs

    # -- checking ---------------------------------------------------------

    def validate(self) -> None:
        if not isinstance(self.data_dir, (str, os.PathLike)) or not str(self.data_dir):
            raise ConfigError("data_dir", "must be a directory path")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 256:
            raise ConfigError("workers", "must be a whole number from 1 to 256")
        seen: set[tuple[str, int]] = set()
        for i, ls in enumerate(self.listeners):
            if ls.kind not in LISTENER_KINDS:
                raise ConfigError(f"listeners[{i}].kind", f"must be one of {', '.join(LISTENER_KINDS)}")
            if not isinstance(ls.port, int) or not 0 < ls.port < 65536:
                raise ConfigError(f"listeners[{i}].port", "must be 1 to 65535")
            if (ls.host, ls.port) in seen:
                raise ConfigError(f"listeners[{i}]", f"{ls.host}:{ls.port} is listed twice")
            seen.add((ls.host, ls.port))
        for i, d in enumerate(self.domains):
            if not d or " " in d or "@" in d:
                raise ConfigError(f"domains[{i}]", f"{d!r} is not a domain name")
        for i, net in enumerate(self.trusted_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"trusted_networks[{i}]", f"{net!r} is not an address or network") from None
        from . import _core

        for i, u in enumerate(self.users):
            if "@" not in u.address:
                raise ConfigError(f"users[{i}].address", f"{u.address!r} is not an address")
            if not _core.hash_is_known(u.password_hash):
                raise ConfigError(f"users[{i}].password_hash",
                                  "not a known hash format (use `mailengine hash-password`)")
            parse_size(u.quota, f"users[{i}].quota")
            if not isinstance(u.quota_messages, int) or isinstance(u.quota_messages, bool) or u.quota_messages < 0:
                raise ConfigError(f"users[{i}].quota_messages", "must be a non-negative whole number")
        self._alias_pairs()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert" if self.tls_cert is None else "tls_key",
                              "tls_cert and tls_key go together")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(key, f"cannot read {path}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        lim = self.limits
        for f in fields(Limits):
            v = getattr(lim, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1e12:
                raise ConfigError(f"limits.{f.name}", "must be a non-negative number")
        if lim.max_command_line < 512:
            raise ConfigError("limits.max_command_line", "must be at least 512 (RFC 5321 4.5.3.1.4)")
        if lim.max_text_line < 1000:
            raise ConfigError("limits.max_text_line", "must be at least 1000 (RFC 5321 4.5.3.1.6)")
        for name in ("command_timeout", "data_timeout", "pop3_idle_timeout"):
            if getattr(lim, name) < 0.001:
                raise ConfigError(f"limits.{name}", "must be positive (at least 0.001 s)")

        self._validate_delivery()

    def _validate_delivery(self) -> None:
        if self.dns is not None:
            for part in str(self.dns).split(","):
                parse_hostport(part.strip() if ":" in part else part.strip() + ":53", "dns")
        if not isinstance(self.remote_port, int) or not 0 < self.remote_port < 65536:
            raise ConfigError("remote_port", "must be 1 to 65535")
        for name in ("retry_min", "retry_max", "queue_lifetime", "connect_timeout", "reply_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(name, "must be a positive number of seconds")
        if self.retry_max < self.retry_min:
            raise ConfigError("retry_max", "must not be less than retry_min")
        if self.delay_warning is not None and self.delay_warning <= 0:
            raise ConfigError("delay_warning", "must be positive (or None)")
        _check_policy(self.default_policy, "default_policy")
        for key, pol in [("default_policy", self.default_policy)] + [
                (f"destinations.{d}", p) for d, p in self.destinations.items()]:
            if isinstance(pol, Policy) and pol.pool is not None and pol.pool not in self.source_pools:
                raise ConfigError(f"{key}.pool", f"no source pool named {pol.pool!r}")
        for dom, pol in self.destinations.items():
            if not dom or " " in dom or "@" in dom:
                raise ConfigError(f"destinations.{dom}", "not a domain name")
            _check_policy(pol, f"destinations.{dom}")
        if self.relay is not None:
            r = self.relay
            if not isinstance(r, Relay):
                raise ConfigError("relay", "must be a Relay")
            if not r.host:
                raise ConfigError("relay.host", "required")
            if not isinstance(r.port, int) or not 0 < r.port < 65536:
                raise ConfigError("relay.port", "must be 1 to 65535")
            if r.tls not in RELAY_TLS:
                raise ConfigError("relay.tls", f"must be one of {', '.join(RELAY_TLS)}")
            if (r.user is None) != (r.password is None):
                raise ConfigError("relay.user", "user and password go together")
            if r.tls_ca_file is not None and not os.access(r.tls_ca_file, os.R_OK):
                raise ConfigError("relay.tls_ca_file", f"cannot read {r.tls_ca_file}")
        for name, addrs in self.source_pools.items():
            if not addrs:
                raise ConfigError(f"source_pools.{name}", "needs at least one address")
            for a in addrs:
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise ConfigError(f"source_pools.{name}", f"{a!r} is not an IP address") from None
        for i, k in enumerate(self.dkim):
            if not isinstance(k, DkimKey):
                raise ConfigError(f"dkim[{i}]", "must be a DkimKey")
            if not os.access(k.key_file, os.R_OK):
                raise ConfigError(f"dkim[{i}].key_file", f"cannot read {k.key_file}")

    def delivery_to_core(self, events_to_python: bool) -> dict[str, Any]:
        def pol(p: Policy, domain: str | None = None) -> dict[str, Any]:
            d = {f.name: getattr(p, f.name) for f in fields(Policy)}
            if domain is not None:
                d["domain"] = domain.lower()
            return d

        relay = None
        if self.relay is not None:
            relay = {f.name: getattr(self.relay, f.name) for f in fields(Relay)}
        return {
            "enabled": self.delivery_enabled,
            "mail_dir": self.store_dir() if self.local_delivery else None,
            "store_dir": self.store_dir(),
            "events_to_python": events_to_python,
            "dns": self.dns,
            "remote_port": self.remote_port,
            "relay": relay,
            "retry_min": self.retry_min,
            "retry_max": self.retry_max,
            "lifetime": self.queue_lifetime,
            "delay_warning": self.delay_warning,
            "connect_timeout": self.connect_timeout,
            "reply_timeout": self.reply_timeout,
            "idle_time": self.connection_idle_time,
            "bounce_max_return": self.bounce_max_return,
            "default_policy": pol(self.default_policy),
            "destinations": [pol(p, d) for d, p in self.destinations.items()],
            "pools": [{"name": n, "addresses": list(a)} for n, a in self.source_pools.items()],
            "dkim": [{"domain": k.domain.lower(), "selector": k.selector, "key_file": k.key_file,
                      "headers": k.headers} for k in self.dkim],
        }

    def ensure_tls(self) -> tuple[str, str]:
        """The certificate and key to use, generating a self-signed pair in
        data_dir/tls/ when none is configured."""
        if self.tls_cert and self.tls_key:
            return self.tls_cert, self.tls_key
        from . import _core

        tls_dir = Path(self.data_dir) / "tls"
        cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
        if not (cert.exists() and key.exists()):
            tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _core.generate_cert(str(cert), str(key), self.hostname)
        return str(cert), str(key)

    def to_core(self, hooks_mask: int, events_to_python: bool = False) -> dict[str, Any]:
        """The dict the C engine reads (after validate())."""
        cert, key = self.ensure_tls()
        listeners = []
        for i, ls in enumerate(self.listeners):
            listeners.append({"name": ls.name or f"{ls.kind}:{ls.port}", "kind": ls.kind,
                              "host": ls.host, "port": ls.port})
        nets = [str(ipaddress.ip_network(n, strict=False)) for n in self.trusted_networks]
        return {
            "data_dir": os.path.abspath(self.data_dir),
            "hostname": self.hostname,
            "workers": self.workers,
            "listeners": listeners,
            "domains": [d.lower().rstrip(".") for d in self.domains],
            "trusted_networks": nets,
            "users": [(u.address.lower(), u.password_hash, parse_size(u.quota, "quota"), u.quota_messages)
                      for u in self.users],
            "aliases": self._alias_pairs(),
            "tls_cert": cert,
            "tls_key": key,
            "allow_plain_auth": self.allow_plain_auth,
            "reject_unknown_local": self.reject_unknown_local,
            "hooks": hooks_mask,
            "log_level": LOG_LEVELS[self.log_level],
            "limits": {f.name: getattr(self.limits, f.name) for f in fields(Limits)},
            "delivery": self.delivery_to_core(events_to_python),
        }


def _alias_address(text: Any, where: str) -> tuple[str, str, str]:
    """An alias key or target ("user@domain" or "@domain") in lower case,
    with its local part and domain."""
    t = str(text).strip().lower()
    local_part, at, dom = t.rpartition("@")
    if not at or not dom or _BAD_ALIAS.search(t):
        raise ConfigError(where, f"{text!r} is not an address or @domain")
    return t, local_part, dom


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or "500M"-style text (K, M, G, T: powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", value.upper())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ConfigError(key, f"{value!r} is not a size (bytes, or a number with K, M, G or T)")


def _sub(cls: Any, item: dict[str, Any], key: str) -> Any:
    known = {f.name for f in fields(cls)}
    for k in item:
        if k not in known:
            raise ConfigError(f"{key}.{k}", "unknown setting")
    try:
        return cls(**item)
    except TypeError as e:
        raise ConfigError(key, str(e)) from None


def _check_policy(p: Any, key: str) -> None:
    if not isinstance(p, Policy):
        raise ConfigError(key, "must be a Policy")
    for name in ("max_connections", "max_messages_per_connection", "max_recipients"):
        v = getattr(p, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key}.{name}", "must be a whole number of at least 1")
    for name in ("rate_per_second", "rate_per_minute", "rate_per_hour"):
        v = getattr(p, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"{key}.{name}", "must be positive (or None for no limit)")
    if p.tls not in POLICY_TLS:
        raise ConfigError(f"{key}.tls", f"must be one of {', '.join(POLICY_TLS)}")
    if p.tls_ca_file is not None and not os.access(p.tls_ca_file, os.R_OK):
        raise ConfigError(f"{key}.tls_ca_file", f"cannot read {p.tls_ca_file}")
    if p.pool is not None and (not isinstance(p.pool, str) or not p.pool or " " in p.pool
                               or len(p.pool) > 63):
        raise ConfigError(f"{key}.pool", "must be a pool name (no spaces, at most 63 characters)")


def _listener(i: int, item: Any) -> Listener:
    if isinstance(item, Listener):
        return item
    if not isinstance(item, dict):
        raise ConfigError(f"listeners[{i}]", "must be a table")
    for key in item:
        if key not in {"kind", "host", "port", "name"}:
            raise ConfigError(f"listeners[{i}].{key}", "unknown setting")
    return Listener(**item)


def _user(i: int, item: Any) -> User:
    if isinstance(item, User):
        return item
    if not isinstance(item, dict) or "address" not in item:
        raise ConfigError(f"users[{i}]", "must be a table with address and password_hash (or password)")
    for key in item:
        if key not in {"address", "password", "password_hash", "quota", "quota_messages"}:
            raise ConfigError(f"users[{i}].{key}", "unknown setting")
    extra = (item.get("quota", 0), item.get("quota_messages", 0))
    if "password" in item:
        from . import _core

        return User(item["address"], _core.hash_password(item["password"]), *extra)
    if "password_hash" not in item:
        raise ConfigError(f"users[{i}].password_hash", "missing")
    return User(item["address"], item["password_hash"], *extra)


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or ":PORT"."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(key, f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
