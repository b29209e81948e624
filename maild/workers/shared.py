"""Policy state with workers: one copy, in the supervisor; the workers ask it.

Postfix's anvil(8) idea: the state that must be exact for the whole host lives in one
process, and every smtpd asks it. Here that is the supervisor, and a worker asks over
its channel (maild.workers.ipc):

| state | in the supervisor | a worker |
|---|---|---|
| rate-limit counters | the one `Limiter` (persisted, shared with other nodes on PostgreSQL as before) | `RemoteLimiter`: a reservation is one awaited round trip; commit and release are notices |
| campaigns (bulk) | the one `Campaigns` | `RemoteCampaigns`: the score is a round trip, an accepted copy a notice |
| sanctions | the one `Sanctions`: strikes, the ladder, the control poll | `WorkerSanctions`: blocked customers pushed to it (and acknowledged) before a block or unblock is reported done; a strike is a notice |
| opt-in delivered counts, complaint judgement | the supervisor's `OptinService` | `WorkerOptin` forwards them; its ledger writes tell the other workers to re-read |

A round trip is answered in order with the other frames of the channel, and the
supervisor runs one event loop, so the counters see the workers' reservations one after
the other: the same check-then-reserve as in one process, no increment lost and none
admitted over a limit. A worker that dies (its channel closes) has its reservations
released, as a session that ends without a 250 does. A worker whose supervisor is gone
gets StoreError for every check: its mail is tempfailed (451), never admitted unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from maild.antispam.limiter import Over, Rate, Reservation
from maild.antispam.sanctions import Block, Sanctions
from maild.optin.service import Job, OptinService
from maild.store.base import StoreError
from maild.workers.ipc import Channel, ChannelClosed, RemoteError

if TYPE_CHECKING:
    from maild.antispam.campaigns import Campaigns
    from maild.antispam.limiter import Limiter

log = logging.getLogger("maild.workers")

Check = tuple[str, str, Rate, float]


async def ask(channel: Channel, kind: str, *args: Any) -> Any:
    """A round trip whose failure is the store's kind of failure: the proxy answers
    451 4.3.0 (tempfail), as it does when the state store does not answer."""
    try:
        return await channel.call(kind, *args)
    except (ChannelClosed, RemoteError, TimeoutError) as e:
        raise StoreError(f"shared state (the supervisor): {kind}: {e or type(e).__name__}") from e


def tell(channel: Channel, kind: str, *args: Any) -> None:
    """A notice; none once the channel is closed (the worker said so once, and stops:
    a commit or release for a supervisor that is gone has nobody to count it)."""
    if channel.closed:
        return
    channel.send(kind, *args)


# --------------------------------------------------------------------------- worker side


class RemoteLimiter:
    """The worker's face of the supervisor's Limiter (the calls the rules make)."""

    shared = None  # the supervisor syncs with other nodes, never a worker
    healthy = True

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._ids = itertools.count(1)

    async def try_reserve_async(self, res: Reservation, checks: list[Check]) -> Over | None:
        if not checks:
            return None
        if not res.rid:
            res.rid = next(self._ids)
        return await ask(self.channel, "reserve", res.rid, checks)

    async def check_async(self, key: str, rate: Rate, n: float = 1.0) -> float | None:
        return await ask(self.channel, "check", key, rate, n)

    def commit(self, res: Reservation) -> None:
        self._end(res, "commit")

    def release(self, res: Reservation) -> None:
        self._end(res, "release")

    def _end(self, res: Reservation, kind: str) -> None:
        if res.done:
            return
        res.done = True
        if res.rid:
            tell(self.channel, kind, res.rid)


class RemoteCampaigns:
    """The worker's face of the supervisor's Campaigns."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def score_async(
        self, customer: str, sig: tuple[int, ...], recipients: int
    ) -> tuple[int, float]:
        return await ask(self.channel, "score", customer, sig, recipients)

    def add(self, customer: str, sig: tuple[int, ...], recipients: int) -> None:
        tell(self.channel, "add", customer, sig, recipients)


class WorkerSanctions(Sanctions):
    """Blocked customers as the supervisor last pushed them; strikes go to it."""

    channel: Channel

    def strike_soon(self, customer: str, rule: str, reason: str, session: str = "") -> None:
        if self.settings.enabled:
            tell(self.channel, "strike", customer, rule, reason, session)


