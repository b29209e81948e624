"""The order table: which rules run at each SMTP stage, in order, like Postfix's
smtpd_*_restrictions or Mailman 3's chain.

Each stage runs its rules top to bottom; the first refusal (or a final accept:
postmaster) ends the stage. A rule lives in the module of its family and is declared
there with @rule (pipeline.py) or @check (checks.py); adding one is writing it there
and giving it one line here (a new module also gets its name in the import below).
Every declared rule appears exactly once per stage it is declared for: build() checks
that when maild starts (this module is imported by the proxy and by config parsing)
and names the rule that does not.
docs/policies.md shows this table (tests/policy/test_chain.py keeps the two equal).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable, Sequence

from maild.policy import (
    bulk,
    delayed,
    identity,
    limits,
    oneclick,
    optin,
    postmaster,
    ratelimit,
    relay,
    sanctions,
    structure,
)
from maild.policy.checks import HeaderCheck
from maild.policy.context import Stage
from maild.policy.rules import FinishHook, PolicyRule

Entry = PolicyRule | HeaderCheck

TABLE: dict[Stage, tuple[Entry, ...]] = {
    Stage.CONNECT: (),
    Stage.MAIL: (
        identity.helo_invalid,
        identity.helo_ours,
        identity.envelope_owner,
        identity.sender_domain_unknown,
    ),
    Stage.RCPT: (
        limits.recipients_per_message,
        postmaster.postmaster_rcpt,
        delayed.mail_stage,
        sanctions.blocked_rcpt,
        relay.relay_rcpt,
        ratelimit.ratelimit_rcpt,
        optin.optin_rcpt,
    ),
    Stage.DATA: (
        postmaster.postmaster_data,
        sanctions.blocked_data,
        relay.relay_data,
        structure.header_syntax,
        ratelimit.ratelimit_data,
        structure.from_missing,
        structure.from_multiple,
        structure.from_invalid,
        structure.header_duplicate,
        structure.date_missing,
        structure.date_invalid,
        structure.date_future,
        structure.date_past,
        structure.message_id_missing,
        structure.message_id_invalid,
        structure.received_forged,
        identity.helo_invalid,  # again at DATA: the login may name the customer only now
        identity.helo_ours,
        identity.envelope_owner,
        identity.null_sender,
        identity.null_sender_rate,
        identity.from_owner,
        identity.sender_owner,
        identity.reply_to_owner,
        bulk.bulk,
        identity.return_path_owner,
        structure.display_name_spoof,
        identity.sender_domain_unknown,
        optin.optin_data,
        identity.from_domain_unknown,
        oneclick.optin_one_click,
    ),
}

# Run in this order when a transaction ends (pipeline.finish).
FINISH: tuple[FinishHook, ...] = (
    bulk.bulk_finish,
    identity.null_sender_finish,
    optin.optin_finish,
    ratelimit.ratelimit_finish,
)


class ChainError(Exception):
    """The order table and the declared rules disagree."""


def _resolve(stage: Stage, entry: object) -> PolicyRule:
    if isinstance(entry, HeaderCheck):
        if entry.stage is stage:
            return entry.rule
        if stage is Stage.DATA and entry.recheck_rule is not None:
            return entry.recheck_rule
        raise ChainError(
            f"check {entry.name} is listed at {stage} but declared for "
            f"{entry.stage.value}" + (" (and DATA)" if entry.recheck else "")
        )
    if isinstance(entry, PolicyRule):
        if entry.stage is not stage:
            raise ChainError(
                f"rule {entry.name} is listed at {stage} but declared for {entry.stage.value}"
            )
        return entry
    name = getattr(entry, "__name__", repr(entry))
    raise ChainError(f"{name} is listed at {stage} but is not a declared rule (@rule or @check)")


def declared(modules: Iterable[types.ModuleType]) -> dict[tuple[Stage, str], str]:
    """(stage, rule name) -> where it is declared, for every rule in `modules`."""
    out: dict[tuple[Stage, str], str] = {}
    for mod in modules:
        for attr, value in vars(mod).items():
            if isinstance(value, HeaderCheck) and value.fn.__module__ == mod.__name__:
                stages = [value.stage] + ([Stage.DATA] if value.recheck else [])
            elif isinstance(value, PolicyRule) and value.fn.__module__ == mod.__name__:
                stages = [value.stage]
            else:
                continue
            for s in stages:
                out[(s, value.name)] = f"{mod.__name__}.{attr}"
    return out


def build(
    table: dict[Stage, tuple[Entry, ...]], modules: Iterable[types.ModuleType]
) -> dict[Stage, tuple[PolicyRule, ...]]:
    """The pipeline's rules per stage; ChainError names a rule listed twice, listed but
    not declared, or declared (in `modules`) but not listed."""
    chain: dict[Stage, tuple[PolicyRule, ...]] = {}
    listed: set[tuple[Stage, str]] = set()
    for stage in Stage:
        rules = []
        for entry in table.get(stage, ()):
            r = _resolve(stage, entry)
            if (stage, r.name) in listed:
                raise ChainError(f"rule {r.name} is listed twice at {stage}")
            listed.add((stage, r.name))
            rules.append(r)
        chain[stage] = tuple(rules)
    missing = sorted(
        f"{where} ({stage} {name})"
        for (stage, name), where in declared(modules).items()
        if (stage, name) not in listed
    )
    if missing:
        raise ChainError(
            "declared but not in the order table (maild/policy/chain.py): " + ", ".join(missing)
        )
    return chain


def check_finish(hooks: Sequence[FinishHook], modules: Iterable[types.ModuleType]) -> None:
    """Every finish hook declared in `modules` is listed once in `hooks`."""
    names = [h.name for h in hooks]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ChainError("finish hook listed twice: " + ", ".join(dup))
    hooks_in = {
        f"{m.__name__}.{v.fn.__name__}"
        for m in modules
        for v in vars(m).values()
        if isinstance(v, FinishHook) and v.fn.__module__ == m.__name__
    }
    if missing := sorted(hooks_in - set(names)):
        raise ChainError("finish hook declared but not in chain.FINISH: " + ", ".join(missing))


def _families() -> tuple[types.ModuleType, ...]:
    """The modules the table's rules and hooks come from, each once, in table order."""
    names = [e.fn.__module__ for stage in Stage for e in TABLE[stage]] + [
        h.fn.__module__ for h in FINISH
    ]
    return tuple(sys.modules[n] for n in dict.fromkeys(names))


