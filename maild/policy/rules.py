"""How a rule family declares its rules and finish hooks (maild/policy/chain.py orders them).

A rule is a function `rule(ctx) -> Verdict | None` (or a coroutine function, for rules
that must wait on DNS or the store); None means "no opinion". Declaring is kept apart
from running (maild.policy.pipeline), which needs the order table, which needs the
families: so the families import this module, never the pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maild.policy.context import Context, Stage
from maild.policy.verdict import Verdict

RuleFn = Callable[[Context], "Verdict | None | Awaitable[Verdict | None]"]
FinishFn = Callable[[Context, bool], None]


@dataclass(frozen=True)
class PolicyRule:
    """A pipeline rule: its name (in the log and the order table), stage and function."""

    name: str
    stage: Stage
    fn: RuleFn
    is_async: bool

    def __call__(self, ctx: Context) -> Verdict | None | Awaitable[Verdict | None]:
        return self.fn(ctx)


@dataclass(frozen=True)
class FinishHook:
    """Called once when a transaction ends: accepted=True only after the downstream took
    the message (rate limits commit, campaigns count, ...)."""

    fn: FinishFn

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__name__}"

    def __call__(self, ctx: Context, accepted: bool) -> None:
        self.fn(ctx, accepted)


def rule(stage: Stage, name: str) -> Callable[[RuleFn], PolicyRule]:
    """Declare a rule; its place in the stage is its line in maild/policy/chain.py."""

    def deco(fn: RuleFn) -> PolicyRule:
        return PolicyRule(name, stage, fn, inspect.iscoroutinefunction(fn))

    return deco


def on_finish(fn: FinishFn) -> FinishHook:
    """Declare a finish hook; chain.FINISH lists the hooks in the order they run."""
    return FinishHook(fn)
