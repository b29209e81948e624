"""Forged-header checks: the framework, [headers] in policies.toml, and the structure checks.

"Forging headers ... means sending email such that its origin appears to be another user
or machine, or a non-existent machine" (Demon AUP). Every check here has a name, a
default action (reject, tempfail, tag or off) that [headers.checks] and a customer's
[customers.headers.checks] override, and a reason the sender can act on. In tag mode
(`mode = "tag"`, globally or per customer) nothing is refused: the message is relayed
with an X-Maild-Verdict: line per failed check, so an operator can trial a check first.

Who is checked: mail *submitted by a customer* (identified by login or network: a sender
domain alone proves nothing) gets every check. Mail from anyone else (inbound mail from
the internet to hosted domains) gets none by default, or the checks of scope "any"
(structure, display name, DNS, HELO) with `apply_to = "all"`; ownership checks never apply
to it.

This module is [headers] and [customers.headers]; the check framework is checks.py, the
structure and display-name checks structure.py, the ownership, HELO, null-sender and DNS
checks identity.py; where each check runs is its line in chain.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from maild import config as cfg
from maild.antispam.limiter import Rate
from maild.policy.context import Context

CHECK_ACTIONS = ("reject", "tempfail", "tag", "off")
MODES = ("enforce", "tag")
APPLY_TO = ("customers", "all")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HeaderSettings:
    enabled: bool = True  # false: no forged-header check runs at all
    mode: str = "enforce"
    apply_to: str = "customers"
    # check name -> action, overriding the check's default
    checks: dict[str, str] = field(default_factory=dict, hash=False)
    date_future: float = 2 * 3600.0  # rspamd DATE_IN_FUTURE: > 2 h
    date_past: float = 7 * 86400.0  # mail may sit in an offline outbox or a queue for days
    max_line_length: int = 998  # RFC 5322 2.1.1
    # bounces/auto-replies with MAIL FROM:<> per customer, [ratelimit] syntax
    null_sender_rate: Rate = Rate.parse("30/1h")
    helo_for_logins: bool = False  # MUAs behind NAT send [192.168.x.y] or a bare PC name
    own_names: tuple[str, ...] = ()  # ours, besides server.hostname and [postmaster]


@dataclass(frozen=True)
class CustomerHeaders:
    """A customer's [customers.headers]: its own mode and per-check actions."""

    mode: str = ""  # "" = the global mode
    checks: dict[str, str] = field(default_factory=dict, hash=False)


DEFAULTS = HeaderSettings()


def _check_actions(r: cfg.Reader, checks: Mapping[str, str]) -> dict[str, str]:
    """[... .checks]: check name = action; unknown names are errors, not silence.
    `checks`: every check's name and default action (maild.policy.chain.CHECK_DEFAULTS)."""
    out: dict[str, str] = {}
    for name in list(r.table):
        if name not in checks:
            r.seen.add(name)
            r.problems.append(
                f"{r.key(name)}: unknown check; known checks: " + ", ".join(sorted(checks))
            )
            continue
        out[name] = r.str(name, checks[name], choices=CHECK_ACTIONS)
    r.unknown()
    return out


def parse_headers(r: cfg.Reader, checks: Mapping[str, str]) -> HeaderSettings:
    d = DEFAULTS
    s = HeaderSettings(
        enabled=r.bool("enabled", d.enabled),
        mode=r.str("mode", d.mode, choices=MODES),
        apply_to=r.str("apply_to", d.apply_to, choices=APPLY_TO),
        checks=_check_actions(r.table_of("checks"), checks),
        date_future=r.duration("date_future", "2h"),
        date_past=r.duration("date_past", "7d"),
        max_line_length=r.int("max_line_length", d.max_line_length, minimum=78, maximum=100000),
        null_sender_rate=_rate(r, "null_sender_rate", d.null_sender_rate),
        helo_for_logins=r.bool("helo_for_logins", d.helo_for_logins),
        own_names=r.domains("own_names"),
    )
    r.unknown()
    return s


def _rate(r: cfg.Reader, name: str, default: Rate) -> Rate:
    value = r.str(name, default.text)
    try:
        return Rate.parse(value)
    except ValueError:
        r.error(name, value, 'a rate such as "30/1h" (messages per period)')
        return default


def parse_customer_headers(r: cfg.Reader, checks: Mapping[str, str]) -> CustomerHeaders:
    if not r.has("headers"):
        r.seen.add("headers")
        return CustomerHeaders()
    t = r.table_of("headers")
    mode = t.str("mode", choices=MODES) if t.has("mode") else ""
    actions = _check_actions(t.table_of("checks"), checks)
    t.unknown()
    return CustomerHeaders(mode, actions)


def settings(ctx: Context) -> HeaderSettings:
    s = ctx.config.sections.get("headers")
    return s if isinstance(s, HeaderSettings) else DEFAULTS
