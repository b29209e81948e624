"""Postmaster acceptance: mail to postmaster (and abuse) is always taken.

RFC 5321 4.5.1 requires <Postmaster@domain> for every domain served and the bare,
case-insensitive <Postmaster>; RFC 2142 adds abuse@. The Demon AUP: "You are required
to accept email addressed to postmaster at your address." So these recipients pass
whatever rate limits or blocks say; they are still relayed and logged.

A transaction is kept either all-postmaster or free of postmaster: the first recipient
decides and a recipient of the other kind gets 452 4.5.3, which makes the client send it
in its own transaction. Otherwise a refusal at end of data (which covers all recipients)
could refuse postmaster mail too.
"""

from __future__ import annotations

from maild.address import Address
from maild.config import Config
from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict, accept, tempfail


def is_postmaster(addr: Address, config: Config) -> bool:
    if addr.route:
        return False
    local = addr.local.lower()
    if not addr.domain:
        return local == "postmaster"
    return local in config.postmaster.local_parts and addr.domain in config.hosted_domains


@rule(Stage.RCPT, "postmaster")
def postmaster_rcpt(ctx: Context) -> Verdict | None:
    assert ctx.rcpt is not None
    pm = is_postmaster(ctx.rcpt, ctx.config)
    if ctx.postmaster_only is not None and ctx.postmaster_only != pm:
        kind = "postmaster/abuse" if pm else "other"
        return tempfail(
            452,
            "4.5.3",
            f"<{ctx.rcpt.addr}>: send mail to {kind} recipients in a separate transaction",
            "postmaster-split",
        )
    return accept("postmaster", final=True, postmaster=True) if pm else None


@rule(Stage.DATA, "postmaster")
def postmaster_data(ctx: Context) -> Verdict | None:
    return accept("postmaster", final=True) if ctx.postmaster_only else None
