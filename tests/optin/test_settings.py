"""[optin] in policies.toml: every mistake reported with the key and what would be valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maild.components import parse
from maild.config import ConfigError
from maild.optin.settings import consent_hash, normalise_list_id, section
from tests.optin.conftest import CONSENT, POLICY, make_config


def problems(optin: dict) -> list[str]:
    doc = {**POLICY, "optin": optin}
    with pytest.raises(ConfigError) as e:
        parse(doc)
    return e.value.problems


def test_lists_are_parsed_with_defaults(config):
    s = section(config)
    assert [x.id for x in s.lists] == ["news.acme.example", "deals.other.example"]
    news = s.lists[0]
    assert news.customer == "acme" and news.domain == "lists.hosted.example"
    assert news.consent_hash == consent_hash(CONSENT)
    assert s.complaint_limit_percent == 0.3 and s.complaint_warning_percent == 0.1
    assert s.complaint_window == 86400 and s.token_lifetime == 3 * 86400
    assert s.complaint_addresses == ("abuse@*",) and s.attested_consent


def test_no_section_means_defaults():
    c = parse({k: v for k, v in POLICY.items() if k != "optin"})
    assert section(c).lists == () and section(c).enabled


def test_domain_defaults_to_the_owners():
    s = section(
        parse(
            {
                **POLICY,
                "optin": {
                    "lists": [
                        {
                            "id": "x.example",
                            "customer": "acme",
                            "owner": "o@lists.acme.example",
                            "consent_text": "t",
                        }
                    ]
                },
            }
        )
    )
    assert s.lists[0].domain == "lists.acme.example" and s.lists[0].name == "x.example"


@pytest.mark.parametrize(
    "lst, needle",
    [
        ({"id": "nodot"}, 'optin.lists[0].id = "nodot": expected an RFC 2919 List-Id'),
        ({"owner": "not-an-address"}, "optin.lists[0].owner"),
        ({"return_paths": ["bounces@*.example"]}, "optin.lists[0].return_paths[0]"),
        ({"unsubscribe": ["leave"]}, "optin.lists[0].unsubscribe[0]"),
        ({"consent_text": ""}, "consent_text (or consent_text_file) is missing"),
        ({"consent_text_file": "relative.txt", "consent_text": ""}, "expected an absolute path"),
        ({"colour": "blue"}, "optin.lists[0].colour: unknown key"),
        ({"customer": None}, "optin.lists[0].customer is missing"),
    ],
)
def test_bad_list_entries_are_named(lst, needle):
    base = {
        "id": "news.acme.example",
        "customer": "acme",
        "owner": "news@acme.example",
        "consent_text": "t",
    }
    entry = {k: v for k, v in {**base, **lst}.items() if v is not None}
    assert any(needle in p for p in problems({"lists": [entry]})), problems({"lists": [entry]})


def test_duplicate_list_ids_are_refused():
    e = {
        "id": "News <news.acme.example>",
        "customer": "acme",
        "owner": "n@acme.example",
        "consent_text": "t",
    }
    assert any("an id no other list has" in p for p in problems({"lists": [e, e]}))


def test_consent_text_file(tmp_path):
    f = tmp_path / "consent.txt"
    f.write_text("Weekly tips.\n", encoding="utf-8")
    s = section(
        parse(
            {
                **POLICY,
                "optin": {
                    "lists": [
                        {
                            "id": "tips.acme.example",
                            "customer": "acme",
                            "owner": "t@acme.example",
                            "consent_text_file": str(f),
                        }
                    ]
                },
            }
        )
    )
    assert s.lists[0].consent_text == "Weekly tips."
    missing = problems(
        {
            "lists": [
                {
                    "id": "tips.acme.example",
                    "customer": "acme",
                    "owner": "t@acme.example",
                    "consent_text_file": str(tmp_path / "nope.txt"),
                }
            ]
        }
    )
    assert any("a readable UTF-8 file" in p for p in missing)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("complaint_warning_percent", 0.5, "at most complaint_limit_percent"),
        ("token_lifetime", "1m", "at least 10 minutes"),
        ("confirm_local_part", "con+firm", "a plain local part"),
        ("complaint_addresses", ["abuse"], "an address pattern"),
        ("max_requests", 0, "a whole number >= 1"),
        ("typo", 1, "optin.typo: unknown key"),
    ],
)
def test_bad_thresholds_are_named(key, value, needle):
    assert any(needle in p for p in problems({key: value}))


def test_list_id_forms():
    assert normalise_list_id("Acme News <News.Acme.Example>") == "news.acme.example"
    assert normalise_list_id(" news.acme.example ") == "news.acme.example"


def test_consent_hash_ignores_line_endings():
    assert consent_hash("a\r\nb\n") == consent_hash("a\nb")


def test_shipped_policies_toml_is_valid():
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "maild"),
            "check-config",
            "-c",
            str(root / "policies.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert make_config().sections["optin"].lists
