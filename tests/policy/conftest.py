"""Contexts built by hand, so rules are tested as the pure functions they are."""

import pytest

from maild.address import parse_path
from maild.components import parse
from maild.policy.context import Client, Context, Identity
from maild.policy.services import Services

CONFIG = parse(
    {
        "server": {"mode": "front", "limits": {"recipients_per_message": 3}},
        "postmaster": {"domains": ["hosted.example"], "hostnames": ["mx.hosted.example"]},
        "customers": [
            {
                "name": "acme",
                "networks": ["192.0.2.0/24"],
                "logins": ["alice"],
                "domains": ["acme.example"],
                "addresses": ["news@partner.example"],
            }
        ],
    }
)


@pytest.fixture
def config():
    return CONFIG


@pytest.fixture
def services():
    """The services the contexts of one test see (none running unless a test adds one)."""
    return Services()


@pytest.fixture
def make_ctx(services):
    def make(
        *,
        addr="198.51.100.7",
        sender="<x@stranger.example>",
        trusted=False,
        config=CONFIG,
        identity=None,
        mode=None,
    ):
        c = config
        if mode:
            from dataclasses import replace

            c = replace(config, server=replace(config.server, mode=mode))
        ctx = Context(
            config=c,
            session_id="TEST",
            client=Client(addr=addr, trusted_peer=trusted),
            services=services,
        )
        ctx.sender = parse_path(sender)
        ctx.identity = identity or Identity()
        return ctx

    return make
