"""Retention inside `maild serve`: one APScheduler job per rule, and the access tracker.

Runs of different rules never overlap (one lock), a rule never runs twice at once,
missed runs coalesce into one, and a daemon that was down when a rule was due runs it
shortly after start (only if it has run before: a fresh install waits for its
schedule). A login seen in the Dovecot log restores a shrunk quota at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from maild.retention import state
from maild.retention.access import AccessTracker
from maild.retention.config import RetentionConfig, retention_of
from maild.retention.jobs import RunBusy, RunError, Runner
from maild.store.base import Store, StoreError

if TYPE_CHECKING:  # start() imports it at run time, only when retention is active
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger("maild.retention")
CATCH_UP_DELAY = 60.0


def trigger_for(cron: str):
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(cron)


def next_runs(cfg: RetentionConfig, now: float | None = None) -> dict[str, float | None]:
    """When each rule runs next (None: manual or disabled)."""
    at = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    out: dict[str, float | None] = {}
    for rule in cfg.rules:
        if not (cfg.enabled and rule.enabled and rule.cron):
            out[rule.name] = None
            continue
        nxt = trigger_for(rule.cron).get_next_fire_time(None, at)
        out[rule.name] = nxt.timestamp() if nxt else None
    return out


def period(cron: str, now: float) -> float:
    """The time between two runs of a schedule, around now."""
    trig = trigger_for(cron)
    a = trig.get_next_fire_time(None, datetime.fromtimestamp(now, UTC))
    if a is None:
        return 0.0
    b = trig.get_next_fire_time(a, a)
    if b == a:
        from datetime import timedelta

        b = trig.get_next_fire_time(a, a + timedelta(seconds=1))
    return (b - a).total_seconds() if b else 0.0


class RetentionService:
    """Started by `maild serve`: start(), reload(new_config) on SIGHUP, stop()."""

    def __init__(self, config: Any, store: Store, *, clock: Callable[[], float] = time.time):
        self.cfg = config if isinstance(config, RetentionConfig) else retention_of(config)
        self.store = store
        self.clock = clock
        self.runner = Runner(self.cfg, store, clock=clock)
        self.scheduler: AsyncIOScheduler | None = None
        self.tracker: AccessTracker | None = None
        self.run_lock = asyncio.Lock()
        self.running: set[asyncio.Task] = set()

    @property
    def active(self) -> bool:
        return self.cfg.enabled and bool(
            self.cfg.rules or self.cfg.access.dovecot_log or self.cfg.access.last_login_dict
        )

    async def start(self) -> None:
        if not self.active:
            return
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        if self.runner.userdb is not None:
            await asyncio.to_thread(self.runner.userdb.ensure)
        self.scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        for rule in self.cfg.rules:
            if not (rule.enabled and rule.cron):
                continue
            self.scheduler.add_job(
                self._job,
                trigger_for(rule.cron),
                args=[rule.name, "schedule"],
                id=f"retention:{rule.name}",
                name=f"retention {rule.name}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=6 * 3600,
                replace_existing=True,
            )
        self.scheduler.start()
        await self._catch_up()
        self.tracker = AccessTracker(
            self.cfg.access,
            self.store,
            functools.partial(self.runner.on_access, background=True),
            resolve=self.cfg.resolve,
            clock=self.clock,
        )
        self.tracker.start()
        log.info(
            "retention: started rules=%s access=%s",
            ",".join(r.name for r in self.cfg.rules if r.enabled and r.cron) or "none",
            self.cfg.access.dovecot_log or "none",
        )

    async def _catch_up(self) -> None:
        """A rule that missed a run while maild was down runs soon after start."""
        assert self.scheduler is not None
        now = self.clock()
        for rule in self.cfg.rules:
            if not (rule.enabled and rule.cron):
                continue
            try:
                last = await state.last_completed_start(self.store, rule.name)
            except StoreError:
                continue
            gap = period(rule.cron, now)
            if last is not None and gap and now - last > gap * 1.1:
                when = datetime.fromtimestamp(time.time() + CATCH_UP_DELAY, UTC)
                self.scheduler.add_job(
                    self._job,
                    "date",
                    run_date=when,
                    args=[rule.name, "catch-up"],
                    id=f"retention-catch-up:{rule.name}",
                    replace_existing=True,
                )
                log.info(
                    "retention: rule=%s missed its schedule (last run %d s ago): running in %d s",
                    rule.name,
                    int(now - last),
                    int(CATCH_UP_DELAY),
                )

    async def _job(self, rule_name: str, trigger: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.running.add(task)
        try:
            async with self.run_lock:
                await self.runner.run(rule_name, trigger=trigger)
        except (RunBusy, RunError, StoreError, OSError) as e:
            log.error("retention: run rule=%s status=failed error=%s", rule_name, e)
        except Exception:  # a scheduled job must never take the daemon down
            log.exception("retention: run rule=%s status=failed", rule_name)
        finally:
            if task is not None:
                self.running.discard(task)

    def jobs(self) -> list[tuple[str, float | None]]:
        if self.scheduler is None:
            return []
        return [
            (j.id, j.next_run_time.timestamp() if j.next_run_time else None)
            for j in self.scheduler.get_jobs()
        ]

    async def reload(self, new_config: Any) -> None:
        """Apply a new policies.toml: a run in progress finishes with the old rules."""
        cfg = new_config if isinstance(new_config, RetentionConfig) else retention_of(new_config)
        await self._shutdown(wait_runs=False)
        self.cfg = cfg
        old_runner = self.runner
        await old_runner.close()
        self.runner = Runner(cfg, self.store, clock=self.clock)
        self.runner.stop_event = old_runner.stop_event
        await self.start()

    async def stop(self) -> None:
        await self._shutdown(wait_runs=True)
        await self.runner.close()

    async def _shutdown(self, *, wait_runs: bool) -> None:
        if self.tracker is not None:
            await self.tracker.stop()
            self.tracker = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if wait_runs and self.running:
            self.runner.stop()  # ends after the current mailbox, consistently
            for t in list(self.running):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
