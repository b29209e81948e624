"""maild.dns against a real DNS server on loopback: answers, failures, TTL cache, bounds.

Time in the cache is moved by replacing maild.dns.clock: nothing here waits for a TTL.
"""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.resolver
import pytest

from maild import dns as maild_dns
from maild.components import parse
from maild.config import ConfigError
from tests.harness.dns import DnsServer

ZONE = """
mx.example.       300 IN MX 10 mail.mx.example.
a-only.example.   300 IN A 192.0.2.1
v6-only.example.  300 IN AAAA 2001:db8::1
nullmx.example.   300 IN MX 0 .
txt-only.example. 300 IN TXT "no mail"
short.example.    5 IN MX 10 mail.short.example.
long.example.     86400 IN MX 10 mail.long.example.
xn--mnchen-3ya.example. 300 IN MX 10 mail.example.
com.              300 IN NS ns.test.
"""


@pytest.fixture(scope="module")
def server():
    with DnsServer(ZONE, servfail=["broken.example."], drop=["silent.example."]) as s:
        yield s


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(maild_dns, "clock", c)
    return c


def configure(server: DnsServer, **dns: object) -> None:
    maild_dns.configure(
        parse({"dns": {"nameservers": [server.nameserver], "timeout": "500ms", **dns}})
    )
    server.reset_counts()


@pytest.mark.parametrize(
    "domain, status",
    [
        ("mx.example", "ok"),
        ("MX.Example.", "ok"),
        ("a-only.example", "ok"),
        ("v6-only.example", "ok"),
        ("nullmx.example", "nullmx"),
        ("txt-only.example", "nodata"),
        ("absent.example", "nxdomain"),
        ("münchen.example", "ok"),
        ("broken.example", "error"),
        ("silent.example", "error"),
        ("[192.0.2.1]", "nxdomain"),
        ("bad..name", "nxdomain"),
    ],
)
async def test_mail_domain(server, clock, domain, status):
    configure(server)
    r = await maild_dns.mail_domain(domain)
    assert r.status == status, r
    assert await maild_dns.domain_exists(domain) == {"ok": "yes", "error": "error"}.get(
        status, "nxdomain"
    )


async def test_failures_say_what_failed(server, clock):
    configure(server)
    assert (await maild_dns.mail_domain("silent.example")).detail == (
        "MX lookup for silent.example failed: timeout after 0.5s"
    )
    assert "SERVFAIL" in (await maild_dns.mail_domain("broken.example")).detail


async def test_answers_are_cached_for_their_ttl(server, clock):
    configure(server)
    assert (await maild_dns.mail_domain("short.example")).ok
    assert (await maild_dns.mail_domain("short.example")).ok
    assert server.count("short.example.", "MX") == 1
    clock.t += 6  # past the 5 s TTL
    assert (await maild_dns.mail_domain("short.example")).ok
    assert server.count("short.example.", "MX") == 2


async def test_long_ttls_are_capped_by_max_ttl(server, clock):
    configure(server, max_ttl="10m")
    await maild_dns.mail_domain("long.example")
    clock.t += 599
    await maild_dns.mail_domain("long.example")
    assert server.count("long.example.", "MX") == 1
    clock.t += 2
    await maild_dns.mail_domain("long.example")
    assert server.count("long.example.", "MX") == 2


async def test_nxdomain_is_cached_for_the_soa_negative_ttl(server, clock):
    """RFC 2308: min(SOA TTL 3600, SOA MINIMUM 60) = 60 s."""
    configure(server)
    await maild_dns.mail_domain("absent.example")
    clock.t += 59
    await maild_dns.mail_domain("absent.example")
    assert server.count("absent.example.") == 1
    clock.t += 2
    await maild_dns.mail_domain("absent.example")
    assert server.count("absent.example.") == 2


async def test_failures_are_cached_only_briefly(server, clock):
    configure(server, error_ttl="10s")
    await maild_dns.mail_domain("broken.example")
    await maild_dns.mail_domain("broken.example")
    asked = server.count("broken.example.", "MX")
    clock.t += 11
    await maild_dns.mail_domain("broken.example")
    assert server.count("broken.example.", "MX") > asked


