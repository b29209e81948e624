"""A policy with two registered lists and a real SQLite state store per test."""

from __future__ import annotations

import pytest

from maild.components import open_store, parse
from maild.optin.ledger import Ledger

CONSENT = "Acme News: one message a month. Leave at any time."

POLICY = {
    "server": {"mode": "front", "hostname": "mx.hosted.example"},
    "postmaster": {"domains": ["hosted.example", "lists.hosted.example"]},
    "customers": [
        {"name": "acme", "networks": ["192.0.2.0/24"], "domains": ["acme.example"]},
        {"name": "other", "networks": ["198.51.100.0/24"]},
    ],
    "optin": {
        "complaint_min_volume": 100,
        "lists": [
            {
                "id": "news.acme.example",
                "customer": "acme",
                "owner": "news@acme.example",
                "name": "Acme News",
                "domain": "lists.hosted.example",
                "return_paths": ["news-bounces+*@lists.hosted.example", "news@acme.example"],
                "unsubscribe": [
                    "news-leave@lists.hosted.example",
                    "news-leave+*@lists.hosted.example",
                ],
                "consent_text": CONSENT,
            },
            {
                "id": "deals.other.example",
                "customer": "other",
                "owner": "deals@other.example",
                "domain": "lists.hosted.example",
                "return_paths": ["deals-bounces@lists.hosted.example"],
                "consent_text": "Deals from Other.",
            },
        ],
    },
}


def make_config(**optin):
    """The policy; other rule families that judge message headers are turned off, so that
    these tests see the opt-in rules alone (tests/integration sees them all together)."""
    import copy

    doc = copy.deepcopy(POLICY)
    doc["optin"].update(optin)
    doc["headers"] = {"enabled": False}
    return parse(doc, "/nonexistent/policies.toml")


@pytest.fixture
def config():
    return make_config()


@pytest.fixture
async def store(tmp_path):
    s = await open_store(str(tmp_path / "state.db"))
    yield s
    await s.close()


@pytest.fixture
def ledger(store):
    return Ledger(store)
