"""Asynchronous DNS for policy rules: does a mail domain exist, does a name exist.

Rules ask questions ("can mail from acme.example be answered?"), not raw queries, and
every answer is cached for its TTL in a bounded LRU (negative answers for the SOA's
negative TTL, RFC 2308; failures briefly, so a broken resolver is not hammered), and
every query has a timeout. A lookup never raises: a timeout or SERVFAIL comes back as
status "error", which the rules turn into a 4xx tempfail, never into an accept or a 5xx.

Configured from [dns] by configure(), which the daemon calls at start and on SIGHUP.
(This module is maild.dns; `import dns.x` below is dnspython, absolute imports.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from maild import config as cfg

log = logging.getLogger("maild.policy")

Status = Literal["ok", "nxdomain", "nodata", "nullmx", "error"]
# Tests replace this to move time without waiting.
clock = time.monotonic
# Lookups sent (by result status) and answered from the cache, since start (/metrics).
STATS: Counter[str] = Counter()


@dataclass(frozen=True)
class DnsSettings:
    # As written in [dns] ("192.0.2.53", "127.0.0.1:5353", "[::1]:53"), validated;
    # () means the system resolver (/etc/resolv.conf). `servers` has them as (IP, port).
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0  # per lookup, all retries included
    cache_size: int = 10000  # answers kept (LRU)
    max_ttl: float = 3600.0  # re-ask at least this often, whatever the TTL says
    negative_ttl: float = 300.0  # NXDOMAIN/NODATA without an SOA to say otherwise
    error_ttl: float = 10.0  # a failed lookup is not retried sooner than this

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        return tuple(_parse_nameserver(s) for s in self.nameservers)


@dataclass(frozen=True)
class Lookup:
    """What DNS said about a name; `detail` is for logs and reply texts."""

    status: Status
    detail: str = ""
    ttl: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _parse_nameserver(value: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353'."""
    import ipaddress

    s = value.strip()
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            host, port = s.strip("[]"), "53"
    elif s.count(":") == 1:
        host, port = s.split(":")
    else:
        host, port = s, "53"
    ipaddress.ip_address(host)
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError
    return host, p


def parse_dns(r: cfg.Reader) -> DnsSettings:
    d = DnsSettings()
    servers = []
    for i, s in enumerate(r.str_list("nameservers")):
        try:
            _parse_nameserver(s)
            servers.append(s)
        except ValueError:
            r.error(
                f"nameservers[{i}]",
                s,
                'an IP address with an optional port, e.g. "192.0.2.53" '
                'or "127.0.0.1:5353" (no host names: the resolver cannot resolve itself)',
            )
    settings = DnsSettings(
        nameservers=tuple(servers),
        timeout=r.duration("timeout", "5s", positive=True),
        cache_size=r.int("cache_size", d.cache_size, minimum=0),
        max_ttl=r.duration("max_ttl", "1h"),
        negative_ttl=r.duration("negative_ttl", "5m"),
        error_ttl=r.duration("error_ttl", "10s"),
    )
    if not 0.1 <= settings.timeout <= 60:
        r.error(
            "timeout",
            settings.timeout,
            'a duration from "100ms" to "60s" (Postfix waits '
            "at most 100s for the whole proxy transaction)",
        )
    r.unknown()
    return settings


