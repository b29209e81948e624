"""Running a retention rule over the mail store, safely and restartably.

A run works mailbox by mailbox in a worker thread (the event loop of `maild serve`
stays free for the SMTP proxy) and reaches the store through the loop: the Runner takes
the rule's lock, settles quotas due for a restore (restore.py), reads the mailboxes'
state and hands the pass over them to a Sweep (sweep.py), then records the run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from maild.retention import quota, state
from maild.retention.config import RetentionConfig, RetentionRule
from maild.retention.locks import LockBusy, bind_store, rule_lock
from maild.retention.mailboxes import Mailbox, RootMailboxes, find_mailboxes, user_path
from maild.retention.restore import QuotaRestorer
from maild.retention.sweep import Report, Sweep, verb, yesno
from maild.retention.worker import Bridge
from maild.store.base import Store, StoreError

log = logging.getLogger("maild.retention")


class RunBusy(Exception):
    """Another run of the same rule is in progress."""


class RunError(Exception):
    """The run cannot start (bad user, unreadable list of root mailboxes, ...)."""


class Runner:
    """Runs rules, restores quotas; one per configuration."""

    def __init__(
        self, cfg: RetentionConfig, store: Store, *, clock: Callable[[], float] = time.time
    ):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.stop_event = threading.Event()
        self.lock_dir = cfg.resolve(cfg.store.lock_dir)
        bind_store(self.lock_dir, store)  # shared state: mailbox locks take store leases
        self.userdb = (
            quota.UserdbOverrides(cfg.resolve(cfg.quota.dovecot_userdb), cfg.lock_timeout)
            if cfg.quota.dovecot_userdb
            else None
        )
        self.restorer = QuotaRestorer(cfg, store, self.lock_dir, self.userdb, clock)

    # ------------------------------------------------------------------ public API

    async def run(
        self,
        rule_name: str,
        *,
        dry_run: bool = False,
        user: str | None = None,
        now: float | None = None,
        trigger: str = "cli",
        on_progress: Callable[[int, int], None] | None = None,
        on_plan: Callable[[dict[str, Any]], None] | None = None,
        quiet: bool = False,
    ) -> Report:
        """Run one rule. quiet (previews such as `mailbox show`, dry runs only) logs nothing."""
        rule = self.cfg.rule(rule_name)
        if rule is None:
            raise RunError(f"no retention rule named {rule_name!r}")
        started = time.monotonic()
        now = self.clock() if now is None else now
        report = Report(rule=rule.name, dry_run=dry_run)
        quiet = quiet and dry_run
        lock = rule_lock(self.lock_dir, rule.name)
        if not dry_run:
            try:
                await asyncio.to_thread(lock.acquire)
            except LockBusy:
                raise RunBusy(f"a run of rule {rule.name} is already in progress") from None
        try:
            if not dry_run:
                report.restored += await self.restore_due()
            boxes = await asyncio.to_thread(self._mailboxes, rule, user)
            rows = await state.mailboxes(self.store, [b.user for b in boxes] if user else None)
            new = [b.user for b in boxes if b.user not in rows]
            if new and not dry_run:
                await state.first_seen(self.store, new, now)
            for u in new:
                rows[u] = state.MailboxRow(u, now, None, "", "normal", *(None,) * 6)
            cache = await state.dircache(self.store)
            pending = await state.pending(self.store) if not dry_run else {}
            if not dry_run:
                report.run_id = await state.start_run(self.store, rule.name, now, trigger)
            work = Sweep(
                self,
                rule,
                now,
                dry_run,
                report,
                cache,
                pending,
                Bridge(asyncio.get_running_loop()),
                on_progress,
                on_plan,
            )
            work.quiet = quiet
            try:
                await asyncio.to_thread(work.all, boxes, rows)
            except BaseException:
                report.status = "failed"
                raise
            finally:
                if not dry_run:
                    await self._finish(report, work, now)
        finally:
            lock.release()
            report.seconds = time.monotonic() - started
            # A dry run says would_delete/would_shrink: a grep for "deleted=" counts only
            # what was deleted.
            (log.debug if quiet else log.info)(
                "retention: run rule=%s status=%s mailboxes=%d scanned=%d cached_dirs=%d "
                "%s=%d bytes=%d vanished=%d skipped=%d %s=%d restored=%d errors=%d "
                "dry_run=%s seconds=%.2f",
                rule.name,
                report.status,
                report.mailboxes,
                report.scanned,
                report.cached_dirs,
                verb("deleted", dry_run),
                report.deleted,
                report.bytes,
                report.vanished,
                report.skipped,
                verb("shrunk", dry_run),
                report.shrunk,
                report.restored,
                report.errors,
                yesno(dry_run),
                report.seconds,
            )
        return report

    async def _finish(self, report: Report, work: Sweep, now: float) -> None:
        try:
            if work.cache_updates:
                await state.save_dircache(self.store, work.flush_cache())
            if report.run_id is not None:
                await state.finish_run(
                    self.store, report.run_id, self.clock(), report.status, report.figures()
                )
            await state.prune(self.store, now - self.cfg.keep_records)
        except StoreError as e:
            log.error("retention: cannot record run rule=%s error=%s", report.rule, e)

    async def on_access(
        self, rows: list[tuple[str, float, str]], *, background: bool = False
    ) -> None:
        """Record accesses; a shrunk mailbox accessed again gets its quota back at once."""
        await self.restorer.on_access(rows, background=background)

    async def restore(self, user: str, *, reason: str) -> bool:
        return await self.restorer.restore(user, reason=reason)

    async def restore_due(self) -> int:
        return await self.restorer.restore_due()

    async def verify_restored(self, since: float, only: str | None = None) -> int:
        return await self.restorer.verify_restored(since, only)

    async def close(self) -> None:
        await self.restorer.close()

    def stop(self) -> None:
        """Ask a run in progress to end after the current mailbox."""
        self.stop_event.set()

    # ------------------------------------------------------------------ helpers (thread)

    def _mailboxes(self, rule: RetentionRule, user: str | None) -> list[Mailbox]:
        store = self.cfg.store
        if user is not None:
            try:
                path = user_path(store.path, user)
            except ValueError as e:
                raise RunError(str(e)) from None
            if not os.path.isdir(path):
                raise RunError(f"no mailbox for user {user} at {path}")
            boxes = [Mailbox(user, path)]
        else:
            boxes = find_mailboxes(store, self.cfg.resolve)
        if rule.mailboxes != "all":
            roots = RootMailboxes(store, self.cfg.resolve)
            if roots.problem:
                raise RunError(f"rule {rule.name} needs the root mailboxes: {roots.problem}")
            want = rule.mailboxes == "root"
            boxes = [b for b in boxes if (b.user in roots) == want]
        if rule.users:
            boxes = [b for b in boxes if any(fnmatch.fnmatchcase(b.user, p) for p in rule.users)]
        return boxes
