"""Customer resolution order: login, then network, then sender domain; the index behind it."""

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from maild.address import parse_path
from maild.components import parse
from maild.config import Customer
from maild.customers.index import CustomerIndex
from maild.policy.context import Client
from maild.policy.customer import resolve

C = parse(
    {
        "postmaster": {"domains": ["h.example"]},
        "customers": [
            {"name": "big", "networks": ["10.0.0.0/8"], "domains": ["big.example"]},
            {
                "name": "small",
                "networks": ["10.1.2.3/32"],
                "logins": ["Small@Small.Example"],
                "addresses": ["news@partner.example"],
            },
        ],
    }
)


def test_login_first_and_case_insensitive():
    i = resolve(
        C,
        Client(addr="10.9.9.9"),
        login="small@small.example",
        sender=parse_path("<a@big.example>"),
    )
    assert (i.name, i.by) == ("small", "login") and i.may_relay


def test_most_specific_network_wins():
    assert resolve(C, Client(addr="10.1.2.3")).name == "small"
    assert resolve(C, Client(addr="10.1.2.4")).name == "big"
    assert resolve(C, Client(addr="::ffff:10.1.2.3")).name == "small"


def test_sender_domain_and_extra_address_attribute_but_do_not_authorise():
    i = resolve(C, Client(addr="192.0.2.1"), sender=parse_path("<x@big.example>"))
    assert (i.name, i.by, i.may_relay) == ("big", "domain", False)
    i = resolve(C, Client(addr="192.0.2.1"), sender=parse_path("<News@Partner.Example>"))
    assert i.name == "small"


def test_unknown_and_null_sender():
    i = resolve(C, Client(addr="192.0.2.1"), sender=parse_path("<>"))
    assert i.customer is None and i.name == "-" and not i.may_relay
    assert resolve(C, Client(addr="not-an-ip")).customer is None


# --------------------------------------------------------------------------- the index


def _net(version: int, bits: int, plen: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    width = 32 if version == 4 else 128
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((bits >> (width - plen) << (width - plen), plen))


# Few distinct high bits, so that networks nest and collide, as a provider's do.
_v4 = st.builds(
    _net, st.just(4), st.integers(0, 7).map(lambda b: b << 29 | 0x0A0000), st.integers(0, 32)
)
_v6 = st.builds(
    _net,
    st.just(6),
    st.integers(0, 7).map(lambda b: b << 125 | 0x20010DB8 << 96),
    st.integers(0, 128),
)
_nets = st.lists(
    st.one_of(
        _v4, _v6, st.builds(_net, st.just(4), st.integers(0, 2**32 - 1), st.integers(16, 32))
    ),
    max_size=40,
)


def _reference(customers: list[Customer], ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    """The linear scan maild used to do: most specific first, the first claim on a tie."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    pairs = [(n, c) for c in customers for n in c.networks]
    pairs.sort(key=lambda nc: -nc[0].prefixlen)
    return next((c for n, c in pairs if n.version == ip.version and ip in n), None)


def _address_in(net, host: int):
    return net.network_address + (host % net.num_addresses)


@settings(max_examples=300, deadline=None)
@given(
    nets=_nets,
    probes=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 2**128)), max_size=20),
    strangers=st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), max_size=10),
)
def test_network_lookup_agrees_with_a_linear_scan(nets, probes, strangers):
    customers = [Customer(name=f"c{i}", networks=(n,)) for i, n in enumerate(nets)]
    # Some customers with two networks, as a provider's with a v4 and a v6 range.
    if len(customers) > 3:
        customers[1] = Customer(name="c1", networks=(nets[1], nets[3]))
    idx = CustomerIndex.build(customers)
    addrs = [_address_in(nets[i % len(nets)], h) for i, h in probes] if nets else []
    addrs += strangers
    addrs += [ipaddress.IPv6Address(f"::ffff:{a}") for a in addrs if a.version == 4][:3]
    for a in addrs:
        want, got = _reference(customers, a), idx.by_ip(a)
        assert (want and want.name) == (got and got.name), a


def test_a_source_customer_claiming_a_network_in_force_is_refused_whole():
    toml = Customer(name="acme", networks=(ipaddress.ip_network("192.0.2.0/24"),))
    new = Customer(
        name="intruder",
        networks=(ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("192.0.2.0/24")),
        logins=("intruder",),
        origin="files:/etc/maild/customers.d/intruder.toml",
    )
    idx = CustomerIndex.build([toml], [new])
    assert idx.by_name("intruder") is None and idx.by_login("intruder") is None
    assert idx.by_ip(ipaddress.ip_address("198.51.100.1")) is None
    assert any("intruder" in r and "acme" in r and "192.0.2.0/24" in r for r in idx.refused)


def test_a_customer_in_force_keeps_its_records_against_a_newcomer_sorting_first():
    f = "files:/d/{}.toml"
    zed = Customer(name="zed", logins=("shared",), origin=f.format("zed"))
    before = CustomerIndex.build([], [zed])
    aaa = Customer(name="aaa", logins=("shared",), origin=f.format("aaa"))
    after = CustomerIndex.build([], [aaa, zed], before)
    assert after.by_login("shared").name == "zed" and after.by_name("aaa") is None


def test_the_shipped_customers_table_resolves_as_before():
    from maild.components import load

    c = load("policies.toml")
    assert not c.customer_source.enabled
    i = resolve(c, Client(addr="192.0.2.77"))
    assert (i.name, i.by, i.may_relay) == ("example-customer", "network", True)
    i = resolve(c, Client(addr="198.51.100.1"), login="customer@customer.example")
    assert (i.name, i.by) == ("example-customer", "login")
    assert c.customer("example-customer").origin == "policies.toml"
    assert [x.name for x in c.all_customers()] == ["example-customer"]
