"""maild's [web] listener in front of a real Postfix: /metrics, one-click unsubscribe,
the subscription and confirmation pages, driven over TCP by curl and urllib.

Customer acme (127.0.0.9) runs the list news.acme.example; subscribers live on
hosted.example, which the test Postfix delivers to Maildirs the test reads.
"""

from __future__ import annotations

import email
import email.policy
import http.cookiejar
import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.clients import swaks
from tests.harness.maild import Maild
from tests.harness.ports import free_port
from tests.integration import test_optin
from tests.integration.conftest import CUSTOMER_IP, STRANGER, front_policy, need

LIST = "news.acme.example"
LISTS = test_optin.LISTS
# The opt-in tests' Postfix: hosted.example and the list domain delivered to Maildirs.
postfix = test_optin.postfix
CONSENT = (
    'Acme News & <Friends>: one message a month about "Acme" products. Unsubscribe at any time.'
)


def policy(downstream: int, web_port: int, **web: object) -> dict:
    p = front_policy(downstream)
    p["postmaster"]["domains"] = [*p["postmaster"]["domains"], LISTS]
    p["optin"] = {
        "lists": [
            {
                "id": LIST,
                "customer": "acme",
                "owner": "news-owner@acme.example",
                "name": "Acme News",
                "domain": LISTS,
                "return_paths": [f"news-bounces+*@{LISTS}"],
                "unsubscribe": [f"news-leave@{LISTS}"],
                "consent_text": CONSENT,
            }
        ]
    }
    p["web"] = {
        "enabled": True,
        "listen": f"127.0.0.1:{web_port}",
        "base_url": f"http://127.0.0.1:{web_port}",
        **web,
    }
    return p


@pytest.fixture(scope="module")
def m(postfix, tmp_path_factory):
    port = free_port()
    md = Maild(
        tmp_path_factory.mktemp("web"), policy(postfix.reinject_port, port, require_one_click=True)
    )
    md.web = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    md.start()
    md.wait_log("web: listening on")
    yield md
    md.stop()


def get(
    url: str,
    opener: urllib.request.OpenerDirector | None = None,
    data: dict[str, str] | None = None,
) -> tuple[int, str]:
    """A GET (a POST with `data`) over TCP; an opener keeps a browser's cookies."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with (opener or urllib.request.build_opener()).open(url, body, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def browser() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


def ledger_rows(m: Maild) -> int:
    r = m.cli("optin", "verify", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return sum(c["rows"] for c in json.loads(r.stdout)["chains"])


def links(message: bytes) -> list[str]:
    body = (
        email.message_from_bytes(message, policy=email.policy.default)
        .get_body(("plain",))
        .get_content()
    )
    return re.findall(r"https?://[^\s<>\"]+", body)


def scrape(url: str) -> dict[str, list]:
    status, text = get(url)
    assert status == 200, text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_after_a_relayed_and_a_rejected_message(postfix, m):
    before = scrape(m.web + "/metrics")
    r = swaks(m.port, frm="someone@outside.example", to="bob@hosted.example", bind=STRANGER)
    assert r.data_code == 250, r.output
    r = swaks(m.port, frm="someone@outside.example", to="partner@outside.example", bind=STRANGER)
    assert r.rcpt_codes and r.rcpt_codes[0] >= 500, r.output
    after = scrape(m.web + "/metrics")
    assert (
        value(after["maild_relayed"], "maild_relayed_total")
        == value(before["maild_relayed"], "maild_relayed_total") + 1
    )
    assert (
        value(after["maild_rejected"], "maild_rejected_total")
        == value(before["maild_rejected"], "maild_rejected_total") + 1
    )
    relay_rejects = value(
        after["maild_decisions"],
        "maild_decisions_total",
        stage="RCPT",
        action="reject",
        rule="relay",
    )
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
    md = Maild(tmp_path, policy(postfix.reinject_port, port, metrics_listen=f"127.0.0.1:{mport}"))
    with md:
        md.wait_log("web: listening on")
        assert "maild_relayed" in scrape(f"http://127.0.0.1:{mport}/metrics")
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 404


def subscribe_by_owner(m: Maild, address: str) -> None:
    r = m.cli("optin", "add", LIST, address, "--source", "paper form", "--obtained", "2024-03-01")
    assert r.returncode == 0, r.stdout + r.stderr


def unsubscribe_url(m: Maild, address: str) -> str:
    r = m.cli("optin", "unsubscribe-url", LIST, address, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["url"]


def list_mail(m: Maild, to: str, url: str):
    local, _, domain = to.partition("@")
    return swaks(
        m.port,
        frm=f"news-bounces+{local}={domain}@{LISTS}",
        to=to,
        bind=CUSTOMER_IP,
        header=[
            f"To: {to}",
            f"List-Id: <{LIST}>",
            "Subject: This month",
            f"List-Unsubscribe: <mailto:news-leave@{LISTS}>, <{url}>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        ],
        body=f"Hello {to}, here is this month's news.\r\n",
    )


def curl_post(url: str, *data: str) -> tuple[int, str]:
    """A real curl POST; `data` as curl's --data-raw values (none: an empty body)."""
    args = [a for d in data for a in ("--data-raw", d)] or ["-X", "POST"]
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_one_click_post_over_tcp_with_and_without_the_exact_body(postfix, m):
    need("curl")
    bob, carol = "bob@hosted.example", "carol@hosted.example"
    subscribe_by_owner(m, bob)
    subscribe_by_owner(m, carol)
    url = unsubscribe_url(m, bob)
    assert url.startswith(m.web + "/unsubscribe/news.acme.example/")
    # require_one_click: maild's URL for the recipient passes, another recipient's does not
    assert list_mail(m, bob, url).data_code == 250
    r = list_mail(m, carol, url)
    assert r.data_code == 550 and "5.7.1" in r.output, r.output
    assert "one-click List-Unsubscribe URL is not the one for <carol@hosted.example>" in r.output
    assert "maild optin unsubscribe-url news.acme.example ADDRESS" in r.output
    m.wait_log("rule=optin-one-click")
    r = list_mail(m, carol, "https://unsubscribe.example/x")
    assert r.data_code == 550 and "has no one-click URL of this provider" in r.output
    # a GET and POSTs without the exact body change nothing
    assert get(url)[0] == 200
    assert curl_post(url)[0] == 400
    assert curl_post(url, "List-Unsubscribe=Yes")[0] == 400
    assert list_mail(m, bob, url).data_code == 250
    # the exact body: revoked at once, the very next message refused, bob told once
    code, page = curl_post(url, "List-Unsubscribe=One-Click")
    assert code == 200 and "is unsubscribed from Acme News" in page
    r = list_mail(m, bob, url)
    assert r.rcpt_codes == [550] and "unsubscribed from list news.acme.example" in r.output
    notices = [
        email.message_from_bytes(b, policy=email.policy.default)
        for b in postfix.wait_for_messages(bob, 3)
    ]
    assert [n["Subject"] for n in notices].count("You have been unsubscribed from Acme News") == 1
    assert state(m, bob) == "revoked"