async def test_the_cache_is_bounded(server, clock):
    configure(server, cache_size=2)
    for d in ("mx.example", "a-only.example", "v6-only.example"):
        await maild_dns.mail_domain(d)
    await maild_dns.mail_domain("v6-only.example")
    await maild_dns.mail_domain("a-only.example")
    assert server.count("v6-only.example.", "MX") == 1
    assert server.count("a-only.example.", "MX") == 1
    await maild_dns.mail_domain("mx.example")  # evicted: asked again
    assert server.count("mx.example.", "MX") == 2


async def test_concurrent_lookups_of_one_domain_share_one_query(server, clock):
    configure(server)
    results = await asyncio.gather(*(maild_dns.mail_domain("mx.example") for _ in range(20)))
    assert {r.status for r in results} == {"ok"}
    assert server.count("mx.example.", "MX") == 1


async def test_a_cancelled_asker_does_not_cancel_the_shared_lookup(server, clock):
    configure(server)
    first = asyncio.ensure_future(maild_dns.mail_domain("a-only.example"))
    second = asyncio.ensure_future(maild_dns.mail_domain("a-only.example"))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).ok


async def test_name_exists_for_top_level_domains(server, clock):
    configure(server)
    assert (await maild_dns.name_exists("com")).ok
    assert (await maild_dns.name_exists("example")).ok  # an empty non-terminal exists
    assert (await maild_dns.name_exists("who")).status == "nxdomain"


async def test_reconfigure_empties_the_cache(server, clock):
    configure(server)
    await maild_dns.mail_domain("mx.example")
    configure(server)
    await maild_dns.mail_domain("mx.example")
    assert server.count("mx.example.", "MX") == 1  # counts were reset by configure()


async def test_no_resolver_configuration_means_every_lookup_fails_as_error(monkeypatch, clock):
    def no_config(*a, **k):
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.asyncresolver, "Resolver", no_config)
    maild_dns.configure(parse({}))
    r = await maild_dns.mail_domain("mx.example")
    assert (r.status, r.detail) == (
        "error",
        "MX lookup for mx.example failed: no resolver configured",
    )


def test_defaults_when_the_section_is_absent():
    s = parse({}).sections["dns"]
    assert (s.nameservers, s.timeout, s.cache_size) == ((), 5.0, 10000)


def test_nameserver_forms():
    s = parse(
        {
            "dns": {
                "nameservers": [
                    "192.0.2.53",
                    "127.0.0.1:5353",
                    "2001:db8::53",
                    "[2001:db8::53]:5353",
                ]
            }
        }
    ).sections["dns"]
    assert s.servers == (
        ("192.0.2.53", 53),
        ("127.0.0.1", 5353),
        ("2001:db8::53", 53),
        ("2001:db8::53", 5353),
    )


@pytest.mark.parametrize(
    "dns_section, needle",
    [
        (
            {"nameservers": ["ns1.example"]},
            'dns.nameservers[0] = "ns1.example": expected an IP address',
        ),
        ({"nameservers": ["127.0.0.1:0"]}, 'dns.nameservers[0] = "127.0.0.1:0"'),
        ({"nameservers": "127.0.0.1"}, 'dns.nameservers = "127.0.0.1": expected a list of strings'),
        ({"timeout": "2m"}, 'dns.timeout = 120.0: expected a duration from "100ms" to "60s"'),
        ({"timeout": "soon"}, 'dns.timeout = "soon": expected a duration'),
        ({"cache_size": -1}, "dns.cache_size = -1: expected a whole number >= 0"),
        ({"resolver": "x"}, "dns.resolver: unknown key"),
    ],
)
def test_bad_settings_are_named(dns_section, needle):
    with pytest.raises(ConfigError) as e:
        parse({"dns": dns_section})
    assert any(needle in p for p in e.value.problems), e.value.problems


def test_this_module_does_not_shadow_dnspython():
    assert dns.resolver.__name__ == "dns.resolver"
    assert maild_dns.dns.asyncresolver is dns.asyncresolver
