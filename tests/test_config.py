"""policies.toml loading: typed values, every problem reported with key, value and fix."""

import ipaddress

import pytest

from maild import config as cfg
from maild.components import load, parse
from maild.config import ConfigError, parse_duration, parse_hostport, parse_size

MINIMAL = {"postmaster": {"domains": ["hosted.example"]}}


def test_shipped_policies_toml_is_valid():
    c = load("policies.toml")
    assert c.server.mode == "before-queue"
    assert c.server.downstream == ("127.0.0.1", 10026)
    assert "postmaster" in c.postmaster.local_parts and "abuse" in c.postmaster.local_parts
    assert c.server.downstream_timeout < 100


def test_defaults_from_minimal_file():
    c = parse(MINIMAL)
    assert c.server.listen == ("127.0.0.1", 10025)
    assert c.server.limits.message_size == 25 * 1024 * 1024
    assert ipaddress.ip_address("127.0.0.1") in c.server.trusted_upstreams[0]
    assert c.hosted_domains == frozenset({"hosted.example"})


def test_values_are_typed_and_frozen():
    c = parse(
        {
            **MINIMAL,
            "server": {"limits": {"message_size": "10MB", "data_timeout": "2m"}},
            "customers": [
                {"name": "acme", "networks": ["192.0.2.0/24"], "domains": ["Acme.Example."]}
            ],
        }
    )
    assert c.server.limits.message_size == 10 * 1024 * 1024
    assert c.server.limits.data_timeout == 120
    assert c.customers[0].domains == ("acme.example",)
    with pytest.raises(AttributeError):
        c.server.mode = "front"  # type: ignore[misc]


def test_every_problem_is_reported_with_key_value_and_fix():
    with pytest.raises(ConfigError) as e:
        parse(
            {
                "server": {
                    "mode": "sideways",
                    "listen": "nowhere",
                    "downstream_timeout": "120s",
                    "limits": {"max_sessions": 0, "message_size": "huge"},
                    "colour": 1,
                },
                "customers": [{"name": "a b", "networks": ["300.1.1.1"]}, {"networks": []}],
                "postmaster": {"domains": ["not a domain"], "local_parts": ["abuse"]},
            }
        )
    text = str(e.value)
    for needle in [
        'server.mode = "sideways": expected one of "before-queue", "front"',
        'server.listen = "nowhere": expected HOST:PORT',
        "server.downstream_timeout = 120.0: expected less than 100s",
        "server.limits.max_sessions = 0: expected a whole number >= 1",
        'server.limits.message_size = "huge": expected a size',
        "server.colour: unknown key",
        'customers[0].name = "a b"',
        'customers[0].networks[0] = "300.1.1.1": expected an IP address or CIDR network',
        "customers[1].name is missing",
        'postmaster.domains[0] = "not a domain"',
        "postmaster.local_parts = ['abuse']: expected a list that includes \"postmaster\"",
    ]:
        assert needle in text, needle
    assert len(e.value.problems) >= 11


def test_duplicate_customer_names_refused():
    with pytest.raises(ConfigError, match=r'customers\[1\]\.name = "a"'):
        parse({**MINIMAL, "customers": [{"name": "a"}, {"name": "a"}]})


def test_toml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[server\nmode=1")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value) and "TOML syntax error" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("5m", 300), ("2h", 7200), ("7d", 604800), (30, 30), ("250ms", 0.25)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text, n",
    [("1M", 1048576), ("25MB", 26214400), ("512k", 524288), (1000, 1000), ("1MiB", 1048576)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_parse_hostport():
    assert parse_hostport("[::1]:25") == ("::1", 25)
    assert parse_hostport(":10025") == ("127.0.0.1", 10025)
    with pytest.raises(ValueError):
        parse_hostport("127.0.0.1:0")


def test_section_parsers_are_arguments():
    seen = {}

    def parse_widget(r: cfg.Reader):
        seen["n"] = r.int("n", 1)
        r.unknown()
        return seen["n"]

    c = cfg.parse({**MINIMAL, "widget": {"n": 3}}, sections={"widget": parse_widget})
    assert c.sections["widget"] == 3
    with pytest.raises(ConfigError, match=r"widget\.m: unknown key"):
        cfg.parse({**MINIMAL, "widget": {"m": 3}}, sections={"widget": parse_widget})


def test_an_unknown_key_names_the_near_one():
    with pytest.raises(ConfigError) as e:
        parse(
            {
                **MINIMAL,
                "customers": [{"name": "acme", "contakt": "ops@acme.example"}],
                "server": {"downstram": "127.0.0.1:10026", "colour": 1},
            }
        )
    problems = e.value.problems
    assert (
        "customers[0].contakt: unknown key (did you mean customers[0].contact? see "
        "docs/policies.md)" in problems
    )
    assert (
        "server.downstram: unknown key (did you mean server.downstream? see docs/policies.md)"
        in problems
    )
    assert "server.colour: unknown key (misspelt? see docs/policies.md)" in problems
