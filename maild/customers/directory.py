"""Keeping a process's customer index current: [[customers]] plus [customer_source].

Each maild process refreshes its own index from the source (a worker needs no other
process to publish it): every `refresh` it reads the source in a thread, and when
anything changed builds a new index in a thread and publishes it into the running
config's directory with one assignment. A refresh that finds nothing changed costs a
stat per file (files) or one query (postgresql).

A refresh that would remove more than `max_shrink` of the source's customers in force is
refused and logged (a directory emptied by a failed deployment must not turn every
customer into a stranger); a reload (SIGHUP, `maild reload`) is the operator's
confirmation and accepts it. A source that cannot be read keeps the customers in force
and logs once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from maild.config import Config, Customer
from maild.customers.index import CustomerIndex
from maild.customers.sources import FilesSource, Loaded, PostgresSource, SourceError, open_source

Source = FilesSource | PostgresSource

log = logging.getLogger("maild")

FAILURE_LOG_INTERVAL = 60.0


def initial_index(config: Config) -> CustomerIndex:
    """The index of a process without a refresher (a CLI command, a test): the source
    read once, its snapshot when it cannot be read, policies.toml's customers alone when
    neither can (the index's source_note and refused say which)."""
    source = open_source(config)
    if source is None:
        return _build(config, Loaded(()), None)
    try:
        loaded = _read(source)
    except SourceError as e:
        loaded = Loaded((), [f"customers: {e}"], f"{source.describe()}: unreadable")
    return _build(config, loaded, None)


def _read(source: Source) -> Loaded:
    """The source, or its snapshot when it cannot be read; SourceError when neither."""
    try:
        return source.load()
    except SourceError as e:
        try:
            loaded = source.fallback()
        except SourceError as e2:
            raise SourceError(f"{e}; {e2}") from None
        loaded.problems.insert(0, f"customers: {e}; using the snapshot")
        return loaded


def _build(config: Config, loaded: Loaded, previous: CustomerIndex | None) -> CustomerIndex:
    return CustomerIndex.build(
        config.customers, loaded.customers, previous, loaded.note, loaded.problems
    )


class Refresher:
    """One process's refresh of [customer_source]; publishes into the running config."""

    def __init__(self, config: Config):
        self.config = config
        self.source: Source | None = open_source(config)
        self.loaded: Loaded | None = None
        self.task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._failing_since = 0.0
        self._failure_logged = 0.0
        self._refusal_logged = -FAILURE_LOG_INTERVAL
        self.last_refresh = 0.0
        self.last_error = ""

    async def start(self) -> None:
        """Load before the first session: a source that cannot be read and has no snapshot
        stops the start (SourceError), rather than serving customers as strangers."""
        async with self._lock:
            loaded = await self._first_read(self.source)
            loaded = await self._against_snapshot(loaded)
            await self._accept(self.config, loaded, None)
            self._run()

    async def _against_snapshot(self, loaded: Loaded) -> Loaded:
        """At start, a database answer that lost more than max_shrink of the snapshot's
        customers (a wrong query, a half-restored database) is refused for the snapshot."""
        source = self.source
        if not isinstance(source, PostgresSource) or not loaded.state[2]:
            return loaded
        try:
            snap = await asyncio.to_thread(source.fallback)
        except SourceError:
            return loaded  # the first start: nothing to compare with
        if why := self._shrink_message(source, snap.customers, loaded, "in the snapshot"):
            log.error(
                "customers: at start: %s; starting with the snapshot "
                "(`maild reload` accepts the database's answer)",
                why,
            )
            return snap
        return loaded

    async def _first_read(self, source: Source | None) -> Loaded:
        if source is None:
            return Loaded(())
        try:
            loaded = await asyncio.to_thread(_read, source)
        except SourceError as e:
            raise SourceError(f"customer_source: {e}") from None
        for p in loaded.problems:
            log.warning("%s", p)
        self.last_refresh = time.time()
        return loaded

    def _run(self) -> None:
        if self.source is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while self.source is not None:
            await asyncio.sleep(self.config.customer_source.refresh)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001  a refresh must never end the refreshing
                log.exception("customers: refresh failed; the customers in force stay")
        self.task = None

    async def refresh(self, *, force: bool = False) -> bool:
        """Read the source; publish a new index if it changed. True when one was published."""
        async with self._lock:
            source = self.source
            if source is None:
                return False
            try:
                loaded = await asyncio.to_thread(source.load)
            except SourceError as e:
                self._failing(e)
                return False
            self._recovered(source)
            self.last_refresh = time.time()
            for p in loaded.problems:
                log.warning("%s", p)
            if not loaded.changed:
                source.commit(loaded)
                return False
            before = self.loaded.customers if self.loaded else ()
            if not force and (why := self._shrink_message(source, before, loaded)):
                now = time.monotonic()
                if now - self._refusal_logged >= FAILURE_LOG_INTERVAL:
                    self._refusal_logged = now
                    log.error(
                        "customers: refresh refused: %s; the customers in force stay "
                        "(`maild reload` accepts the change)",
                        why,
                    )
                return False
            self._refusal_logged = -FAILURE_LOG_INTERVAL
            await self._accept(self.config, loaded, self.config.directory.current(initial_index))
            return True

    async def adopt(self, new: Config) -> None:
        """A reload: publish the new config's index before the daemon switches to it.

        A changed [customer_source] is read afresh (SourceError: the reload fails and the
        running policy stays); the same source is read again and any shrink accepted; a
        source that cannot be read keeps the customers in force."""
        async with self._lock:
            previous: CustomerIndex | None = self.config.directory.current(initial_index)
            source = self.source
            if new.customer_source != self.config.customer_source:
                source, previous = open_source(new), None
                loaded = await self._first_read(source)
            elif source is not None:
                try:
                    loaded = await asyncio.to_thread(source.load)
                except SourceError as e:
                    self._failing(e)
                    loaded = self.loaded or Loaded(())
            else:
                loaded = Loaded(())
            self.source, self.config = source, new
            await self._accept(new, loaded, previous)
            self._run()

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _shrink_message(
        self, source: Source, before_: Iterable[Customer], loaded: Loaded, than: str = "in force"
    ) -> str:
        """Why loaded loses too many of the customers before, or ""."""
        before = {c.name for c in before_}
        gone = before - {c.name for c in loaded.customers}
        share = self.config.customer_source.max_shrink
        if len(gone) > 1 and len(gone) > share * len(before):
            return (
                f"{source.describe()} now has {len(loaded.customers)} customers: "
                f"{len(gone)} of the {len(before)} {than} are gone, more than max_shrink = "
                f"{share:.0%}"
            )
        return ""

    async def _accept(self, config: Config, loaded: Loaded, previous: CustomerIndex | None) -> None:
        if self.source is not None:
            self.source.commit(loaded)
        self.loaded = loaded
        t0 = time.monotonic()
        idx = await asyncio.to_thread(_build, config, loaded, previous)
        for line in idx.refused[len(loaded.problems) :]:
            log.warning("%s", line)
        config.directory.publish(idx)
        if self.source is not None:
            log.info(
                "customers: in force: %d (%s); %s; index built in %.2fs",
                len(idx.customers),
                " ".join(f"{k}={v}" for k, v in idx.counts().items()),
                loaded.note or self.source.describe(),
                time.monotonic() - t0,
            )

    def _failing(self, e: SourceError) -> None:
        now = time.monotonic()
        self.last_error = str(e)
        if not self._failing_since:
            self._failing_since = now
        if not self._failure_logged or now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            n = len(self.loaded.customers) if self.loaded else 0
            log.error("customers: %s; keeping the %d source customers in force", e, n)

    def _recovered(self, source: Source) -> None:
        if self._failing_since:
            log.info(
                "customers: %s readable again after %.0fs",
                source.describe(),
                time.monotonic() - self._failing_since,
            )
        self._failing_since = self._failure_logged = 0.0
        self.last_error = ""