def test_one_click_refuses_another_https_uri_beside_maild_url(postfix, m):
    """RFC 8058: one HTTPS URI. A mail client posts to one of them, so a second one (the
    customer's own) would take the unsubscribe maild is required to see."""
    dora = "dora@hosted.example"
    subscribe_by_owner(m, dora)
    url = unsubscribe_url(m, dora)
    r = list_mail(m, dora, f"https://track.acme.example/leave?u=dora>, <{url}")
    assert r.data_code == 550 and "5.7.1" in r.output, r.output
    assert "<https://track.acme.example/leave?u=dora>" in r.output
    assert "remove it" in r.output
    # one message to two subscribers with both URLs: either one's click could revoke the other
    fay = "fay@hosted.example"
    subscribe_by_owner(m, fay)
    r = swaks(
        m.port,
        frm=f"news-bounces+all@{LISTS}",
        to=[dora, fay],
        bind=CUSTOMER_IP,
        header=[
            f"To: {dora}, {fay}",
            f"List-Id: <{LIST}>",
            "Subject: This month",
            f"List-Unsubscribe: <mailto:news-leave@{LISTS}>, <{url}>, <{unsubscribe_url(m, fay)}>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        ],
        body="Hello, here is this month's news.\r\n",
    )
    assert r.data_code == 550 and "is not the one for <dora@hosted.example>, <fay" in r.output, (
        r.output
    )
    assert list_mail(m, dora, url).data_code == 250
    assert state(m, dora) == "confirmed"


def test_subscribe_and_confirm_over_http_and_a_get_of_every_link_changes_nothing(
    postfix, m, tmp_path
):
    erin = "erin@hosted.example"
    b = browser()
    status, page = get(f"{m.web}/subscribe/{LIST}", b)
    assert status == 200 and "Acme News &amp; &lt;Friends&gt;: one message" in page
    status, page = get(f"{m.web}/subscribe/{LIST}", b, {"csrf": csrf(page), "address": erin})
    assert status == 200, page
    conf = postfix.wait_for_messages(erin, 1)[-1]
    urls = links(conf)
    [confirm] = [u for u in urls if "/confirm/" in u]
    assert re.fullmatch(rf"{re.escape(m.web)}/confirm/[a-z2-7]{{32}}", confirm)
    assert state(m, erin) == "pending"
    rows = ledger_rows(m)
    # a link scanner: every link of the mail and of maild's pages, fetched three times
    for url in [*urls, f"{m.web}/subscribe/{LIST}", unsubscribe_url(m, erin)] * 3:
        assert get(url)[0] in (200, 404), url
    assert ledger_rows(m) == rows and state(m, erin) == "pending"
    # the person: the button on the confirmation page
    b2 = browser()
    status, page = get(confirm, b2)
    assert status == 200 and 'id="confirm"' in page
    status, page = get(confirm, b2, {"csrf": csrf(page)})
    assert status == 200 and "is now subscribed to Acme News" in page
    assert state(m, erin) == "confirmed"
    r = m.cli("optin", "evidence", erin, "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(json.loads(r.stdout)["path"]) as z:
        names = z.namelist()
        doc = json.loads(z.read("evidence.json"))
        http_files = [n for n in names if n.endswith(".http")]
        assert len(http_files) == 2, names
        raw = b"".join(z.read(n) for n in http_files)
    assert raw.count(b"POST /") == 2 and b"/confirm/TOKEN-SHA256-" in raw
    assert confirm.rsplit("/", 1)[1].encode() not in raw
    assert [e["kind"] for e in doc["events"]] == ["request", "confirm"]
    assert {e["channel"] for e in doc["events"]} == {"web"}


def state(m: Maild, address: str) -> str:
    r = m.cli("optin", "status", address, "--json")
    assert r.returncode == 0, r.stderr
    return {x["list_id"]: x for x in json.loads(r.stdout)}.get(LIST, {}).get("state", "unknown")
