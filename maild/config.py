"""policies.toml into typed, frozen objects.

Loading never stops at the first problem: every bad key is collected and reported
with the key, the bad value and what would be valid, so an operator fixes the file
in one pass. Other modules (retention, ratelimit, ...) parse their own sections with
the same :class:`Reader`, so every error in the file reads the same way; which parser
reads which section is the caller's argument (the composition root, maild.components,
passes every component's), so reading a file loads no component.
"""

from __future__ import annotations

import builtins
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = ("before-queue", "front")


class ConfigError(Exception):
    """All problems found in one policies.toml, one line each."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


# --------------------------------------------------------------------------- values

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?)[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$",
    re.I,
)


def parse_duration(value: Any) -> float:
    """'90s', '5m', '7d', or a bare number of seconds, into seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:  # TOML has nan and inf literals
            raise ValueError
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any) -> int:
    """'25MB', '1M', '512k', or a bare number of bytes, into bytes (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_hostport(value: Any, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:10025', '[::1]:10025' or ':10025' into (host, port)."""
    s = str(value).strip()
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", s) or re.match(r"^([^:\s]*):(\d+)$", s)
    if not m:
        raise ValueError
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError
    return (m.group(1) or default_host), port


def is_hostname(value: str) -> bool:
    return bool(_HOSTNAME.match(value.rstrip(".")))


