"""Open-relay protection: a client that is not a known customer may only send to hosted domains.

"Known" means identified by login or by network (see customer.py); a sender domain is
not enough. Addresses are judged by every domain they could really be routed to
(maild.address.Address.destinations), so percent hacks, bang paths, source routes and
quoted '@'s cannot smuggle a relay past the check.

In before-queue mode the SASL login reaches maild only at end of data (in the Received
header Postfix prepends), so a trusted upstream's recipient outside the hosted domains
is accepted provisionally at RCPT and the whole message is refused at end of data when
no login or network identifies a customer by then.
"""

from __future__ import annotations

from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict, reject


@rule(Stage.RCPT, "relay")
def relay_rcpt(ctx: Context) -> Verdict | None:
    rcpt = ctx.rcpt
    assert rcpt is not None
    if rcpt.is_local_to(ctx.hosted) or ctx.identity.may_relay:
        return None
    if ctx.client.trusted_peer and ctx.config.server.mode == "before-queue":
        ctx.relay_pending.append(rcpt)
        return None
    return reject(
        554,
        "5.7.1",
        f"<{rcpt.addr or rcpt.raw}>: Relay access denied; authenticate "
        "or send from your provider's network to mail outside our domains",
        "relay",
    )


@rule(Stage.DATA, "relay")
def relay_data(ctx: Context) -> Verdict | None:
    if not ctx.relay_pending or ctx.identity.may_relay:
        return None
    who = ", ".join(f"<{a.addr}>" for a in ctx.relay_pending[:3])
    return reject(
        554,
        "5.7.1",
        f"Relay access denied for {who}: no authenticated login or "
        "customer network; authenticate (SMTP AUTH) to mail outside our domains",
        "relay",
    )
