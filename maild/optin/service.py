"""The daemon's view of the ledger: every recipient's standing in memory, writes queued.

The proxy asks for a recipient's standing at every RCPT of list mail, so nothing on that
path touches the store: standings, pending tokens and complaint counts are folded from
the ledger at start and kept up to date by folding new rows (by id) whenever the CLI
signals a change through the `control` table, and after every write of our own.

Events that mail produced (a confirmation reply, an unsubscribe, a complaint, a bounce)
are recorded only once Postfix accepted that mail (the finish hook), by one writer task
in arrival order. Their effect is immediate: until the row is in the store, an
*overlay* applies it to the standing, so a revocation is honoured for the very next
message. A store failure is retried with backoff, never dropped silently; rows still
queued at shutdown are logged with enough detail to record them by hand.

Wiring (maild/daemon.py):

    from maild.optin.service import OptinService
    svc = OptinService(config, store, downstream, sanctions=daemon.sanctions)
    await svc.start()
    daemon.services.optin = svc
    ...
    await svc.stop()          # before the downstream and the store are closed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from maild.config import Config
from maild.log import clean
from maild.optin.actions import log_event
from maild.optin.ledger import Ledger
from maild.optin.model import Event, Kind, Standing, apply, effective, from_iso, iso
from maild.optin.registry import Registry
from maild.optin.settings import ListConfig, OptinConfig, section
from maild.optin.tokens import token_hash
from maild.store.base import Store, StoreError

if TYPE_CHECKING:
    from maild.antispam.sanctions import Sanctions

log = logging.getLogger("maild.optin")

PAGE = 50000
_KINDS = {k.value: k for k in Kind}
_NOBODY = Standing()
TOKEN_KEEP = 7 * 86400.0  # expired tokens are remembered this long, for a clear refusal


@dataclass
class Token:
    list_id: str
    address: str
    expires: float
    message_id: str
    request_seq: int
    consent_hash: str
    used: bool = False


@dataclass
class Job:
    """Events to append, in order, and what to do once they are written."""

    what: str
    events: list[dict[str, Any]]
    after: Callable[[list[Event]], Awaitable[None]] | None = None
    written: list[Event] = field(default_factory=list)
    done: bool = False


Key = tuple[str, str]


class OptinService:
    def __init__(
        self,
        config: Config,
        store: Store,
        downstream: Any = None,
        *,
        clock: Callable[[], float] = time.time,
        sanctions: Sanctions | None = None,
    ):
        self.config = config
        self.sanctions = sanctions  # strikes for complaints; its control-table watch
        self.store = store
        self.ledger = Ledger(store)
        self.downstream = downstream
        self.clock = clock
        self.standings: dict[Key, Standing] = {}
        self.tokens: dict[str, Token] = {}
        self.complaints: dict[str, list[float]] = defaultdict(list)
        self.delivered: dict[str, dict[int, int]] = defaultdict(dict)
        self.unflushed: dict[tuple[str, int], int] = defaultdict(int)
        self.overlay: dict[Key, list[tuple[Kind, str, str, Job]]] = {}
        self.stored_lists: list[ListConfig] = []
        self.last_id = 0
        self.kinds: Counter[Kind] = Counter()  # ledger events by kind, for /metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self._reg: Registry | None = None
        self._reg_for: tuple[Config, int] | None = None
        self._lists_version = 0
        self._refresh_lock = asyncio.Lock()
        self._looked_again = 0.0  # when a refusal last re-read the ledger
        self._dirty = False
        self._lists_dirty = False
        self._warned: dict[str, float] = {}
        self._worker: asyncio.Task | None = None
        self._current: Job | None = None
        self._house: asyncio.Task | None = None
        self._own_poll = False
        self._last_control = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def settings(self) -> OptinConfig:
        return section(self.config)

    async def start(self) -> None:
        await self.reload_lists()
        await self.refresh()
        await self._load_delivered()
        sanctions = self.sanctions
        if sanctions is not None:
            sanctions.on_control.append(self.on_control)
        else:  # no sanctions service: watch the control table ourselves
            self._own_poll = True
            row = await self.store.fetchone("SELECT COALESCE(MAX(id), 0) FROM control")
            self._last_control = int(row[0]) if row else 0
        loop = asyncio.get_running_loop()
        self._worker = loop.create_task(self._work())
        self._house = loop.create_task(self._housekeep())
        reg = self.registry()
        log.info(
            "optin: lists=%d subscribers=%d events=%d tokens=%d",
            len(reg.lists),
            len(self.standings),
            self.last_id,
            len(self.tokens),
        )

    async def stop(self, grace: float = 10.0) -> None:
        if self._house is not None:
            self._house.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), grace)
        current = self._current  # the job being retried, off the queue already
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        left = [current] if current is not None and not current.done else []
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        for job in left:
            for kw in job.events[len(job.written) :]:
                log.error(
                    "optin: NOT RECORDED at shutdown: list=%s address=%s event=%s channel=%s ts=%s",
                    kw.get("list_id"),
                    kw.get("address"),
                    kw.get("kind"),
                    kw.get("channel"),
                    iso(kw.get("ts") or 0),
                )
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            await self.flush_delivered()
        except StoreError as e:
            log.error("optin: cannot persist delivered counts at stop: %s", e)
        sanctions = self.sanctions
        if sanctions is not None and self.on_control in sanctions.on_control:
            sanctions.on_control.remove(self.on_control)

    # ------------------------------------------------------------------ registry

    async def reload_lists(self) -> None:
        self.stored_lists = await self.ledger.stored_lists()
        self._lists_version += 1

    def registry(self, config: Config | None = None) -> Registry:
        """Lists from the given policy (the one the session runs under) and the store."""
        config = config or self.config
        if (
            self._reg is None
            or self._reg_for is None
            or self._reg_for[0] is not config
            or self._reg_for[1] != self._lists_version
        ):
            fresh_config = self._reg_for is None or self._reg_for[0] is not config
            self._reg = Registry.build(section(config), self.stored_lists)
            self._reg_for = (config, self._lists_version)
            if fresh_config:
                self.config = config
                self._check(config, self._reg)
        return self._reg

    def list_address(self, config: Config, customer: str, addr: str) -> str | None:
        """Registry.address_of over the lists and the confirmation tokens in memory."""

        def token_list(token: str) -> str | None:
            t = self.tokens.get(token_hash(token))
            return t.list_id if t is not None else None

        return self.registry(config).address_of(
            customer, addr, section(config).confirm_local_part, token_list
        )

    def _check(self, config: Config, reg: Registry) -> None:
        """Problems the config parser cannot see: they need the whole policy."""
        for lst in reg.lists.values():
            if config.customer(lst.customer) is None:
                log.error(
                    "optin: list=%s: no customer named %s in %s: the list never matches",
                    lst.id,
                    clean(lst.customer),
                    config.path,
                )
            if lst.cfg.domain and lst.cfg.domain not in config.hosted_domains:
                log.error(
                    "optin: list=%s: domain %s is not a hosted domain (postmaster.domains):"
                    " confirm+TOKEN@ replies will not reach maild",
                    lst.id,
                    lst.cfg.domain,
                )
        for lid in reg.shadowed:
            log.warning(
                "optin: list=%s is registered in the store and in %s; the file wins",
                lid,
                config.path,
            )

    # ------------------------------------------------------------------ state

    def standing(self, list_id: str, address: str, config: Config | None = None) -> Standing:
        key = (list_id, address.lower())
        st = self.standings.get(key, Standing())
        for kind, ts, channel, _ in self.overlay.get(key, ()):
            st = apply(st, kind, ts, channel)
        return effective(st, attested_ok=section(config or self.config).attested_consent)

    async def standing_before_refusal(
        self, list_id: str, address: str, config: Config | None = None
    ) -> Standing:
        """standing(), read again from the ledger before it refuses (at most every 0.2 s):
        a confirmation that the CLI or a web form wrote a moment ago counts at once, not
        only after the next periodic fold. A store error keeps the cached standing."""
        st = self.standing(list_id, address, config)
        now = time.monotonic()
        if st.sendable or now - self._looked_again < 0.2:
            return st
        self._looked_again = now
        try:
            await self.refresh()
        except StoreError as e:
            log.warning("optin: ledger not re-read before a refusal: %s", e)
            return st
        return self.standing(list_id, address, config)

    async def find_token(self, th: str) -> Token | None:
        """A token by hash; one the CLI just issued may not be folded in yet, so look again."""
        t = self.tokens.get(th)
        if t is None:
            await self.refresh()
            t = self.tokens.get(th)
        return t

    def _fold(self, r: tuple) -> None:
        """One row of Ledger.fold_rows into the cache."""
        rid, list_id, seq, ts, address, kind, channel, th, mid, chash, detail = r
        self.last_id = max(self.last_id, rid)
        k = _KINDS.get(kind)
        if k is None:
            return
        self.kinds[k] += 1
        key = (list_id, address)
        self.standings[key] = apply(self.standings.get(key, _NOBODY), k, ts, channel)
        if k is Kind.REQUEST and th:
            try:
                expires = from_iso(str(json.loads(detail).get("expires", "")))
            except (ValueError, AttributeError):
                expires = 0.0
            old = self.tokens.get(th)
            self.tokens[th] = Token(
                list_id, address, expires, mid, seq, chash, used=bool(old and old.used)
            )
        elif k is Kind.CONFIRM and th:
            t = self.tokens.get(th)
            if t is not None:
                t.used = True
        elif k is Kind.COMPLAINT:
            when = from_iso(ts)
            if when >= self.clock() - self.settings.complaint_window:
                self.complaints[list_id].append(when)

    async def refresh(self) -> None:
        """Fold rows written since the last look (by us or by the CLI)."""
        async with self._refresh_lock:
            while True:
                rows = await self.ledger.fold_rows(self.last_id, PAGE)
                for r in rows:
                    self._fold(r)
                if len(rows) < PAGE:
                    break
            self._purge_overlay()

    def _purge_overlay(self) -> None:
        for key in list(self.overlay):
            keep = [
                o
                for o in self.overlay[key]
                if not (o[3].done and all(e.id <= self.last_id for e in o[3].written))
            ]
            if keep:
                self.overlay[key] = keep
            else:
                del self.overlay[key]

    def on_control(self, kind: str, arg: str) -> None:
        """Sanctions' control poll: the CLI changed the ledger or the lists."""
        if kind == "optin":
            self._dirty = True
        elif kind == "optin-lists":
            self._lists_dirty = True
        else:
            return
        task = asyncio.get_running_loop().create_task(self._apply_control())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _apply_control(self) -> None:
        try:
            if self._lists_dirty:
                self._lists_dirty = False
                await self.reload_lists()
            if self._dirty:
                self._dirty = False
                await self.refresh()
        except StoreError as e:
            self._dirty = True
            log.error("optin: cannot refresh from the store (will retry): %s", e)

    # ------------------------------------------------------------------ recording

    def record(
        self,
        what: str,
        events: list[dict[str, Any]],
        after: Callable[[list[Event]], Awaitable[None]] | None = None,
    ) -> Job:
        """Queue events for the ledger; their effect on standings is immediate."""
        now = self.clock()
        job = Job(what, events, after)
        for kw in events:
            kw.setdefault("ts", now)
            key = (kw["list_id"], kw["address"].lower())
            self.overlay.setdefault(key, []).append((kw["kind"], iso(kw["ts"]), kw["channel"], job))
        self.queue.put_nowait(job)
        return job

    async def _work(self) -> None:
        while True:
            job = await self.queue.get()
            self._current = job
            try:
                await self._run(job)
            finally:
                self._current = None
                self.queue.task_done()

    async def _run(self, job: Job) -> None:
        delay = 1.0
        while len(job.written) < len(job.events):
            kw = job.events[len(job.written)]
            try:
                e = await self.ledger.append(**kw)
            except StoreError as err:
                log.error("optin: cannot record %s (retry in %gs): %s", job.what, delay, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            except Exception:  # a bug must not stop the writer: log it and move on
                log.exception("optin: recording %s failed", job.what)
                break
            job.written.append(e)
            log_event(e)
        job.done = True
        try:
            await self.refresh()
        except StoreError as err:
            log.error("optin: cannot refresh after writing: %s", err)
        if job.after is not None and job.written:
            try:
                await job.after(job.written)
            except Exception:  # noqa: BLE001  follow-ups (notices, strikes) never block writes
                log.exception("optin: follow-up of %s failed", job.what)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ complaints

    def count_delivered(self, list_id: str, n: int) -> None:
        hour = int(self.clock() // 3600)
        self.delivered[list_id][hour] = self.delivered[list_id].get(hour, 0) + n
        self.unflushed[(list_id, hour)] += n

    async def flush_delivered(self) -> None:
        if not self.unflushed:
            return
        rows = [(k[0], k[1], n) for k, n in self.unflushed.items()]
        self.unflushed = defaultdict(int)
        try:
            await self.ledger.add_delivered(rows)
        except StoreError:
            for lid, hour, n in rows:
                self.unflushed[(lid, hour)] += n
            raise

    async def _load_delivered(self) -> None:
        since = int((self.clock() - self.settings.complaint_window) // 3600)
        for lid, hour, n in await self.ledger.delivered_since(since):
            self.delivered[lid][hour] = n

    def complaint_rate(self, list_id: str) -> tuple[int, int, float]:
        """(complaints, delivered, percent) over the window; the denominator is at least
        complaint_min_volume, so one complaint on a tiny list is not a 10% rate."""
        s = self.settings
        now = self.clock()
        since = now - s.complaint_window
        n = sum(1 for t in self.complaints.get(list_id, ()) if t >= since)
        # complaints queued but not yet folded in from the store
        n += sum(
            1
            for (lid, _), entries in self.overlay.items()
            if lid == list_id
            for kind, *_ in entries
            if kind is Kind.COMPLAINT
        )
        first_hour = int(since // 3600)
        delivered = sum(v for h, v in self.delivered.get(list_id, {}).items() if h >= first_hour)
        return n, delivered, 100.0 * n / max(delivered, s.complaint_min_volume)

    def judge_complaints(self, list_id: str) -> None:
        """After a complaint: a strike over the limit, a warning line over the warning."""
        s = self.settings
        lst = self.registry().get(list_id)
        if lst is None:
            return
        n, delivered, pct = self.complaint_rate(list_id)
        hours = s.complaint_window / 3600
        why = (
            f"list {list_id}: {n} complaint{'s' if n != 1 else ''} for {delivered} "
            f"message{'s' if delivered != 1 else ''} delivered in {hours:g}h ({pct:.2f}%, limit {s.complaint_limit_percent:g}%)"
        )
        if pct > s.complaint_limit_percent:
            log.warning(
                "optin: list=%s customer=%s complaints=%d delivered=%d rate=%.3f%% action=strike",
                list_id,
                lst.customer,
                n,
                delivered,
                pct,
            )
            if self.sanctions is not None:
                self.sanctions.strike_soon(lst.customer, "optin-complaints", why)
        elif pct > s.complaint_warning_percent:
            last = self._warned.get(list_id, 0.0)
            if self.clock() - last >= 3600:
                self._warned[list_id] = self.clock()
                log.warning(
                    "optin: list=%s customer=%s complaints=%d delivered=%d rate=%.3f%% "
                    "action=warning (warning at %g%%, limit %g%%)",
                    list_id,
                    lst.customer,
                    n,
                    delivered,
                    pct,
                    s.complaint_warning_percent,
                    s.complaint_limit_percent,
                )

    # ------------------------------------------------------------------ housekeeping

    async def _housekeep(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(2)
            tick += 1
            try:
                if self._own_poll:
                    await self._poll_control()
                if self._dirty or self._lists_dirty:
                    await self._apply_control()
                if tick % 5 == 0:
                    await self.flush_delivered()
                if tick % 30 == 0:
                    self._expire()
            except StoreError as e:
                log.error("optin: state store: %s", e)

    async def _poll_control(self) -> None:
        rows = await self.store.fetchall(
            "SELECT id, kind, arg FROM control WHERE id > ? ORDER BY id", (self._last_control,)
        )
        if rows:
            self._last_control = rows[-1][0]
        for _, kind, arg in rows:
            self.on_control(kind, arg)

    def _expire(self) -> None:
        now = self.clock()
        for th in [th for th, t in self.tokens.items() if t.expires < now - TOKEN_KEEP]:
            del self.tokens[th]
        since = now - self.settings.complaint_window
        for lid in list(self.complaints):
            self.complaints[lid] = [t for t in self.complaints[lid] if t >= since]
        first_hour = int(since // 3600) - 1
        for lid in list(self.delivered):
            self.delivered[lid] = {h: n for h, n in self.delivered[lid].items() if h >= first_hour}
