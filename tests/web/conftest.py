"""The web service over a real SQLite store and opt-in service, served by aiohttp's test
server on loopback (no downstream: confirmation mail is the integration tests' part)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from maild.components import parse
from maild.optin.service import OptinService
from maild.web.app import WebService
from tests.optin import conftest as optin_conftest

POLICY = optin_conftest.POLICY
store = optin_conftest.store  # a real SQLite state store per test
BASE = "http://127.0.0.1:8025/maild"
LIST = "news.acme.example"


def web_config(**web):
    doc = copy.deepcopy(POLICY)
    doc["web"] = {"enabled": True, "base_url": BASE, **web}
    return parse(doc, "/nonexistent/policies.toml")


@pytest.fixture
async def site(store, monkeypatch):
    """(client, web service, opt-in service) for one test."""
    config = web_config()
    optin = OptinService(config, store, None)
    await optin.start()
    daemon = SimpleNamespace(config=config, store=store, optin=optin)
    web = WebService(daemon)
    client = TestClient(TestServer(web.app(pages=True, with_metrics=False)))
    await client.start_server()
    yield SimpleNamespace(client=client, web=web, optin=optin, daemon=daemon, store=store)
    await client.close()
    await optin.stop()


def as_sent(site, path: str) -> URL:
    """The test server's URL for `path`, sent exactly as written: yarl would decode
    %-escapes of unreserved characters, which a client may send all the same."""
    return URL(str(site.client.make_url("/")).rstrip("/") + path, encoded=True)
