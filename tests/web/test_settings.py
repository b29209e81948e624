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


def test_reload_says_which_changes_wait_for_a_restart(caplog):
    from maild.web.settings import reload_note

    on = {"enabled": True, "base_url": "https://x.example/maild"}
    old = parse({**MINIMAL, "web": on})
    reload_note(old, parse({**MINIMAL, "web": {**on, "client_limit": 3}}))
    assert "take effect only after a restart" not in caplog.text
    reload_note(old, parse({**MINIMAL, "web": {**on, "listen": "127.0.0.1:8099"}}))
    assert (
        "[web] enabled, listen, metrics, metrics_listen and the path of base_url take "
        "effect only after a restart" in caplog.text
    )
