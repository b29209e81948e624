"""The subscription and confirmation pages, over aiohttp's test server and a real store.

What a person (or a link scanner, or another site) can do with them: GETs change
nothing, every POST needs the CSRF pair, both are rate limited, the ledger answers
nothing, and what a POST records carries the raw request (tokens redacted).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

from maild.optin.ledger import Ledger
from maild.optin.model import Kind, State, iso
from maild.optin.tokens import new_token, token_hash
from maild.web import guard
from tests.harness.waits import patience
from tests.web.conftest import LIST, as_sent

PAGE = "/maild/subscribe/" + LIST
CONSENT = "Acme News: one message a month. Leave at any time."


async def events(site, address: str | None = None) -> list:
    evs = await Ledger(site.store).events_of_list(LIST)
    return [e for e in evs if address is None or e.address == address]


async def form(site, path: str) -> str:
    r = await site.client.get(path)
    assert r.status == 200, await r.text()
    return re.search(r'name="csrf" value="([0-9a-f]+)"', await r.text()).group(1)


async def subscribe(site, address: str, **headers: str):
    """A subscribe POST, and the work maild does after answering it."""
    csrf = await form(site, PAGE)
    r = await site.client.post(PAGE, data={"csrf": csrf, "address": address}, headers=headers)
    await settled(site)
    return r


async def settled(site) -> None:
    """Until the opt-in service's background tasks (a subscribe POST's work) are done."""
    while site.optin.tasks:
        await asyncio.gather(*site.optin.tasks)


async def test_form_shows_the_consent_text_and_changes_nothing(site):
    r = await site.client.get(PAGE)
    text = await r.text()
    assert r.status == 200 and f'<div class="consent" id="consent">{CONSENT}</div>' in text
    assert guard.CSRF_COOKIE in r.cookies and r.cookies[guard.CSRF_COOKIE]["samesite"] == "Strict"
    assert await events(site) == []
    missing = await site.client.get("/maild/subscribe/nope.example")
    assert missing.status == 404 and missing.headers["X-Frame-Options"] == "DENY"


async def test_post_records_a_request_with_the_raw_http_request(site):
    r = await subscribe(
        site,
        "Bob@Hosted.example",
        **{"User-Agent": "Firefox/128", "X-Forwarded-For": "198.51.100.7"},
    )
    assert r.status == 200 and "a message asking you to confirm" in " ".join(
        (await r.text()).split()
    )
    [ev] = await events(site)
    assert ev.kind is Kind.REQUEST and ev.channel == "web" and ev.address == "bob@hosted.example"
    assert ev.ip == "198.51.100.7" and ev.user_agent == "Firefox/128"  # via a trusted proxy
    assert ev.detail["http"]["peer"] == "127.0.0.1" and ev.token_hash
    raw = await Ledger(site.store).raw(ev.raw_sha256)
    assert raw.startswith(f"POST {PAGE} HTTP/1.1\r\n".encode())
    assert b"\r\nX-Forwarded-For: 198.51.100.7\r\n" in raw
    assert raw.endswith(b"&address=Bob%40Hosted.example")
    assert site.optin.standing(LIST, "bob@hosted.example").state is State.PENDING


async def test_the_answer_never_tells_who_is_subscribed(site):
    await site.optin.ledger.append(
        list_id=LIST, address="carol@hosted.example", kind=Kind.OWNER_ADD, channel="cli"
    )
    await site.optin.refresh()
    known = await (await subscribe(site, "carol@hosted.example")).text()
    new = await (await subscribe(site, "dave@hosted.example")).text()
    assert known.replace("carol", "X") == new.replace("dave", "X")
    assert len(await events(site, "carol@hosted.example")) == 1  # nothing recorded


async def test_the_answer_comes_before_the_ledger_or_the_mail(site):
    """An address subscribed already is refused without a ledger write or a mail, so an
    answer that waited for them would come several times faster for it (measured on a
    running maild: 2.5 ms against 14 ms): the time would tell who is subscribed. Here
    the store is busy with another writer: the answer must not wait for it."""
    csrf = await form(site, PAGE)
    busy, release = asyncio.Event(), asyncio.Event()

    async def other_writer():
        async with site.store.transaction():
            busy.set()
            await release.wait()

    writer = asyncio.create_task(other_writer())
    await busy.wait()
    try:
        r = await asyncio.wait_for(
            site.client.post(PAGE, data={"csrf": csrf, "address": "jo@hosted.example"}),
            patience(10),
        )
        assert r.status == 200 and "a message asking you to confirm" in " ".join(
            (await r.text()).split()
        )
    finally:
        release.set()
        await writer
    await settled(site)
    assert [e.kind for e in await events(site, "jo@hosted.example")] == [Kind.REQUEST]


async def test_csrf_pair_is_required_and_bound_to_the_page(site):
    for data in (
        {"address": "eve@hosted.example"},
        {"address": "eve@hosted.example", "csrf": "0" * 64},
    ):
        r = await site.client.post(PAGE, data=data)
        assert r.status == 403 and "has expired or did not come from this site" in await r.text()
    token = await form(site, PAGE)
    other = "/maild/subscribe/deals.other.example"
    assert (
        await site.client.post(other, data={"csrf": token, "address": "e@x.example"})
    ).status == 403
    site.client.session.cookie_jar.clear()  # another site's browser: its own cookie or none
    r = await site.client.post(PAGE, data={"csrf": token, "address": "eve@hosted.example"})
    assert r.status == 403 and await events(site) == []


async def test_bad_address_is_named_and_escaped(site):
    r = await subscribe(site, "<script>x</script>")
    text = await r.text()
    assert r.status == 400 and "&lt;script&gt;x&lt;/script&gt; is not an email address" in text
    assert "<script>" not in text and await events(site) == []


async def test_rate_limits_per_client_and_per_address(site):
    for i in range(5):  # address_limit = 5
        assert (
            await subscribe(site, "fred@hosted.example", **{"X-Forwarded-For": f"198.51.100.{i}"})
        ).status == 200
    r = await subscribe(site, "fred@hosted.example", **{"X-Forwarded-For": "198.51.100.99"})
    assert r.status == 429 and r.headers["Retry-After"] == "3600"
    for i in range(20):  # client_limit = 20, from one client
        await subscribe(site, f"x{i}@hosted.example", **{"X-Forwarded-For": "203.0.113.5"})
    r = await subscribe(site, "last@hosted.example", **{"X-Forwarded-For": "203.0.113.5"})
    assert r.status == 429 and not await events(site, "last@hosted.example")


async def test_the_client_limit_counts_an_ipv6_64_as_one_client(site):
    """An IPv6 host has a /64 to choose from: one address per POST must not multiply
    client_limit. Another /64 is another client."""
    for i in range(20):  # client_limit = 20, from one /64
        await subscribe(
            site, f"y{i}@hosted.example", **{"X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"}
        )
    r = await subscribe(site, "last@hosted.example", **{"X-Forwarded-For": "2001:db8:1:2:ffff::1"})
    assert r.status == 429 and not await events(site, "last@hosted.example")
    r = await subscribe(site, "other@hosted.example", **{"X-Forwarded-For": "2001:db8:1:3::1"})
    assert r.status == 200


async def pending(site, address: str = "bob@hosted.example", *, expires: float = 4e9) -> str:
    token = new_token()
    await site.optin.ledger.append(
        list_id=LIST,
        address=address,
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash(token),
        consent_text=CONSENT,
        message_id="<m1@x>",
        detail={"expires": iso(expires)},
    )
    await site.optin.refresh()
    return token


async def test_confirm_get_shows_a_button_and_post_confirms(site):
    token = await pending(site)
    path = f"/maild/confirm/{token}"
    for _ in range(3):  # a link scanner fetching it, again and again
        r = await site.client.get(path)
        assert r.status == 200 and 'id="confirm"' in await r.text()
    assert site.optin.standing(LIST, "bob@hosted.example").state is State.PENDING
    csrf = await form(site, path)
    r = await site.client.post(path, data={"csrf": csrf}, headers={"User-Agent": "Safari/17"})
    assert r.status == 200 and "is now subscribed" in await r.text()
    assert site.optin.standing(LIST, "bob@hosted.example").state is State.CONFIRMED
    ev = (await events(site))[-1]
    assert ev.kind is Kind.CONFIRM and ev.channel == "web" and ev.token_hash == token_hash(token)
    assert ev.detail["request_seq"] == 1 and ev.user_agent == "Safari/17"
    raw = await Ledger(site.store).raw(ev.raw_sha256)
    assert token.encode() not in raw and b"POST /maild/confirm/TOKEN-SHA256-" in raw
    assert token not in str(ev.detail)
    # used: the page says so, and a second POST records nothing
    assert "is now subscribed" in await (await site.client.get(path)).text()
    await site.client.post(path, data={"csrf": csrf})
    assert len(await events(site)) == 2


async def test_confirm_needs_csrf_and_a_good_token(site):
    token = await pending(site)
    r = await site.client.post(f"/maild/confirm/{token}", data={})
    assert r.status == 403
    assert (await site.client.get("/maild/confirm/" + "a" * 32)).status == 404
    old = await pending(site, "gus@hosted.example", expires=1e9)
    r = await site.client.get(f"/maild/confirm/{old}")
    assert r.status == 410 and "expired on 2001-09-09 01:46 UTC" in await r.text()
    assert len(await events(site)) == 2


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    assert guard.client_address("192.0.2.1", ["198.51.100.7"], proxies) == "192.0.2.1"
    assert guard.client_address("10.0.0.2", ["198.51.100.7"], proxies) == "198.51.100.7"
    # the left part is whatever the client sent: the right-most untrusted hop counts
    assert (
        guard.client_address("10.0.0.2", ["1.2.3.4, 198.51.100.7, 10.0.0.9"], proxies)
        == "198.51.100.7"
    )
    assert guard.client_address("10.0.0.2", ["junk"], proxies) == "10.0.0.2"
    assert guard.client_address("10.0.0.2", [], proxies) == "10.0.0.2"
    # a proxy reaching a dual-stack listener over IPv4 is still the trusted proxy, and an
    # IPv4-mapped hop is judged as its IPv4 address, as SMTP judges them (maild.netaddr)
    assert guard.client_address("::ffff:10.0.0.2", ["198.51.100.7"], proxies) == "198.51.100.7"
    assert guard.client_address("10.0.0.2", ["1.2.3.4, ::ffff:10.0.0.9"], proxies) == "1.2.3.4"


def test_limiter_window_slides():
    now = [0.0]
    lim = guard.Limiter(clock=lambda: now[0])
    assert [lim.allow("k", 2, 10) for _ in range(3)] == [True, True, False]
    now[0] = 10.5
    assert lim.allow("k", 2, 10)


async def test_nothing_is_served_or_recorded_while_optin_is_disabled(site):
    from maild.components import parse
    from tests.web.conftest import BASE, POLICY

    site.daemon.config = parse(
        {
            **POLICY,
            "optin": {**POLICY["optin"], "enabled": False},
            "web": {"enabled": True, "base_url": BASE},
        }
    )
    assert (await site.client.get(PAGE)).status == 404
    token = await pending(site)
    assert (await site.client.get(f"/maild/confirm/{token}")).status == 404


async def test_a_store_failure_is_a_503_page_and_records_nothing(site, caplog):
    token = await pending(site, "hal@hosted.example")
    path = f"/maild/confirm/{token}"
    confirm_csrf, csrf = await form(site, path), await form(site, PAGE)
    await site.store.close()  # the state store goes away
    r = await site.client.post(path, data={"csrf": confirm_csrf})
    assert r.status == 503 and r.headers["Retry-After"] == "300"
    assert "nothing was changed" in await r.text() and "Traceback" not in await r.text()
    # a subscribe POST is answered before its work, alike; the failure is logged
    r = await site.client.post(PAGE, data={"csrf": csrf, "address": "hal@hosted.example"})
    assert r.status == 200 and "a message asking you" in " ".join((await r.text()).split())
    await settled(site)
    assert (
        'address=hal@hosted.example result=not-recorded client=127.0.0.1 reason="state '
        "store" in caplog.text
    )
    await site.store.open()
    assert [e.kind for e in await events(site, "hal@hosted.example")] == [Kind.REQUEST]


async def test_the_raw_request_keeps_no_cookie_or_credential(site):
    """maild's pages may sit under a host whose other cookies (a webmail session, path=/)
    the browser sends along: the ledger, and every evidence bundle made from it, must not
    keep them, nor HTTP credentials, nor the CSRF nonce."""
    site.client.session.cookie_jar.update_cookies({"webmail_session": "s3cr3t-session"})
    r = await subscribe(site, "ivy@hosted.example", Authorization="Basic aXZ5OnBhc3N3b3Jk")
    assert r.status == 200
    [ev] = await events(site, "ivy@hosted.example")
    raw = await Ledger(site.store).raw(ev.raw_sha256)
    nonce = site.client.session.cookie_jar.filter_cookies(site.client.make_url(PAGE))[
        guard.CSRF_COOKIE
    ].value
    assert b"s3cr3t-session" not in raw and nonce.encode() not in raw
    assert b"aXZ5OnBhc3N3b3Jk" not in raw and b"\r\nAuthorization: Basic REDACTED\r\n" in raw
    assert b"webmail_session=REDACTED" in raw and b"maild_csrf=REDACTED" in raw


async def test_address_limit_counts_a_mailbox_under_all_its_tags(site):
    """bob+1@, bob+2@ ... all land in bob's mailbox: subscription bombing through
    +tags (and case) is one address to the per-address limit."""
    for i in range(5):  # address_limit = 5
        r = await subscribe(
            site, f"Kim+{i}@hosted.example", **{"X-Forwarded-For": f"198.51.100.{i}"}
        )
        assert r.status == 200
    r = await subscribe(site, "kim+other@Hosted.example", **{"X-Forwarded-For": "198.51.100.9"})
    assert r.status == 429 and not await events(site, "kim+other@hosted.example")
    assert (await subscribe(site, "kimberly@hosted.example")).status == 200


async def test_a_percent_encoded_token_is_redacted_too(site):
    token = await pending(site)
    sent = "/maild/confirm/" + "".join(f"%{ord(c):02x}" for c in token)
    csrf = await form(site, PAGE.replace(f"/subscribe/{LIST}", f"/confirm/{token}"))
    r = await site.client.session.post(as_sent(site, sent), data={"csrf": csrf})
    assert r.status == 200 and "is now subscribed" in await r.text()
    raw = await Ledger(site.store).raw((await events(site))[-1].raw_sha256)
    assert sent.rsplit("/", 1)[1].encode() not in raw and b"/confirm/TOKEN-SHA256-" in raw
