"""One pipeline runs the rules of each SMTP stage, in order.

A rule is a function `rule(ctx) -> Verdict | None` (or a coroutine function, for rules
that must wait on DNS or the store); None means "no opinion". The first verdict that is
not an accept ends the stage; a *final* accept (postmaster) also ends it, so that no
later rule can refuse it. Rules register themselves with @rule in the module named
after their family (maild/policy/relay.py, postmaster.py, ...), as in Mailman 3.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maild.policy.context import Context, Stage
from maild.policy.verdict import Verdict, accept

RuleFn = Callable[[Context], "Verdict | None | Awaitable[Verdict | None]"]


@dataclass(frozen=True)
class Rule:
    name: str
    stage: Stage
    order: int
    fn: RuleFn
    is_async: bool


RULES: dict[Stage, list[Rule]] = {s: [] for s in Stage}

_loaded = False

# Called once when a transaction ends: finish(ctx, accepted) with accepted=True only
# after the downstream took the message (rate limits commit, campaigns count, ...).
FINISH_HOOKS: list[Callable[[Context, bool], None]] = []


def on_finish(fn: Callable[[Context, bool], None]) -> Callable[[Context, bool], None]:
    if fn not in FINISH_HOOKS:
        FINISH_HOOKS.append(fn)
    return fn


def finish(ctx: Context, accepted: bool) -> None:
    """End a transaction exactly once; a hook's failure never affects the others."""
    if ctx.notes.get("finished"):
        return
    ctx.notes["finished"] = True
    for fn in FINISH_HOOKS:
        try:
            fn(ctx, accepted)
        except Exception:
            import logging

            logging.getLogger("maild.policy").exception("finish hook %s failed", fn.__name__)


def rule(stage: Stage, name: str, order: int = 50) -> Callable[[RuleFn], RuleFn]:
    """Register a rule for a stage. Lower order runs first; postmaster runs at 0."""

    def deco(fn: RuleFn) -> RuleFn:
        RULES[stage] = [r for r in RULES[stage] if r.name != name]
        RULES[stage].append(Rule(name, stage, order, fn, inspect.iscoroutinefunction(fn)))
        RULES[stage].sort(key=lambda r: r.order)
        return fn

    return deco


def load_families() -> None:
    """Import every module of maild.policy: each rule family registers its rules."""
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    import maild.policy as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"maild.policy.{mod.name}")
    _loaded = True


async def run(stage: Stage, ctx: Context) -> Verdict:
    """Run the stage's rules; return the deciding verdict (accept when none objects)."""
    ctx.stage = stage
    for r in RULES[stage]:
        v = await r.fn(ctx) if r.is_async else r.fn(ctx)
        if v is None:
            continue
        if not v.accepted or v.final:
            return v
    return accept()
