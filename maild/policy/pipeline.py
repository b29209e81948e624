"""One pipeline runs the rules of each SMTP stage, in the order maild/policy/chain.py lists.

A rule is a function `rule(ctx) -> Verdict | None` (or a coroutine function, for rules
that must wait on DNS or the store), declared with @rule in the module of its family
(maild/policy/relay.py, postmaster.py, ...); None means "no opinion". The first verdict
that is not an accept ends the stage; a *final* accept (postmaster) also ends it, so
that no later rule can refuse it.

A front end (the SMTP proxy, or a milter) drives one transaction with mail(), rcpt(),
rcpt_done(), data() and finish(); it never reads or writes the context's bookkeeping
(the delayed MAIL verdict, the accepted recipients, relay_pending) itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from maild.address import Address
from maild.policy.chain import CHAIN, FINISH
from maild.policy.context import Context, Message, Stage
from maild.policy.rules import FinishHook, PolicyRule
from maild.policy.verdict import Verdict, accept

log = logging.getLogger("maild.policy")


async def run(stage: Stage, ctx: Context, rules: Sequence[PolicyRule] | None = None) -> Verdict:
    """Run the stage's rules; return the deciding verdict (accept when none objects)."""
    if rules is None:
        rules = CHAIN[stage]
    ctx.stage = stage
    for r in rules:
        v = await r.fn(ctx) if r.is_async else r.fn(ctx)  # type: ignore[misc]
        if v is None:
            continue
        assert isinstance(v, Verdict)
        if not v.accepted or v.final:
            return v
    return accept()


# ---------------------------------------------------------------------- one transaction


async def mail(ctx: Context) -> None:
    """MAIL: never refused here. A refusal is kept and given at RCPT by the mail-stage
    rule, after postmaster (Postfix's smtpd_delay_reject), so postmaster still gets mail."""
    v = await run(Stage.MAIL, ctx)
    if not v.accepted:
        ctx.mail_verdict = v


async def rcpt(ctx: Context, address: Address) -> Verdict:
    """RCPT: the verdict on one recipient; rcpt_done() says what the downstream made of it."""
    ctx.rcpt = address
    return await run(Stage.RCPT, ctx)


def rcpt_done(ctx: Context, address: Address, v: Verdict, *, relayed: bool) -> None:
    """After an accepted RCPT verdict: relayed=True when the downstream took the recipient
    too. The first recipient decides whether the transaction is all-postmaster."""
    if relayed:
        ctx.recipients.append(address)
        if ctx.postmaster_only is None:
            ctx.postmaster_only = v.postmaster
    elif address in ctx.relay_pending:
        ctx.relay_pending.remove(address)


async def data(ctx: Context, message: Message) -> Verdict:
    """End of data: the verdict on the message for all accepted recipients."""
    ctx.message = message
    return await run(Stage.DATA, ctx)


def finish(ctx: Context, accepted: bool, hooks: Sequence[FinishHook] | None = None) -> None:
    """End a transaction exactly once; a hook's failure never affects the others."""
    if ctx.finished:
        return
    ctx.finished = True
    if hooks is None:
        hooks = FINISH
    for hook in hooks:
        try:
            hook(ctx, accepted)
        except Exception:
            log.exception("finish hook %s failed", hook.fn.__name__)