class Reader:
    """Typed access to one TOML table that records problems instead of raising.

    Every getter returns a usable default when the value is bad, so that loading
    goes on and reports all problems together.
    """

    def __init__(self, table: Any, prefix: str, problems: list[str]):
        self.prefix = prefix
        self.problems = problems
        if not isinstance(table, dict):
            self.error("", table, "a table")
            table = {}
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: Any, expected: str) -> None:
        where = self.key(name) if name else self.prefix
        self.problems.append(f"{where} = {_show(value)}: expected {expected}")

    def _get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        return self.table.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.table

    def str(
        self,
        name: builtins.str,
        default: builtins.str | None = None,
        *,
        choices: tuple[builtins.str, ...] = (),
        required: builtins.bool = False,
    ) -> builtins.str:
        value = self._get(name, default)
        if value is None:
            if required:
                self.problems.append(f"{self.key(name)} is missing: it is required")
            return ""
        if not isinstance(value, str):
            self.error(name, value, "a string")
            return default or ""
        if choices and value not in choices:
            self.error(name, value, "one of " + ", ".join(f'"{c}"' for c in choices))
            return default or choices[0]
        return value

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int = 0,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self._get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            rng = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            self.error(name, value, f"a whole number {rng}")
            return default
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self.error(name, value, "true or false")
            return default
        return value

    def float(
        self, name: builtins.str, default: builtins.float, *, minimum: builtins.float = 0.0
    ) -> builtins.float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            self.error(name, value, f"a number >= {minimum}")
            return default
        return float(value)

    def duration(
        self,
        name: builtins.str,
        default: builtins.str | builtins.float,
        *,
        positive: builtins.bool = False,
    ) -> builtins.float:
        """A duration in seconds; `positive` for timeouts and periods, where 0 is nonsense."""
        value = self._get(name, default)
        try:
            seconds = parse_duration(value)
            if positive and seconds <= 0:
                raise ValueError
            return seconds
        except ValueError:
            more = "greater than zero, " if positive else ""
            self.error(name, value, f'a duration {more}such as "90s", "5m", "2h" or "7d"')
            return parse_duration(default)

    def share(self, name: builtins.str, default: builtins.str) -> builtins.float:
        """'10%' (or 0.1) into 0.1, from 0 to 100%."""
        value = self._get(name, default)
        try:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, builtins.str) and value.strip().endswith("%"):
                share = builtins.float(value.strip()[:-1]) / 100
            elif isinstance(value, builtins.int | builtins.float):
                share = builtins.float(value)
            else:
                raise ValueError
            if not 0 <= share <= 1:
                raise ValueError
            return share
        except ValueError:
            self.error(name, value, 'a share from "0%" to "100%", e.g. "10%"')
            return builtins.float(default.rstrip("%")) / 100

    def size(self, name: builtins.str, default: builtins.str | builtins.int) -> builtins.int:
        value = self._get(name, default)
        try:
            return parse_size(value)
        except ValueError:
            self.error(name, value, 'a size such as "512k", "25MB" or a number of bytes')
            return parse_size(default)

    def hostport(
        self, name: builtins.str, default: builtins.str
    ) -> tuple[builtins.str, builtins.int]:
        value = self._get(name, default)
        try:
            return parse_hostport(value)
        except ValueError:
            self.error(name, value, 'HOST:PORT with a port from 1 to 65535, e.g. "127.0.0.1:10025"')
            return parse_hostport(default)

    def str_list(
        self,
        name: builtins.str,
        default: tuple[builtins.str, ...] = (),
        *,
        lower: builtins.bool = False,
    ) -> tuple[builtins.str, ...]:
        value = self._get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(name, value, "a list of strings")
            return default
        return tuple(v.strip().lower() if lower else v.strip() for v in value)

    def domains(self, name: builtins.str) -> tuple[builtins.str, ...]:
        out = []
        for i, d in enumerate(self.str_list(name, lower=True)):
            d = d.rstrip(".")
            if not is_hostname(d):
                self.error(f"{name}[{i}]", d, 'a domain name such as "example.com"')
            else:
                out.append(d)
        return tuple(out)

    def networks(
        self, name: builtins.str, default: tuple[builtins.str, ...] = ()
    ) -> tuple[Network, ...]:
        out = []
        for i, n in enumerate(self.str_list(name, default)):
            try:
                out.append(ipaddress.ip_network(n, strict=False))
            except ValueError:
                self.error(f"{name}[{i}]", n, 'an IP address or CIDR network, e.g. "192.0.2.0/24"')
        return tuple(out)

    def table_of(self, name: builtins.str) -> Reader:
        self.seen.add(name)
        return Reader(self.table.get(name, {}), self.key(name), self.problems)

    def tables(self, name: builtins.str) -> list[Reader]:
        self.seen.add(name)
        value = self.table.get(name, [])
        if not isinstance(value, list):
            self.error(name, value, f"an array of tables ([[{self.key(name)}]])")
            return []
        return [Reader(v, f"{self.key(name)}[{i}]", self.problems) for i, v in enumerate(value)]

    def unknown(self, known_elsewhere: tuple[builtins.str, ...] = ()) -> None:
        """Report keys nobody read: a typo silently ignored is a policy not enforced."""
        known = sorted((self.seen | set(known_elsewhere)) - set(self.table))
        for k in self.table:
            if k not in self.seen and k not in known_elsewhere:
                near = difflib.get_close_matches(k, known, n=1)
                hint = f"did you mean {self.key(near[0])}?" if near else "misspelt?"
                self.problems.append(f"{self.key(k)}: unknown key ({hint} see docs/policies.md)")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{table}"
    return repr(value)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Limits:
    message_size: int = 25 * 1024 * 1024
    recipients_per_message: int = 100
    line_length: int = 998  # RFC 5321 4.5.3.1.6: 1000 octets with the CRLF
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_sessions: int = 500
    max_sessions_per_ip: int = 20
    # Admission control (maild/smtp/admission.py): anvil's connection rate, the share of
    # max_sessions only customers and trusted upstreams may use, stress-mode timeouts.
    max_connection_rate_per_ip: int = 600  # connections per minute; 0 = no limit
    reserved_sessions: int = 100  # default: a fifth of max_sessions
    stress_command_timeout: float = 10.0
    stress_data_timeout: float = 120.0
    # Mail in flight (maild/smtp/budget.py): RAM for message content, all sessions together.
    memory_in_flight: int = 256 * 1024 * 1024
    spool_threshold: int = 1024 * 1024
    # Downstream connections (maild/smtp/downstream.py): below Postfix's process limit.
    downstream_connections: int = 50
    downstream_connections_per_client: int = 10
    downstream_reserved: int = 10  # of downstream_connections, for customers and postmaster
    downstream_greeting_timeout: float = 2.0


@dataclass(frozen=True)
class TLS:
    """[server.tls]: front mode's certificate, its TLS listeners and who must use TLS."""

    certificate: str = ""  # PEM path (with its chain); empty: no STARTTLS, no implicit TLS
    key: str = ""  # PEM path
    implicit: tuple[tuple[str, int], ...] = ()  # RFC 8314 listeners (465)
    submission: tuple[tuple[str, int], ...] = ()  # STARTTLS required before MAIL/AUTH (587)
    security_level: str = "may"  # on [server] listen: Postfix's smtpd_tls_security_level
    customers: str = "may"  # "encrypt": customers must use TLS before MAIL
    min_protocol: str = "TLSv1.2"

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


