"""Bulk detection: near-duplicate content per customer, scored by the Breidbart Index.

"Excessive posting ... means posting lots of substantively similar articles"; the
threshold (presently 20) comes from the Usenet community's Breidbart Index. A message
whose campaign would reach the threshold with this copy is refused with 550 5.7.1 and a
strike, unless an exemption (confirmed opt-in list mail, added by the opt-in rules)
vouches for it. Only accepted copies count (scored when the downstream said 250).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from dataclasses import dataclass

from maild.config import Reader
from maild.policy.context import Context, Stage
from maild.policy.rules import on_finish, rule
from maild.policy.verdict import Verdict, reject
from maild.textsig import body_text, normalise, signature, volatile_tokens


@dataclass(frozen=True)
class BulkConfig:
    enabled: bool = True
    threshold: float = 20.0
    window: float = 86400.0
    match: int = 17  # of 32 MinHash slots
    max_campaigns: int = 1000
    max_customers: int = 10000


def parse_bulk(r: Reader) -> BulkConfig:
    d = BulkConfig()
    cfg = BulkConfig(
        enabled=r.bool("enabled", d.enabled),
        threshold=r.float("threshold", d.threshold, minimum=1.0),
        window=r.duration("window", "24h", positive=True),
        match=r.int("match", d.match, minimum=1, maximum=32),
        max_campaigns=r.int("max_campaigns", d.max_campaigns, minimum=10),
        max_customers=r.int("max_customers", d.max_customers, minimum=10),
    )
    r.unknown()
    return cfg


# Checks that may vouch for a bulk message (confirmed opt-in list mail); first True wins.
EXEMPTIONS: list[Callable[[Context], bool]] = []


def section(ctx: Context) -> BulkConfig:
    return ctx.config.sections.get("bulk") or BulkConfig()


def message_signature(ctx: Context) -> tuple[int, ...] | None:
    """Computed once per message and kept in ctx.notes."""
    if "bulk-sig" in ctx.notes:
        return ctx.notes["bulk-sig"]  # type: ignore[return-value]
    assert ctx.message is not None
    h = ctx.message.headers
    names = [n for n, _ in email.utils.getaddresses([str(v) for v in h.get_all("To", [])])]
    volatile = volatile_tokens([a.addr for a in ctx.recipients], names)
    m = ctx.message
    sig = signature(normalise(body_text(m.content, plain_body=m.plain_body), volatile))
    ctx.notes["bulk-sig"] = sig
    return sig


@rule(Stage.DATA, "bulk")
async def bulk(ctx: Context) -> Verdict | None:
    campaigns = ctx.services.campaigns
    cfg = section(ctx)
    if campaigns is None or not cfg.enabled or ctx.identity.customer is None or ctx.message is None:
        return None
    sig = message_signature(ctx)
    if sig is None:
        return None
    copies, score = await campaigns.score_async(ctx.identity.name, sig, len(ctx.recipients))
    ctx.notes["bulk-score"] = score
    ctx.notes["bulk-copies"] = copies + 1
    if score < cfg.threshold or any(ex(ctx) for ex in EXEMPTIONS):
        return None
    return reject(
        550,
        "5.7.1",
        f"Bulk mail refused: {ctx.notes['bulk-copies']} substantially "
        f"similar messages (Breidbart index {score:.1f}, limit {cfg.threshold:g} per "
        f"{cfg.window / 3600:g}h) without opt-in evidence; send list mail only to "
        "confirmed subscribers of a registered list",
        "bulk",
        strike=True,
    )


@on_finish
def bulk_finish(ctx: Context, accepted: bool) -> None:
    sig = ctx.notes.get("bulk-sig")
    campaigns = ctx.services.campaigns
    if accepted and isinstance(sig, tuple) and campaigns is not None and ctx.identity.customer:
        campaigns.add(ctx.identity.name, sig, len(ctx.recipients))
