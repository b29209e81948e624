"""Customer resolution order: login, then network, then sender domain."""

from maild.address import parse_path
from maild.components import parse
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