@dataclass(frozen=True)
class Auth:
    """[server.auth]: SMTP AUTH against Dovecot's auth service, over TLS only."""

    dovecot: str = ""  # Postfix's smtpd_sasl_path: a Unix socket path or inet:HOST:PORT
    max_failures: int = 5  # per client address and per login ...
    failure_window: float = 600.0  # ... within this many seconds

    @property
    def enabled(self) -> bool:
        return bool(self.dovecot)


@dataclass(frozen=True)
class Server:
    mode: str = "before-queue"
    listen: tuple[str, int] = ("127.0.0.1", 10025)
    downstream: tuple[str, int] = ("127.0.0.1", 10026)
    hostname: str = "localhost"
    trusted_upstreams: tuple[Network, ...] = ()
    state: str = "var/maild.db"
    pid_file: str = ""
    user: str = ""
    downstream_timeout: float = 60.0
    downstream_pool: int = 8
    # Worker processes accepting on the listening socket (maild/workers); "auto" = the
    # CPUs this process may run on, resolved when the file is read.
    workers: int = 1
    workers_auto: bool = False
    limits: Limits = field(default_factory=Limits)
    trusted_proxies: tuple[Network, ...] = ()  # PROXY protocol v1/v2 required from these
    tls: TLS = field(default_factory=TLS)
    auth: Auth = field(default_factory=Auth)


@dataclass(frozen=True)
class Customer:
    name: str
    networks: tuple[Network, ...] = ()
    logins: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    contact: str = ""
    # Per-customer settings owned by other modules (parse's customer_keys), by key.
    ext: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Where the record came from, for the CLI and the logs: policies.toml, a file of the
    # [customer_source] directory, "postgresql" (or its on-disk snapshot).
    origin: str = field(default="", compare=False)


SOURCE_TYPES = ("files", "postgresql")


@dataclass(frozen=True)
class CustomerSource:
    """[customer_source]: customers kept outside policies.toml, refreshed without a reload."""

    type: str = ""  # "" = only the [[customers]] of policies.toml
    path: str = ""  # files: the directory of NAME.toml files
    dsn: str = ""  # postgresql: libpq URL
    query: str = ""  # postgresql: one row per network/login/domain/address (docs/policies.md)
    refresh: float = 30.0
    max_shrink: float = 0.10  # a refresh that loses more than this share is refused
    snapshot: str = ""  # postgresql: last good rows, for a restart during an outage
    connect_timeout: float = 10.0
    # The components' parsers of the [[customers]] keys they own, so that a source's
    # customer reads exactly like a policies.toml one.
    keys: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.type)


class CustomerDirectory:
    """The customers in force for one Config: one immutable index, replaced whole.

    A refresh of [customer_source] builds a new index off the event loop and publishes it
    here with one assignment, so every reader sees either the old index or the new one,
    never half of each. Without a publisher (a CLI command, a test) the first reader
    builds it with the loader the composition root handed to parse()
    (maild.customers.directory.initial_index), or with the one it passes itself.
    """

    def __init__(self, config: Config):
        self._config = config
        self._index: Any = None
        self.loader: Callable[[Config], Any] | None = None

    def current(self, loader: Callable[[Config], Any] | None = None) -> Any:
        idx = self._index
        if idx is None:
            load = self.loader or loader
            if load is None:
                return None
            idx = self._index = load(self._config)
        return idx

    def publish(self, index: Any) -> None:
        self._index = index

    def __getstate__(self) -> dict[str, Any]:
        # A config sent to a worker (maild.workers) goes without the index, which can be
        # 100,000 customers: every process keeps its own (maild.customers.directory).
        return {**self.__dict__, "_index": None}


@dataclass(frozen=True)
class Postmaster:
    domains: tuple[str, ...] = ()
    hostnames: tuple[str, ...] = ()
    local_parts: tuple[str, ...] = ("postmaster", "abuse")


@dataclass(frozen=True)
class Config:
    path: str
    server: Server
    customers: tuple[Customer, ...]
    postmaster: Postmaster
    # Sections owned by other modules, parsed by them (parse's sections), by name.
    sections: dict[str, Any] = field(default_factory=dict)
    customer_source: CustomerSource = field(default_factory=CustomerSource)
    # [[customers]] plus the source's customers, as now (see CustomerDirectory).
    directory: CustomerDirectory = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", CustomerDirectory(self))

    @property
    def hosted_domains(self) -> frozenset[str]:
        """Domains and host names this installation receives mail for."""
        return frozenset(self.postmaster.domains) | frozenset(self.postmaster.hostnames)

    def customer(self, name: str) -> Customer | None:
        """A customer in force by name, from policies.toml or [customer_source]."""
        idx = self.directory.current()
        if idx is None:  # parsed without the composition root: policies.toml alone
            return next((c for c in self.customers if c.name == name), None)
        return idx.by_name(name)

    def all_customers(self) -> tuple[Customer, ...]:
        """Every customer in force: policies.toml's, then the source's."""
        idx = self.directory.current()
        return self.customers if idx is None else idx.customers


