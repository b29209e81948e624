"""The block: all mail from a blocked customer is refused, except to postmaster and abuse.

Strikes are recorded by the proxy for any verdict with strike=True; the ladder that
turns them into a warning or a block lives in maild.antispam.sanctions.
"""

from __future__ import annotations

from maild.antispam.notify import provider_addresses
from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict, reject


def _blocked(ctx: Context) -> Verdict | None:
    s = ctx.services.sanctions
    c = ctx.identity.customer
    if s is None or c is None:
        return None
    block = s.blocked.get(c.name)
    if block is None:
        return None
    _, contact = provider_addresses(ctx.config)
    return reject(
        554,
        "5.7.1",
        f"Outbound mail from {c.name} is blocked ({block.reason[:120]}); "
        f"contact {contact} to have it lifted",
        "blocked",
    )


@rule(Stage.RCPT, "blocked")
def blocked_rcpt(ctx: Context) -> Verdict | None:
    return _blocked(ctx)


@rule(Stage.DATA, "blocked")
def blocked_data(ctx: Context) -> Verdict | None:
    """The login may reveal the customer only at end of data (before-queue mode)."""
    return _blocked(ctx)