class _Cache:
    """Bounded LRU of key -> (expiry, Lookup)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[tuple[str, str], tuple[float, Lookup]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Lookup | None:
        hit = self.data.get(key)
        if hit is None:
            return None
        if hit[0] <= clock():
            del self.data[key]
            return None
        self.data.move_to_end(key)
        return hit[1]

    def put(self, key: tuple[str, str], value: Lookup, ttl: float) -> None:
        if ttl <= 0 or self.size == 0:
            return
        self.data[key] = (clock() + ttl, value)
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


class _State:
    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self.cache = _Cache(settings.cache_size)
        self.inflight: dict[tuple[str, str], asyncio.Task[Lookup]] = {}
        self.resolver = _make_resolver(settings)


def _make_resolver(s: DnsSettings) -> dns.asyncresolver.Resolver | None:
    if s.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in s.servers]
    else:
        try:
            r = dns.asyncresolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as e:
            log.error(
                "dns: error: no usable resolver configuration (%s): every lookup will "
                "tempfail until [dns] nameservers is set",
                e,
            )
            return None
    r.cache = None  # maild caches answers itself, with its own bounds
    r.timeout = s.timeout
    r.lifetime = s.timeout
    return r


_state: _State | None = None


def configure(config: cfg.Config | None) -> None:
    """(Re)build the resolver and empty the cache from [dns] (defaults when absent)."""
    global _state
    settings = config.sections.get("dns") if config is not None else None
    _state = _State(settings if isinstance(settings, DnsSettings) else DnsSettings())


def settings() -> DnsSettings:
    return _get().settings


def _get() -> _State:
    if _state is None:
        configure(None)
    assert _state is not None
    return _state


# --------------------------------------------------------------------------- queries


@dataclass
class _Answer:
    status: Status  # "ok" (records), "nodata", "nxdomain" or "error"
    rrset: Any = None
    ttl: float = 0.0
    detail: str = ""


def _negative_ttl(response: dns.message.Message | None, default: float) -> float:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return default


async def _query(st: _State, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
    s = st.settings
    if st.resolver is None:
        return _Answer("error", detail="no resolver configured")
    try:
        ans = await st.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN as e:
        resp = next(iter(e.responses().values()), None)
        return _Answer("nxdomain", ttl=_negative_ttl(resp, s.negative_ttl))
    except dns.resolver.LifetimeTimeout:
        return _Answer("error", detail=f"timeout after {s.timeout:g}s")
    except dns.resolver.NoNameservers:
        return _Answer("error", detail="server failure (SERVFAIL or REFUSED)")
    except dns.exception.DNSException as e:
        return _Answer("error", detail=type(e).__name__)
    except OSError as e:  # no route to the resolver, ...
        return _Answer("error", detail=e.strerror or type(e).__name__)
    if ans.rrset is None:
        return _Answer("nodata", ttl=_negative_ttl(ans.response, s.negative_ttl))
    return _Answer("ok", ans.rrset, float(max(0.0, ans.expiration - time.time())))


async def _mail_domain(st: _State, domain: str) -> Lookup:
    """RFC 5321 5.1: MX, else the implicit MX (A or AAAA); RFC 7505 null MX."""
    mx = await _query(st, domain, dns.rdatatype.MX)
    if mx.status == "error":
        return Lookup("error", f"MX lookup for {domain} failed: {mx.detail}")
    if mx.status == "nxdomain":
        return Lookup("nxdomain", f"{domain} does not exist (NXDOMAIN)", mx.ttl)
    if mx.status == "ok":
        if len(mx.rrset) == 1 and mx.rrset[0].exchange == dns.name.root:
            return Lookup("nullmx", f"{domain} publishes a null MX (it accepts no mail)", mx.ttl)
        return Lookup("ok", "MX", mx.ttl)
    a, aaaa = await asyncio.gather(
        _query(st, domain, dns.rdatatype.A), _query(st, domain, dns.rdatatype.AAAA)
    )
    found = [x for x in (a, aaaa) if x.status == "ok"]
    if found:
        return Lookup("ok", "A/AAAA", min(x.ttl for x in found))
    for x in (a, aaaa):
        if x.status == "error":
            return Lookup("error", f"address lookup for {domain} failed: {x.detail}")
    if "nxdomain" in (a.status, aaaa.status):
        return Lookup("nxdomain", f"{domain} does not exist (NXDOMAIN)", min(a.ttl, aaaa.ttl))
    return Lookup("nodata", f"{domain} has no MX, A or AAAA record", min(mx.ttl, a.ttl, aaaa.ttl))


async def _name(st: _State, name: str) -> Lookup:
    ans = await _query(st, name, dns.rdatatype.SOA)
    if ans.status == "error":
        return Lookup("error", f"lookup for {name} failed: {ans.detail}")
    if ans.status == "nxdomain":
        return Lookup("nxdomain", f"{name} does not exist", ans.ttl)
    return Lookup("ok", "", ans.ttl)


_PLAIN_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_][a-z0-9_-]{0,62})*$"
)


def _normalise(domain: str) -> str | None:
    """Lower-case A-label form without the trailing dot; None if not a DNS name."""
    d = domain.strip().rstrip(".").lower()
    if not d or d.startswith("[") or ".." in d:
        return None
    if _PLAIN_NAME.match(d):
        return d
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
        dns.name.from_text(d)
    except (UnicodeError, dns.exception.DNSException):
        return None
    return d


async def _cached(kind: str, name: str, fn: Any) -> Lookup:
    """One lookup per key at a time (concurrent askers share it), then cached."""
    st = _get()
    key = (kind, name)
    hit = st.cache.get(key)
    if hit is not None:
        STATS["cache-hit"] += 1
        return hit
    loop = asyncio.get_running_loop()
    task = st.inflight.get(key)
    if task is None or task.get_loop() is not loop:
        task = loop.create_task(_lookup_and_store(st, key, fn))
        st.inflight[key] = task
    # shield: a session that goes away does not cancel the lookup others wait for
    return await asyncio.shield(task)


async def _lookup_and_store(st: _State, key: tuple[str, str], fn: Any) -> Lookup:
    try:
        result: Lookup = await fn(st, key[1])
    finally:
        if st.inflight.get(key) is asyncio.current_task():
            del st.inflight[key]
    STATS[result.status] += 1
    if result.status == "error":
        log.warning("dns: warning: %s", result.detail)
        st.cache.put(key, result, st.settings.error_ttl)
    else:
        st.cache.put(key, result, min(result.ttl, st.settings.max_ttl))
    return result


async def mail_domain(domain: str) -> Lookup:
    """Can mail be sent to (so replies reach) this domain? Never raises."""
    d = _normalise(domain)
    if d is None:
        return Lookup("nxdomain", f"{domain!r} is not a valid domain name")
    return await _cached("mail", d, _mail_domain)


async def domain_exists(domain: str) -> Literal["yes", "nxdomain", "error"]:
    """The short form of mail_domain(): "yes", "nxdomain" (no way to mail it) or "error"."""
    r = await mail_domain(domain)
    return "yes" if r.ok else ("error" if r.status == "error" else "nxdomain")


async def name_exists(name: str) -> Lookup:
    """Does this name exist at all (any record, or names below it)? For TLD checks."""
    d = _normalise(name)
    if d is None:
        return Lookup("nxdomain", f"{name!r} is not a valid domain name")
    return await _cached("name", d, _name)


def cache_clear() -> None:
    _get().cache.data.clear()