FAMILIES = _families()
CHAIN = build(TABLE, FAMILIES)
check_finish(FINISH, FAMILIES)
# Every forged-header check, by name; its default action is what [headers.checks] and a
# customer's override are validated against (maild.components hands it to the parser).
CHECKS: dict[str, HeaderCheck] = {
    e.name: e for stage in Stage for e in TABLE[stage] if isinstance(e, HeaderCheck)
}
CHECK_DEFAULTS: dict[str, str] = {name: c.default for name, c in CHECKS.items()}


def describe_checks() -> list[dict[str, str]]:
    """Every check, in pipeline order (its own stage's line in the table), for
    check-message and the docs."""
    ordered = [
        c
        for stage in (Stage.MAIL, Stage.DATA)
        for r in CHAIN[stage]
        if (c := CHECKS.get(r.name)) is not None and c.stage is stage
    ]
    return [
        {
            "name": c.name,
            "stage": c.stage.value,
            "scope": c.scope,
            "default": c.default,
            "reply": f"{c.code} {c.status}",
            "summary": c.summary,
        }
        for c in ordered
    ]


def describe() -> list[tuple[str, int, str, str, bool]]:
    """(stage, position, rule, where declared, strike) for every line of the table."""
    rows = []
    for stage in Stage:
        for i, entry in enumerate(TABLE[stage], 1):
            r = _resolve(stage, entry)
            mod = r.fn.__module__ if not isinstance(entry, HeaderCheck) else entry.fn.__module__
            strike = isinstance(entry, HeaderCheck) and entry.strike
            rows.append((stage.value, i, r.name, mod.removeprefix("maild.policy."), strike))
    return rows
