"""The hash chain: any change, deletion, insertion or reordering is found and located."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from maild.optin.chain import GENESIS, HASHED, VERSION, Verifier, canonical, row_hash
from maild.optin.model import Event, Kind, iso


def chain(n: int) -> list[Event]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        e = Event(
            list_id="l.example",
            seq=i,
            ts=iso(1_700_000_000 + i),
            address=f"u{i}@x.example",
            kind=Kind.REQUEST if i % 2 else Kind.CONFIRM,
            channel="web",
            ip="192.0.2.1",
            detail={"n": i, "nested": {"b": 1, "a": [1, 2]}},
            prev_hash=prev,
        )
        e = dataclasses.replace(e, hash=row_hash(e, prev))
        out.append(e)
        prev = e.hash
    return out


def verify(events: list[Event], head=None) -> Verifier:
    v = Verifier("l.example")
    for e in events:
        v.feed(e)
    v.check_head(
        head if head is not None else (events[-1].seq, events[-1].hash) if events else None
    )
    return v


def test_intact_chain_verifies():
    c = chain(5)
    v = verify(c)
    assert v.ok and v.head == (5, c[-1].hash) and v.rows == 5


def test_hash_is_reproducible_from_the_documented_recipe():
    e = chain(1)[0]
    doc = {k: (str(getattr(e, k)) if k == "kind" else getattr(e, k)) for k in HASHED}
    doc["v"] = VERSION
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert text == canonical(e)
    assert hashlib.sha256((GENESIS + "\n" + text).encode()).hexdigest() == e.hash


def test_altered_field_is_located():
    c = chain(5)
    c[2] = dataclasses.replace(c[2], ip="203.0.113.9")
    v = verify(c)
    assert not v.ok and v.bad_seqs == {3}
    assert "seq=3: request event for u3@x.example was altered" in str(v.breaks[0])


def test_altered_and_rehashed_row_breaks_the_next_link():
    c = chain(5)
    forged = dataclasses.replace(c[2], ip="203.0.113.9")
    c[2] = dataclasses.replace(forged, hash=row_hash(forged, forged.prev_hash))
    v = verify(c)
    assert not v.ok and 4 in v.bad_seqs and "previous-hash link broken" in str(v.breaks[0])


def test_deleted_row_is_found():
    c = chain(5)
    del c[1]
    v = verify(c)
    assert not v.ok and any("row(s) 2 missing" in str(b) for b in v.breaks)


def test_reordered_rows_are_found():
    c = chain(4)
    c[1], c[2] = c[2], c[1]
    assert not verify(c).ok


def test_truncated_chain_is_found_by_the_recorded_head():
    c = chain(5)
    v = verify(c[:3], head=(5, c[-1].hash))
    assert not v.ok and "recorded head is seq 5" in str(v.breaks[-1])


def test_detail_key_order_does_not_matter():
    e = chain(1)[0]
    e2 = dataclasses.replace(e, detail={"nested": {"a": [1, 2], "b": 1}, "n": 1})
    assert row_hash(e, GENESIS) == row_hash(e2, GENESIS)


def as_row(e: Event) -> tuple:
    from maild.optin.chain import detail_json

    return (
        e.list_id,
        e.seq,
        e.ts,
        e.address,
        str(e.kind),
        e.channel,
        e.actor,
        e.ip,
        e.user_agent,
        e.consent_hash,
        e.token_hash,
        e.message_id,
        e.raw_sha256,
        detail_json(e.detail),
        e.prev_hash,
        e.hash,
    )


def test_fast_row_hashing_matches_the_definition():
    from maild.optin.chain import canonical_row

    e = dataclasses.replace(
        chain(1)[0],
        actor='Jörg "quoted" \\ <j@x>',
        user_agent="Mozilla/5.0 ☃",
        detail={"z": "ü", "a": {"k": [1, "two", None, True]}, "n": 3},
    )
    assert canonical_row(*as_row(e)[:14]) == canonical(e)


def test_stored_rows_verify_like_events():
    c = chain(4)
    v = Verifier("l.example")
    assert all(v.feed_row(as_row(e)) for e in c)
    bad = list(as_row(c[3]))
    bad[13] = '{"n": 4, "nested": {"a": [1, 2], "b": 1}}'  # same data, not canonical: altered
    v = Verifier("l.example")
    for r in [as_row(e) for e in c[:3]] + [tuple(bad)]:
        v.feed_row(r)
    assert v.bad_seqs == {4}
