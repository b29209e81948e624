"""maild's [web] listener in front of a real Postfix: /metrics, one-click unsubscribe,
the subscription and confirmation pages, driven over TCP by curl and urllib.

Customer acme (127.0.0.9) runs the list news.acme.example; subscribers live on
hosted.example, which the test Postfix delivers to Maildirs the test reads.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.integration import test_optin
from tests.integration.conftest import STRANGER, front_policy

LIST = "news.acme.example"
LISTS = test_optin.LISTS
# The opt-in tests' Postfix: hosted.example and the list domain delivered to Maildirs.
postfix = test_optin.postfix
CONSENT = "Acme News & <Friends>: one message a month about \"Acme\" products. Unsubscribe at any time."


def policy(downstream: int, web_port: int, **web: object) -> dict:
    p = front_policy(downstream)
    p["postmaster"]["domains"] = [*p["postmaster"]["domains"], LISTS]
    p["optin"] = {"lists": [{
        "id": LIST, "customer": "acme", "owner": "news-owner@acme.example", "name": "Acme News",
        "domain": LISTS, "return_paths": [f"news-bounces+*@{LISTS}"],
        "unsubscribe": [f"news-leave@{LISTS}"], "consent_text": CONSENT}]}
    p["web"] = {"enabled": True, "listen": f"127.0.0.1:{web_port}",
                "base_url": f"http://127.0.0.1:{web_port}", **web}
    return p


@pytest.fixture(scope="module")
def m(postfix, tmp_path_factory):
    port = free_port()
    md = Maild(tmp_path_factory.mktemp("web"), policy(postfix.reinject_port, port))
    md.web = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    md.start()
    md.wait_log("web: listening on")
    yield md
    md.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(url: str) -> dict[str, list]:
    status, text = get(url)
    assert status == 200, text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and
               all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_a_relayed_and_a_rejected_message(postfix, m):
    before = scrape(m.web + "/metrics")
    r = swaks(m.port, frm="someone@outside.example", to="bob@hosted.example", bind=STRANGER)
    assert r.data_code == 250, r.output
    r = swaks(m.port, frm="someone@outside.example", to="partner@outside.example", bind=STRANGER)
    assert r.rcpt_codes and r.rcpt_codes[0] >= 500, r.output
    after = scrape(m.web + "/metrics")
    assert value(after["maild_relayed"], "maild_relayed_total") == \
        value(before["maild_relayed"], "maild_relayed_total") + 1
    assert value(after["maild_rejected"], "maild_rejected_total") == \
        value(before["maild_rejected"], "maild_rejected_total") + 1
    relay_rejects = value(after["maild_decisions"], "maild_decisions_total",
                          stage="RCPT", action="reject", rule="relay")
    assert relay_rejects >= 1, after["maild_decisions"]
    assert value(after["maild_store_up"], "maild_store_up") == 1
    assert value(after["maild_store_errors"], "maild_store_errors_total") == 0
    assert value(after["maild_sessions_open"], "maild_sessions_open") == 0
    subs = after["maild_consent_subscribers"]
    assert {s.labels["list"] for s in subs} == {LIST}
    assert "maild_dns_lookups" in after and "maild_downstream_in_use" in after
    assert value(after["maild_customer_blocked"], "maild_customer_blocked", customer="acme") == 0


def test_metrics_on_their_own_address_are_not_on_the_public_listener(postfix, tmp_path):
    port, mport = free_port(), free_port()
    md = Maild(tmp_path, policy(postfix.reinject_port, port,
                                metrics_listen=f"127.0.0.1:{mport}"))
    with md:
        md.wait_log("web: listening on")
        assert "maild_relayed" in scrape(f"http://127.0.0.1:{mport}/metrics")
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 404
