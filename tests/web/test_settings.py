"""[web] in policies.toml: off by default, every mistake named with the key and a fix."""

from __future__ import annotations

import ipaddress

import pytest

from maild.components import parse
from maild.config import ConfigError
from maild.web.settings import confirm_url, section

MINIMAL = {"postmaster": {"domains": ["hosted.example"]}}


def problems(web: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse({**MINIMAL, "web": web})
    return e.value.problems


def test_off_by_default_with_documented_defaults():
    w = section(parse(MINIMAL))
    assert w.enabled is False and w.listen == ("127.0.0.1", 8025) and w.base_url == ""
    assert w.require_one_click is False and w.metrics is True and w.metrics_listen is None
    assert ipaddress.ip_address("127.0.0.1") in w.trusted_proxies[0]
    assert confirm_url(parse(MINIMAL), "abc") == ""


def test_enabled_section_is_typed():
    c = parse(
        {
            **MINIMAL,
            "web": {
                "enabled": True,
                "listen": "127.0.0.1:8080",
                "base_url": "https://lists.example.net/maild/",
                "trusted_proxies": ["192.0.2.10"],
                "metrics_listen": "127.0.0.1:9100",
                "client_limit": 3,
            },
        }
    )
    w = section(c)
    assert w.base_url == "https://lists.example.net/maild"
    assert w.listen == ("127.0.0.1", 8080) and w.metrics_listen == ("127.0.0.1", 9100)
    assert w.trusted_proxies == (ipaddress.ip_network("192.0.2.10/32"),)
    assert confirm_url(c, "tok") == "https://lists.example.net/maild/confirm/tok"


@pytest.mark.parametrize(
    ("web", "needle"),
    [
        ({"enabled": True}, "web.base_url is missing"),
        ({"enabled": True, "base_url": "http://lists.example.net"}, "an https:// URL"),
        ({"enabled": True, "base_url": "https://lists.example.net/?a=1"}, "no query"),
        ({"enabled": True, "base_url": "ftp://x.example"}, "the public URL"),
        ({"require_one_click": True}, "web.require_one_click = true: expected false unless"),
        ({"listen": "nowhere"}, "web.listen"),
        (
            {"enabled": True, "base_url": "https://x.example", "metrics_listen": "127.0.0.1:8025"},
            "an address other than listen",
        ),
        ({"trusted_proxies": ["not-an-ip"]}, "web.trusted_proxies[0]"),
        ({"enable": True}, "web.enable: unknown key"),
    ],
)
def test_mistakes_are_named(web, needle):
    assert any(needle in p for p in problems(web)), problems(web)


def test_plain_http_only_for_a_loopback_host():
    c = parse({**MINIMAL, "web": {"enabled": True, "base_url": "http://127.0.0.1:8025"}})
    assert section(c).base_url == "http://127.0.0.1:8025"


def test_which_web_changes_wait_for_a_restart():
    from maild.web.settings import restart_needed

    on = {"enabled": True, "base_url": "https://x.example/maild"}
    old = parse({**MINIMAL, "web": on})
    # limits and base_url's host apply at once
    same = {**on, "client_limit": 3, "base_url": "https://y.example/maild"}
    assert restart_needed(old, parse({**MINIMAL, "web": same})) == []
    moved = {**on, "listen": "127.0.0.1:8099", "base_url": "https://x.example/lists"}
    got = restart_needed(old, parse({**MINIMAL, "web": moved}))
    assert [(r["section"], r["key"], r["file"], r["running"]) for r in got] == [
        ("web", "listen", "127.0.0.1:8099", "127.0.0.1:8025"),
        ("web", "base_url (path)", "/lists", "/maild"),
    ]