# A component's parser for its own top-level section: parser(reader) -> object, read back
# as config.sections[name].
SectionParser = Callable[[Reader], Any]
# ... and for its own keys inside each [[customers]] entry: parser(customer_reader) ->
# object, read back as customer.ext[key]. It reads its keys from the reader (marking them
# known) and must not fail when they are absent.
CustomerParser = Callable[[Reader], Any]


def _parse_limits(r: Reader) -> Limits:
    d = Limits()
    lim = Limits(
        message_size=r.size("message_size", d.message_size),
        recipients_per_message=r.int("recipients_per_message", d.recipients_per_message, minimum=1),
        line_length=r.int("line_length", d.line_length, minimum=78, maximum=100000),
        command_timeout=r.duration("command_timeout", d.command_timeout, positive=True),
        data_timeout=r.duration("data_timeout", d.data_timeout, positive=True),
        max_sessions=r.int("max_sessions", d.max_sessions, minimum=1),
        max_sessions_per_ip=r.int("max_sessions_per_ip", d.max_sessions_per_ip, minimum=1),
        max_connection_rate_per_ip=r.int(
            "max_connection_rate_per_ip", d.max_connection_rate_per_ip, minimum=0
        ),
        stress_command_timeout=r.duration(
            "stress_command_timeout", d.stress_command_timeout, positive=True
        ),
        stress_data_timeout=r.duration("stress_data_timeout", d.stress_data_timeout, positive=True),
        memory_in_flight=r.size("memory_in_flight", d.memory_in_flight),
        spool_threshold=r.size("spool_threshold", d.spool_threshold),
        downstream_connections=r.int("downstream_connections", d.downstream_connections, minimum=1),
        downstream_connections_per_client=r.int(
            "downstream_connections_per_client", d.downstream_connections_per_client, minimum=1
        ),
        downstream_reserved=r.int("downstream_reserved", d.downstream_reserved, minimum=0),
        downstream_greeting_timeout=r.duration(
            "downstream_greeting_timeout", d.downstream_greeting_timeout, positive=True
        ),
    )
    lim = replace(
        lim, reserved_sessions=r.int("reserved_sessions", lim.max_sessions // 5, minimum=0)
    )
    if lim.reserved_sessions >= lim.max_sessions:
        r.error(
            "reserved_sessions",
            lim.reserved_sessions,
            f"fewer than max_sessions ({lim.max_sessions}): strangers need some slots, "
            "or nobody can write to postmaster",
        )
    if lim.downstream_reserved >= lim.downstream_connections:
        r.error(
            "downstream_reserved",
            lim.downstream_reserved,
            f"fewer than downstream_connections ({lim.downstream_connections})",
        )
    if lim.spool_threshold > lim.memory_in_flight:
        r.error(
            "spool_threshold",
            lim.spool_threshold,
            f"at most memory_in_flight ({lim.memory_in_flight} bytes)",
        )
    r.unknown()
    return lim


TLS_LEVELS = ("may", "encrypt")
TLS_PROTOCOLS = ("TLSv1.2", "TLSv1.3")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(.+)$")


def _listeners(r: Reader, name: str) -> tuple[tuple[str, int], ...]:
    out = []
    for i, v in enumerate(r.str_list(name)):
        try:
            out.append(parse_hostport(v, "0.0.0.0"))
        except ValueError:
            r.error(f"{name}[{i}]", v, 'HOST:PORT with a port from 1 to 65535, e.g. "0.0.0.0:465"')
    return tuple(out)


def _parse_tls(r: Reader) -> TLS:
    d = TLS()
    tls = TLS(
        certificate=r.str("certificate", ""),
        key=r.str("key", ""),
        implicit=_listeners(r, "implicit"),
        submission=_listeners(r, "submission"),
        security_level=r.str("security_level", d.security_level, choices=TLS_LEVELS),
        customers=r.str("customers", d.customers, choices=TLS_LEVELS),
        min_protocol=r.str("min_protocol", d.min_protocol, choices=TLS_PROTOCOLS),
    )
    if bool(tls.certificate) != bool(tls.key):
        missing = "key" if tls.certificate else "certificate"
        r.problems.append(f"{r.key(missing)} is missing: certificate and key go together")
    elif not tls.enabled and (
        tls.implicit or tls.submission or "encrypt" in (tls.security_level, tls.customers)
    ):
        r.problems.append(f"{r.prefix}: TLS listeners and security levels need certificate and key")
    r.unknown()
    return tls


def _parse_auth(r: Reader) -> Auth:
    d = Auth()
    raw = r.str("max_failures", f"{d.max_failures}/10m")
    m = _RATE.match(raw)
    try:
        count, window = (int(m.group(1)), parse_duration(m.group(2))) if m else (0, 0.0)
        if count < 1 or window <= 0:
            raise ValueError
    except ValueError:
        r.error("max_failures", raw, 'failures per period, e.g. "5/10m"')
        count, window = d.max_failures, d.failure_window
    auth = Auth(dovecot=r.str("dovecot", ""), max_failures=count, failure_window=window)
    r.unknown()
    return auth


MAX_WORKERS = 256


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a container sees it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _parse_workers(r: Reader) -> dict[str, Any]:
    value = r._get("workers", "auto")
    if value == "auto":
        return {"workers": cpus(), "workers_auto": True}
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        r.error("workers", value, f'"auto" or a whole number from 1 to {MAX_WORKERS}')
        return {"workers": 1, "workers_auto": False}
    return {"workers": value, "workers_auto": False}


def _parse_server(r: Reader) -> Server:
    d = Server()
    server = Server(
        mode=r.str("mode", d.mode, choices=MODES),
        listen=r.hostport("listen", "127.0.0.1:10025"),
        downstream=r.hostport("downstream", "127.0.0.1:10026"),
        hostname=r.str("hostname", "localhost"),
        trusted_upstreams=r.networks("trusted_upstreams", ("127.0.0.0/8", "::1/128")),
        state=r.str("state", d.state),
        pid_file=r.str("pid_file", ""),
        user=r.str("user", ""),
        downstream_timeout=r.duration("downstream_timeout", d.downstream_timeout, positive=True),
        downstream_pool=r.int("downstream_pool", d.downstream_pool, minimum=0, maximum=1000),
        limits=_parse_limits(r.table_of("limits")),
        trusted_proxies=r.networks("trusted_proxies"),
        tls=_parse_tls(r.table_of("tls")),
        auth=_parse_auth(r.table_of("auth")),
        **_parse_workers(r),
    )
    if server.auth.enabled and not server.tls.enabled:
        r.error(
            "auth.dovecot",
            server.auth.dovecot,
            "[server.tls] certificate and key as well: AUTH is offered over TLS only",
        )
    if server.hostname and not is_hostname(server.hostname):
        r.error("hostname", server.hostname, 'a fully qualified host name, e.g. "mx1.example.net"')
    if server.downstream_timeout >= 100:
        # Postfix's smtpd_proxy_timeout is 100 s: slower than that and the client
        # retries while we may still deliver, which duplicates mail.
        r.error(
            "downstream_timeout",
            server.downstream_timeout,
            "less than 100s (Postfix's smtpd_proxy_timeout); 60s is a safe value",
        )
    if (
        server.state
        and not server.state.startswith(("sqlite:", "postgresql:"))
        and "://" in server.state
    ):
        r.error("state", server.state, 'a file path or "sqlite:PATH"')
    r.unknown()
    return server


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_customer(
    r: Reader, customer_keys: Mapping[str, CustomerParser], origin: str, default_name: str = ""
) -> Customer:
    """One customer table: a [[customers]] entry, a customer file, a database's rows."""
    name = r.str("name", default_name or None, required=True)
    if name and not _NAME.match(name):
        r.error("name", name, "letters, digits, '.', '_' or '-' (it is used in logs and the CLI)")
    addresses = r.str_list("addresses", lower=True)
    for i, a in enumerate(addresses):
        if "@" not in a:
            r.error(f"addresses[{i}]", a, 'a full address such as "news@partner.example"')
    contact = r.str("contact", "")
    if contact and "@" not in contact:
        r.error("contact", contact, 'an email address such as "ops@customer.example"')
    customer = Customer(
        name=name,
        networks=r.networks("networks"),
        logins=r.str_list("logins"),
        domains=r.domains("domains"),
        addresses=addresses,
        contact=contact,
        ext={key: parser(r) for key, parser in customer_keys.items()},
        origin=origin,
    )
    r.unknown()
    return customer


def _parse_customers(
    readers: list[Reader], customer_keys: Mapping[str, CustomerParser], origin: str
) -> tuple[Customer, ...]:
    customers: list[Customer] = []
    names: set[str] = set()
    for r in readers:
        c = parse_customer(r, customer_keys, origin)
        if c.name in names:
            r.error("name", c.name, "a name no other customer has")
        names.add(c.name)
        customers.append(c)
    return tuple(customers)


def _parse_customer_source(
    r: Reader, customer_keys: Mapping[str, CustomerParser]
) -> CustomerSource:
    d = CustomerSource()
    if not r.table:
        return d
    kind = r.str("type", None, choices=SOURCE_TYPES, required=True)
    src = CustomerSource(
        type=kind,
        path=r.str("path", "/etc/maild/customers.d" if kind == "files" else ""),
        dsn=r.str("dsn", ""),
        query=r.str("query", ""),
        refresh=r.duration("refresh", "30s", positive=True),
        max_shrink=r.share("max_shrink", "10%"),
        snapshot=r.str("snapshot", ""),
        connect_timeout=r.duration("connect_timeout", d.connect_timeout, positive=True),
        keys=customer_keys,
    )
    if kind == "files":
        if not src.path.strip():
            r.error(
                "path", src.path, 'a directory of customer files, e.g. "/etc/maild/customers.d"'
            )
        for key in ("dsn", "query", "snapshot"):
            if r.has(key):
                r.error(key, r.table[key], 'no value: it is for type = "postgresql"')
    if kind == "postgresql":
        if r.has("path"):
            r.error("path", r.table["path"], 'no value: it is for type = "files"')
        if not src.dsn.startswith(("postgresql://", "postgres://")):
            r.error("dsn", src.dsn, 'a libpq URL such as "postgresql://maild@db/billing"')
        if not src.query.strip():
            r.problems.append(
                f"{r.key('query')} is missing: it is required (a SELECT returning columns "
                "name, network, login, domain, address, contact, tier; see docs/policies.md)"
            )
    r.unknown()
    return src


def _parse_postmaster(r: Reader) -> Postmaster:
    pm = Postmaster(
        domains=r.domains("domains"),
        hostnames=r.domains("hostnames"),
        local_parts=r.str_list("local_parts", ("postmaster", "abuse"), lower=True),
    )
    if "postmaster" not in pm.local_parts:
        r.error(
            "local_parts",
            list(pm.local_parts),
            'a list that includes "postmaster" (RFC 5321 section 4.5.1 requires it)',
        )
    r.unknown()
    return pm


def parse(
    data: dict[str, Any],
    path: str = "policies.toml",
    *,
    sections: Mapping[str, SectionParser] | None = None,
    customer_keys: Mapping[str, CustomerParser] | None = None,
    customer_index: Callable[[Config], Any] | None = None,
) -> Config:
    """Validate a decoded TOML document; raise ConfigError with every problem.

    sections and customer_keys are the components' parsers, in the order their problems
    are listed; without them only [server], [[customers]] and [postmaster] are known.
    customer_index builds the config's customer index when it is first needed."""
    problems: list[str] = []
    root = Reader(data, "", problems)
    server = _parse_server(root.table_of("server"))
    customers = _parse_customers(root.tables("customers"), customer_keys or {}, path)
    source = _parse_customer_source(root.table_of("customer_source"), customer_keys or {})
    postmaster = _parse_postmaster(root.table_of("postmaster"))
    parsed = {name: parser(root.table_of(name)) for name, parser in (sections or {}).items()}
    root.unknown()
    if problems:
        raise ConfigError(path, problems)
    config = Config(
        path=path,
        server=server,
        customers=customers,
        postmaster=postmaster,
        sections=parsed,
        customer_source=source,
    )
    config.directory.loader = customer_index
    return config


def load(
    path: str | Path,
    *,
    sections: Mapping[str, SectionParser] | None = None,
    customer_keys: Mapping[str, CustomerParser] | None = None,
    customer_index: Callable[[Config], Any] | None = None,
) -> Config:
    """Read and validate policies.toml; raise ConfigError naming every problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [f"cannot read the file: {e.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(p), ["the file is not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), [f"TOML syntax error: {e}"]) from None
    except (RecursionError, MemoryError):
        raise ConfigError(
            str(p), ["the file is nested too deeply to be a policy; check for runaway brackets"]
        ) from None
    return parse(
        data,
        str(p),
        sections=sections,
        customer_keys=customer_keys,
        customer_index=customer_index,
    )
