"""The state is a fold over events; the owner's word never overrides the subscriber's."""

from __future__ import annotations

import pytest

from maild.optin.model import Event, Kind, State, fold, from_iso, iso


def ev(kind: Kind, n: int = 1, channel: str = "web") -> Event:
    return Event(
        list_id="l.example",
        seq=n,
        ts=iso(1_700_000_000 + n),
        address="a@b.example",
        kind=kind,
        channel=channel,
    )


def states(*kinds: Kind, attested_ok: bool = True) -> State:
    return fold([ev(k, i + 1) for i, k in enumerate(kinds)], attested_ok=attested_ok).state


R, C, OWN, IMP, V, X, B = (
    Kind.REQUEST,
    Kind.CONFIRM,
    Kind.OWNER_ADD,
    Kind.IMPORT,
    Kind.REVOKE,
    Kind.COMPLAINT,
    Kind.BOUNCE,
)


@pytest.mark.parametrize(
    "kinds, expected",
    [
        ((), State.UNKNOWN),
        ((R,), State.PENDING),
        ((R, C), State.CONFIRMED),
        ((R, C, R), State.CONFIRMED),  # a new request does not downgrade a subscriber
        ((R, C, V), State.REVOKED),
        ((R, C, V, R), State.PENDING),  # re-subscribing goes through double opt-in again
        ((R, C, V, R, C), State.CONFIRMED),
        ((OWN,), State.CONFIRMED),
        ((IMP,), State.CONFIRMED),
        ((OWN, V, OWN), State.REVOKED),  # the owner cannot re-add someone who left
        ((IMP, X, IMP), State.SUPPRESSED),
        ((OWN, B), State.SUPPRESSED),
        ((OWN, B, R, C), State.CONFIRMED),  # ... only the subscriber's own confirmation can
        ((V,), State.REVOKED),  # a revocation for a stranger is a do-not-mail entry
    ],
)
def test_fold(kinds, expected):
    assert states(*kinds) is expected


def test_attested_consent_off_counts_only_confirmations():
    assert states(OWN, attested_ok=False) is State.PENDING
    assert states(OWN, R, C, attested_ok=False) is State.CONFIRMED
    assert states(R, C, OWN, attested_ok=False) is State.CONFIRMED


def test_standing_remembers_what_decided_it():
    st = fold([ev(R, 1), ev(C, 2, "email"), ev(V, 3, "mailto"), ev(V, 4, "cli")])
    assert (st.state, st.basis, st.channel, st.since) == (
        State.REVOKED,
        "revoke",
        "mailto",
        iso(1_700_000_003),
    )


def test_iso_round_trip():
    t = 1_700_000_000.123456
    assert iso(t) == "2023-11-14T22:13:20.123456Z" and abs(from_iso(iso(t)) - t) < 1e-6
