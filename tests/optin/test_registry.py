"""Finding a list by return path (VERP), unsubscribe address, List-Id, confirm address."""

from __future__ import annotations

from maild.optin.registry import Registry, compile_pattern, verp_decode
from maild.optin.settings import ListConfig, section


def test_patterns_and_verp():
    p = compile_pattern("news-bounces+*@lists.hosted.example")
    m = p.fullmatch("news-bounces+bob=example.org@lists.hosted.example")
    assert m and verp_decode(m.group(1)) == "bob@example.org"
    assert not p.fullmatch("news-bounces+x@evil.example")
    assert not p.fullmatch("news-bounces+a@b@lists.hosted.example")
    assert verp_decode("nobody") is None and verp_decode("a=b") is None


def test_registry(config):
    reg = Registry.build(section(config), [])
    news = reg.get("News.Acme.Example")
    assert news is not None and news.customer == "acme"
    assert reg.for_return_path("acme", "NEWS-bounces+x=y.example@lists.hosted.example") is news
    assert reg.for_return_path("acme", "news@acme.example") is news
    assert reg.for_return_path("other", "news@acme.example") is None  # not the other's list
    assert reg.any_return_path("deals-bounces@lists.hosted.example")[0].id == "deals.other.example"
    hit = reg.for_unsubscribe("news-leave+bob=example.org@lists.hosted.example")
    assert hit and hit[0] is news and verp_decode(hit[1].group(1)) == "bob@example.org"
    assert reg.for_unsubscribe("news-leave@elsewhere.example") is None
    assert reg.confirm_token("confirm+ABC", "Lists.Hosted.Example".lower(), "confirm") == "abc"
    assert reg.confirm_token("confirm+abc", "hosted.example", "confirm") is None
    assert reg.confirm_token("confirm", "lists.hosted.example", "confirm") is None


def test_config_wins_over_the_store(config):
    stored = ListConfig(
        id="news.acme.example", customer="other", owner="x@other.example", consent_text="x"
    )
    extra = ListConfig(
        id="tips.other.example",
        customer="other",
        owner="t@other.example",
        consent_text="t",
        domain="tips.other.example",
    )
    reg = Registry.build(section(config), [stored, extra])
    assert reg.get("news.acme.example").customer == "acme" and reg.shadowed == ["news.acme.example"]
    assert reg.get("tips.other.example").source == "store"
    assert "tips.other.example" in reg.domains


def test_a_lists_addresses_belong_to_its_customer_only(config):
    """Both customers' lists share lists.hosted.example; neither gets the other's."""
    reg = Registry.build(section(config), [])
    tokens = {"t1": "news.acme.example", "t2": "deals.other.example"}

    def of(customer: str, addr: str) -> str | None:
        return reg.address_of(customer, addr, "confirm", tokens.get)

    assert (
        of("acme", "news-bounces+bob=example.org@Lists.Hosted.Example")
        == "return path of list news.acme.example"
    )
    assert (
        of("acme", "news-leave+bob=example.org@lists.hosted.example")
        == "unsubscribe address of list news.acme.example"
    )
    assert (
        of("acme", "confirm+T1@lists.hosted.example")
        == "confirmation address of list news.acme.example"
    )
    assert (
        of("other", "deals-bounces@lists.hosted.example")
        == "return path of list deals.other.example"
    )
    assert (
        of("other", "confirm+t2@lists.hosted.example")
        == "confirmation address of list deals.other.example"
    )
    for customer, addr in (
        ("other", "news-bounces+x@lists.hosted.example"),
        ("other", "news-leave@lists.hosted.example"),
        ("other", "confirm+t1@lists.hosted.example"),
        ("acme", "deals-bounces@lists.hosted.example"),
        ("acme", "confirm+t2@lists.hosted.example"),
        ("acme", "confirm+unknown@lists.hosted.example"),
        ("acme", "confirm+t1@hosted.example"),  # not the list's domain
        ("acme", "postmaster@lists.hosted.example"),
        ("nobody", "news-bounces+x@lists.hosted.example"),
    ):
        assert of(customer, addr) is None, (customer, addr)
