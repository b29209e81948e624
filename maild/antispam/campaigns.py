"""Campaigns per customer: near-duplicate messages grouped, scored by the Breidbart Index.

BI = sum over the copies of one campaign in the window of sqrt(recipients of that copy):
Usenet's measure of "substantively similar articles", threshold 20. Lookups go through
an LSH index (16 bands of 2 minima), so a message is compared only with campaigns that
share a band, then confirmed by the full 32-slot comparison.

Memory is bounded: at most `max_campaigns` per customer (least recently seen evicted)
and `max_customers` customers (least recently active evicted); a campaign is about
32 ints plus one (time, weight) pair per copy in the window, so 1,000 campaigns of 100
copies cost about 2 MB. State is in memory only: a restart forgets scores, which only
delays a refusal by at most one window (documented in docs/antispam.md).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from maild.textsig import similarity

BANDS, ROWS = 16, 2


@dataclass
class Campaign:
    """Copies in the window, merged per second, with running totals.

    Why: scoring summed every copy in the window, so each message cost O(copies) and a
    campaign that is never refused (confirmed opt-in list mail is exempt) made maild
    quadratic in its size and grew by one tuple per copy: 200,000 copies, 30 MB and
    2 ms per message. Copies accepted in the same second share one entry (they would
    leave the window within the same second anyway), and the totals move with add and
    prune, so scoring is O(1) and memory is bounded by the window in seconds.
    """

    id: int
    sig: tuple[int, ...]
    first_seen: float
    # (second, sum of sqrt(recipients), recipients, copies), oldest first
    copies: deque = field(default_factory=deque)
    total_weight: float = 0.0
    total_recipients: int = 0
    count: int = 0  # copies in the window

    def add_copy(self, now: float, recipients: int) -> None:
        w = math.sqrt(max(recipients, 1))
        sec = float(int(now))
        if self.copies and self.copies[-1][0] == sec:
            _, pw, pn, pk = self.copies[-1]
            self.copies[-1] = (sec, pw + w, pn + recipients, pk + 1)
        else:
            self.copies.append((sec, w, recipients, 1))
        self.total_weight += w
        self.total_recipients += recipients
        self.count += 1

    def prune(self, now: float, window: float) -> None:
        while self.copies and now - self.copies[0][0] > window:
            _, w, n, k = self.copies.popleft()
            self.total_weight -= w
            self.total_recipients -= n
            self.count -= k
        if not self.copies:  # no float drift left behind
            self.total_weight, self.total_recipients, self.count = 0.0, 0, 0

    def score(self) -> float:
        return self.total_weight

    @property
    def recipients(self) -> int:
        return self.total_recipients


def _bands(sig: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
    return [(b, sig[b * ROWS : (b + 1) * ROWS]) for b in range(BANDS)]


class _Customer:
    def __init__(self) -> None:
        self.campaigns: OrderedDict[int, Campaign] = OrderedDict()
        self.index: dict[tuple[int, tuple[int, ...]], set[int]] = {}

    def remove(self, cid: int) -> None:
        c = self.campaigns.pop(cid, None)
        if c is None:
            return
        for band in _bands(c.sig):
            ids = self.index.get(band)
            if ids is not None:
                ids.discard(cid)
                if not ids:
                    del self.index[band]


class Campaigns:
    def __init__(
        self,
        *,
        window: float = 86400.0,
        match: int = 17,
        max_campaigns: int = 1000,
        max_customers: int = 10000,
        clock: Callable[[], float] = time.time,
    ):
        self.window = window
        self.match = match
        self.max_campaigns = max_campaigns
        self.max_customers = max_customers
        self.clock = clock
        self.customers: OrderedDict[str, _Customer] = OrderedDict()
        self._ids = itertools.count(1)

    def find(self, customer: str, sig: tuple[int, ...]) -> Campaign | None:
        cust = self.customers.get(customer)
        if cust is None:
            return None
        candidates: set[int] = set()
        for band in _bands(sig):
            candidates |= cust.index.get(band, set())
        best, best_sim = None, self.match - 1
        now = self.clock()
        for cid in candidates:
            c = cust.campaigns[cid]
            c.prune(now, self.window)
            sim = similarity(sig, c.sig)
            if sim > best_sim:
                best, best_sim = c, sim
        return best

    def score_with(
        self, customer: str, sig: tuple[int, ...], recipients: int
    ) -> tuple[Campaign | None, float]:
        """(matching campaign, its score if this copy were added)."""
        c = self.find(customer, sig)
        base = c.score() if c is not None else 0.0
        return c, base + math.sqrt(max(recipients, 1))

    async def score_async(
        self, customer: str, sig: tuple[int, ...], recipients: int
    ) -> tuple[int, float]:
        """(copies of the matching campaign so far, its score with this copy): what the
        bulk rule asks, also of a worker's campaigns (maild.workers.shared)."""
        c, score = self.score_with(customer, sig, recipients)
        return (c.count if c is not None else 0), score

    def add(self, customer: str, sig: tuple[int, ...], recipients: int) -> Campaign:
        """Count one accepted copy."""
        now = self.clock()
        c = self.find(customer, sig)
        cust = self.customers.get(customer)
        if cust is None:
            cust = self.customers[customer] = _Customer()
            while len(self.customers) > self.max_customers:
                self.customers.popitem(last=False)
        self.customers.move_to_end(customer)
        if c is None:
            c = Campaign(next(self._ids), sig, now)
            cust.campaigns[c.id] = c
            for band in _bands(sig):
                cust.index.setdefault(band, set()).add(c.id)
            while len(cust.campaigns) > self.max_campaigns:
                cust.remove(next(iter(cust.campaigns)))
        cust.campaigns.move_to_end(c.id)
        c.add_copy(now, recipients)
        return c