class WorkerOptin(OptinService):
    """A worker's opt-in service: standings in memory as in one process; the counts and
    judgements that need every worker's mail are the supervisor's."""

    channel: Channel

    def count_delivered(self, list_id: str, n: int) -> None:
        tell(self.channel, "delivered", list_id, n)

    def judge_complaints(self, list_id: str) -> None:
        tell(self.channel, "judge", list_id)

    async def _run(self, job: Job) -> None:
        await super()._run(job)
        lists = sorted({e.list_id for e in job.written})
        if lists:  # the other workers fold the new rows now, not at the next control row
            tell(self.channel, "optin-written", lists)


class RemoteListKeys:
    """The one-click URL keys ([web] runs in the supervisor)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def list_key(self, list_id: str) -> bytes:
        return await ask(self.channel, "list_key", list_id)


# --------------------------------------------------------------------------- supervisor side


class StateHost:
    """Answers one worker's questions from the supervisor's services."""

    def __init__(
        self,
        limiter: Limiter,
        campaigns: Campaigns,
        sanctions: Sanctions,
        optin: OptinService,
        web: Any,
        others: Callable[[], list[Channel]],
    ) -> None:
        self.limiter, self.campaigns, self.sanctions = limiter, campaigns, sanctions
        self.optin, self.web = optin, web
        self.others = others  # the other workers' channels, for "optin-written"
        self.held: dict[int, Reservation] = {}

    def handle(self, kind: str, args: tuple) -> Any:
        fn = getattr(self, "on_" + kind.replace("-", "_"), None)
        if fn is None:
            raise ValueError(f"unknown request {kind!r}")
        return fn(*args)

    def release_all(self) -> None:
        """The worker is gone: what it reserved was never delivered by it."""
        for res in self.held.values():
            self.limiter.release(res)
        self.held.clear()

    def on_reserve(self, rid: int, checks: list[Check]) -> Any:
        """Over | None; answered at once unless the counters are shared with other nodes
        (then a coroutine: a sync with PostgreSQL may come first)."""
        res = self.held.get(rid)
        if res is None:
            res = self.held[rid] = Reservation()
        if self.limiter.shared is None:
            return self.limiter.try_reserve(res, checks)
        return self.limiter.try_reserve_async(res, checks)

    def on_check(self, key: str, rate: Rate, n: float) -> float | None:
        return self.limiter.check(key, rate, n)

    def on_commit(self, rid: int) -> None:
        res = self.held.pop(rid, None)
        if res is not None:
            self.limiter.commit(res)

    def on_release(self, rid: int) -> None:
        res = self.held.pop(rid, None)
        if res is not None:
            self.limiter.release(res)

    def on_score(self, customer: str, sig: tuple[int, ...], recipients: int) -> tuple[int, float]:
        campaign, score = self.campaigns.score_with(customer, sig, recipients)
        return (campaign.count if campaign else 0), score

    def on_add(self, customer: str, sig: tuple[int, ...], recipients: int) -> None:
        self.campaigns.add(customer, sig, recipients)

    def on_strike(self, customer: str, rule: str, reason: str, session: str) -> None:
        self.sanctions.strike_soon(customer, rule, reason, session)

    def on_delivered(self, list_id: str, n: int) -> None:
        self.optin.count_delivered(list_id, n)

    async def on_judge(self, list_id: str) -> None:
        await self.optin.refresh()  # the complaint the worker just wrote
        self.optin.judge_complaints(list_id)

    def on_optin_written(self, lists: list[str]) -> None:
        for lid in lists:
            self.optin.on_control("optin", lid)
        for ch in self.others():
            push_control(ch, [("optin", lid) for lid in lists])

    async def on_list_key(self, list_id: str) -> bytes:
        if self.web is None:
            raise RuntimeError("[web] is not running")
        return await self.web.list_key(list_id)


def push_control(channel: Channel, rows: list[tuple[str, str]]) -> None:
    with contextlib.suppress(ChannelClosed):
        channel.send("control", rows)


async def push_blocked(channels: list[Channel], blocked: dict[str, Block]) -> int:
    """Every worker's blocked set replaced, each acknowledged; returns how many answered
    (a worker that is starting reads the store itself, after the change was written)."""

    async def one(ch: Channel) -> bool:
        try:
            await ch.call("blocked", dict(blocked))
        except (ChannelClosed, RemoteError, TimeoutError):
            return False
        return True

    return sum(await asyncio.gather(*(one(ch) for ch in channels)))
