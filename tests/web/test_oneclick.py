"""RFC 8058 one-click unsubscribe: the URL, and the page's GET (never revokes) and POST."""

from __future__ import annotations

from maild.optin.ledger import Ledger
from maild.optin.model import Kind, State
from maild.web import keys, oneclick
from tests.web.conftest import BASE, LIST, as_sent

BOB = "bob@hosted.example"


async def subscribed(site, address: str = BOB) -> str:
    """A confirmed subscriber; returns the path of their one-click URL."""
    await site.optin.ledger.append(
        list_id=LIST,
        address=address,
        kind=Kind.OWNER_ADD,
        channel="cli",
        detail={"attestation": {"source": "t"}},
    )
    await site.optin.refresh()
    key = await site.web.list_key(LIST)
    return oneclick.url(BASE, key, LIST, address).removeprefix("http://127.0.0.1:8025")


async def events(site) -> list:
    return [e for e in await Ledger(site.store).events_of_list(LIST)]


def test_url_names_one_address_on_one_list_and_cannot_be_forged():
    k = bytes(range(32))
    url = oneclick.url(BASE, k, LIST, "Bob@Hosted.example")
    assert url.startswith(BASE + "/unsubscribe/news.acme.example/")
    assert oneclick.parse(BASE, url) == (LIST, BOB, keys.mac(k, LIST, BOB))
    assert oneclick.for_recipient(BASE, k, url, LIST, BOB)
    assert not oneclick.for_recipient(BASE, k, url, LIST, "carol@hosted.example")
    assert not oneclick.for_recipient(BASE, k, url, "deals.other.example", BOB)
    assert not oneclick.for_recipient(BASE, bytes(32), url, LIST, BOB)
    forged = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert not oneclick.for_recipient(BASE, k, forged, LIST, BOB)
    assert oneclick.parse(BASE, "https://elsewhere.example/unsubscribe/a/b/c") is None


async def test_get_shows_a_button_and_changes_nothing(site):
    path = await subscribed(site)
    r = await site.client.get(path)
    text = await r.text()
    assert r.status == 200 and 'name="List-Unsubscribe" value="One-Click"' in text
    assert BOB in text and 'method="post"' in text
    assert [e.kind for e in await events(site)] == [Kind.OWNER_ADD]
    assert site.optin.standing(LIST, BOB).state is State.CONFIRMED


async def test_post_with_the_exact_body_revokes_at_once_with_the_raw_request(site):
    path = await subscribed(site)
    r = await site.client.post(
        path,
        data=b"List-Unsubscribe=One-Click",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Gmail-One-Click/1.0",
        },
    )
    assert r.status == 200, await r.text()
    assert site.optin.standing(LIST, BOB).state is State.REVOKED
    ev = (await events(site))[-1]
    assert ev.kind is Kind.REVOKE and ev.channel == "one-click" and ev.ip == "127.0.0.1"
    assert ev.user_agent == "Gmail-One-Click/1.0" and ev.detail["http"]["method"] == "POST"
    raw = await Ledger(site.store).raw(ev.raw_sha256)
    assert raw.startswith(f"POST {path.rsplit('/', 1)[0]}/MAC-REDACTED HTTP/1.1\r\n".encode())
    assert raw.endswith(b"\r\n\r\nList-Unsubscribe=One-Click")
    # again: nothing more to record, the same answer
    r = await site.client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert r.status == 200 and len(await events(site)) == 2


async def test_multipart_body_is_accepted_too(site):
    path = await subscribed(site)
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("List-Unsubscribe", "One-Click")
    form.add_field("x", "y", filename="x.txt")  # forces multipart/form-data
    r = await site.client.post(path, data=form)
    assert r.status == 200 and site.optin.standing(LIST, BOB).state is State.REVOKED


async def test_post_without_the_one_click_body_changes_nothing(site):
    path = await subscribed(site)
    for body in (b"", b"List-Unsubscribe=one-click", b"unsubscribe=1"):
        r = await site.client.post(
            path, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert r.status == 400 and "nothing was changed" in await r.text()
    assert site.optin.standing(LIST, BOB).state is State.CONFIRMED
    assert len(await events(site)) == 1


async def test_a_forged_or_foreign_link_is_refused_without_a_hint(site):
    path = await subscribed(site)
    carol = keys.encode_address("carol@hosted.example")
    other = path.split("/")
    other[-2] = carol
    for p in ("/".join(other), path[:-2] + "00", path.replace(LIST, "deals.other.example")):
        r = await site.client.post(p, data={"List-Unsubscribe": "One-Click"})
        assert r.status == 404 and "not valid" in await r.text()
    assert site.optin.standing(LIST, BOB).state is State.CONFIRMED


async def test_pages_are_escaped_and_framed_safely(site):
    path = await subscribed(site, "<b>x</b>&@hosted.example")
    r = await site.client.get(path)
    text = await r.text()
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;&amp;@hosted.example" in text
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"


def test_the_documented_recipe_builds_the_same_url():
    """docs/optin.md tells list software how to build the URL; the recipe must agree."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "optin.md").read_text()
    recipe = doc.split("```python\n", 1)[1].split("```", 1)[0]
    key = bytes(range(32))
    scope = {"KEY_HEX": key.hex(), "BASE": BASE}
    exec(recipe, scope)  # noqa: S102  (our own documentation)
    assert scope["url"] == oneclick.url(BASE, key, "news.customer.example", "bob@example.org")


async def test_the_evidence_keeps_no_working_unsubscribe_url(site):
    """The revoke's raw request and detail name the list and address, not the MAC: an
    evidence bundle handed to a third party must not let it unsubscribe the address
    again after a new subscription (the URL never changes). Percent-encoding the MAC
    in the request line must not smuggle it past the redaction."""
    path = await subscribed(site)
    mac = path.rsplit("/", 1)[1]
    sent = path[: -len(mac)] + "".join(f"%{ord(c):02x}" for c in mac)
    r = await site.client.session.post(as_sent(site, sent), data={"List-Unsubscribe": "One-Click"})
    assert r.status == 200 and site.optin.standing(LIST, BOB).state is State.REVOKED
    ev = (await events(site))[-1]
    raw = await Ledger(site.store).raw(ev.raw_sha256)
    encoded = sent.rsplit("/", 1)[1]
    assert mac.encode() not in raw and encoded.encode() not in raw and b"/MAC-REDACTED " in raw
    assert mac not in str(ev.detail) and ev.detail["http"]["path"].endswith("/MAC-REDACTED")
