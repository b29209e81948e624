"""The evidence bundle and `verify`: everything for one address, tampering found."""

from __future__ import annotations

import json
import zipfile

from maild.optin import actions
from maild.optin.evidence import build, verify_all
from maild.optin.ledger import pack
from maild.optin.model import Kind
from maild.optin.registry import Registry
from maild.optin.settings import section
from tests.optin.conftest import CONSENT

LIST = "news.acme.example"


async def history(ledger, config) -> None:
    lst = section(config).lists[0]
    res = await actions.request(
        ledger,
        config,
        None,
        lst,
        "Bob@Example.org",
        ip="198.51.100.7",
        user_agent="Mozilla/5.0",
        evidence=b"POST /subscribe bob\n",
    )
    await ledger.append(
        list_id=LIST,
        address="bob@example.org",
        kind=Kind.CONFIRM,
        channel="email",
        token_hash=res.event.token_hash,
        consent_hash=res.event.consent_hash,
        raw=b"From: bob@example.org\r\nSubject: Re: confirm\r\n\r\nyes\r\n",
    )
    await ledger.append(
        list_id=LIST, address="someone@example.org", kind=Kind.REQUEST, channel="web"
    )
    await actions.revoke(
        ledger,
        config,
        None,
        lst,
        "bob@example.org",
        channel="one-click",
        actor="web:shop",
        ip="198.51.100.8",
    )


async def test_bundle_holds_every_event_and_message(ledger, config, tmp_path):
    await history(ledger, config)
    reg = Registry.build(section(config), [])
    b = await build(ledger, config, "BOB@example.org", out_dir=tmp_path, registry=reg)
    assert b.path.parent == tmp_path and b.path.name.startswith("optin-evidence-bob@example.org-")
    assert b.path.stat().st_mode & 0o777 == 0o600
    with zipfile.ZipFile(b.path) as z:
        doc = json.loads(z.read("evidence.json"))
        names = set(z.namelist())
        assert (
            z.read("consent/" + doc["events"][0]["consent_hash"] + ".txt").decode().strip()
            == CONSENT
        )
        assert "How to check a row yourself" in z.read("README.txt").decode()
        req = doc["events"][0]
        assert z.read(req["raw_file"]) == b"POST /subscribe bob\n"
        sent = [n for n in names if n.endswith("-confirmation-sent.eml")]
        assert len(sent) == 1 and b"Please confirm your subscription" in z.read(sent[0])
    assert [e["kind"] for e in doc["events"]] == ["request", "confirm", "revoke"]
    assert doc["verified"] and doc["lists"][0]["state"] == "revoked"
    assert doc["lists"][0]["chain"]["rows"] == 4  # the whole chain, other addresses too
    assert doc["events"][2]["channel"] == "one-click" and doc["events"][2]["ip"] == "198.51.100.8"
    assert all(
        e["row_hash_ok"] and e["chain_ok"] and e["raw_intact"] is not False for e in doc["events"]
    )


async def test_verify_finds_altered_rows_raw_messages_and_truncation(ledger, config, store):
    await history(ledger, config)
    assert (await verify_all(ledger)).ok
    await store.execute("UPDATE optin_events SET actor = 'forged' WHERE seq = 2")
    r = await verify_all(ledger)
    assert not r.ok and any(
        "seq=2: confirm event for bob@example.org was altered" in b for b in r.chains[0].breaks
    )
    await store.execute(
        "UPDATE optin_raw SET data = ? WHERE size = 20", (pack(b"POST /subscribe eve\n"),)
    )
    assert any("was altered" in p for p in (await verify_all(ledger)).raw_problems)


async def test_truncated_chain_is_caught_by_its_head(ledger, config, store):
    await history(ledger, config)
    await store.execute("DELETE FROM optin_events WHERE seq = 4")
    r = await verify_all(ledger)
    assert not r.ok and "recorded head is seq 4" in r.chains[0].breaks[-1]


async def test_bundle_for_a_stranger_says_there_is_nothing(ledger, config, tmp_path):
    b = await build(ledger, config, "nobody@example.org", out_dir=tmp_path)
    assert b.doc["events"] == [] and b.doc["lists"] == []
