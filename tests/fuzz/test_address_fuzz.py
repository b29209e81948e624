"""Property tests of SMTP path parsing (maild.address): no crash, nothing lost, and the
relay property: an address with any reading that leaves the hosted domains is never
judged local, whatever mix of source routes, percent hacks, bang paths, quoted '@'s and
case tricks hides it.

These call the pure functions directly; tests/fuzz/test_open_relay.py checks the same
property end to end against a real Postfix.
"""

from __future__ import annotations

import contextlib

from hypothesis import example, given
from hypothesis import strategies as st

from maild.address import PathError, canonical, parse_params, parse_path, split_arg
from tests.fuzz.budget import budget
from tests.fuzz.strategies import HOSTED, any_path, hidden_hop_path, hosted_domains, params

HOSTED_SET = frozenset(HOSTED)
MANY = budget(400)


@MANY
@given(
    st.one_of(
        any_path(),
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    )
)
@example("<" + "@a," * 5000 + "@b:c@d>")
@example('<"' + "\\" * 10001 + '"@x>')
@example("<" * 10000)
def test_parsing_raises_only_path_error_and_keeps_the_raw_path(arg: str) -> None:
    try:
        path, rest = split_arg(arg)
        a = parse_path(path)
    except PathError:
        return
    assert a.raw == path
    assert a.domain == a.domain.lower() and not a.domain.endswith(".")
    dests = a.destinations()
    assert a.domain in dests and set(a.route) <= dests
    # is_local_to agrees with destinations(), by definition
    assert a.is_local_to(HOSTED_SET) == (dests <= HOSTED_SET)
    with contextlib.suppress(PathError):
        parse_params(rest)


@MANY
@given(hidden_hop_path())
@example(("<@outside.example:u@hosted.example>", "outside.example"))
@example(('<"u@outside.example"@hosted.example>', "outside.example"))
@example(("<u%outside.example@HOSTED.EXAMPLE.>", "outside.example"))
def test_a_hidden_foreign_hop_is_never_local(case: tuple[str, str]) -> None:
    path, hop = case
    a = parse_path(path)
    assert not a.is_local_to(HOSTED_SET), (path, a)
    assert hop.strip().rstrip(".").lower() in a.destinations(), (path, a.destinations())


@MANY
@given(hidden_hop_path(hop=hosted_domains))
def test_hops_among_hosted_domains_stay_local(case: tuple[str, str]) -> None:
    """The converse, so the property above cannot pass by refusing everything."""
    a = parse_path(case[0])
    assert a.is_local_to(HOSTED_SET), (case, a.destinations())


@MANY
@given(params)
def test_params_parse_or_raise_path_error(p: str) -> None:
    try:
        out = parse_params(p)
    except PathError:
        return
    assert out == p.split()


@MANY
@given(
    st.text(max_size=40).map(lambda s: s.replace("@", "")),
    st.text(max_size=30).map(lambda s: s.replace("@", "")).filter(lambda d: d.strip(".")),
)
def test_canonical_is_idempotent(local: str, domain: str) -> None:
    """For mailboxes with a domain. (Degenerate input is not: 'x@@' -> 'x@' -> 'x', and
    'x@.' -> 'x@' -> 'x'; harmless, such recipients cannot be delivered.)"""
    addr = f"{local}@{domain}"
    c = canonical(addr)
    assert canonical(c) == c
