"""Running a retention rule over the mail store, safely and restartably.

A run works mailbox by mailbox in a worker thread (the event loop of `maild serve`
stays free for the SMTP proxy) and reaches the store through the loop. For each
mailbox it takes maild's mailbox lock, re-reads the last access (a login since the run
started cancels an idle rule), scans with one stat per file (skipping directories that
have not changed since a previous run showed nothing in them was old enough), plans
with the pure functions of select.py, writes the plan to the store as "pending", then
unlinks, appends one negative line to maildirsize and marks the rows done.

Interrupted anywhere, the next run finds the pending rows: files still present are
"kept" (and reconsidered normally), files gone are "gone", and maildirsize is
recounted from the directory, so the store and the quota stay consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from maild.retention import quota, state
from maild.retention.config import RetentionConfig, Rule
from maild.retention.locks import LockBusy, bind_store, mailbox_lock, rule_lock
from maild.retention.mailboxes import Mailbox, RootMailboxes, find_mailboxes, user_path
from maild.retention.maildir import (
    SUBDIRS,
    DirSummary,
    Folder,
    MsgFile,
    dir_stat,
    exists,
    folder_usage,
    list_folders,
    open_dir,
    open_folder,
    open_root,
    scan_dir,
    unlink_message,
)
from maild.retention.select import folder_matcher, is_idle, plan, quota_counts
from maild.store.base import Store, StoreError

log = logging.getLogger("maild.retention")
T = TypeVar("T")
# Seconds after a live restore to check that it held: a Dovecot process that read the
# shrunk limit just before (the login that triggered the restore) may write it back when
# it recalculates maildirsize, usually within a second or two.
VERIFY_AFTER = (2.0, 30.0)
RESTORE_RETRY = 10.0     # seconds between attempts while a run holds the mailbox
RESTORE_ATTEMPTS = 60
RACY_SECONDS = 2.0        # a directory changed this recently is not summarised (coarse mtimes)
CACHE_FLUSH_EVERY = 2000  # mailboxes between writes of the directory summaries


class RunBusy(Exception):
    """Another run of the same rule is in progress."""


class RunError(Exception):
    """The run cannot start (bad user, unreadable list of root mailboxes, ...)."""


@dataclass
class Report:
    rule: str
    dry_run: bool
    run_id: int | None = None
    status: str = "done"
    mailboxes: int = 0         # mailboxes the rule applied to
    scanned: int = 0           # files stat'ed
    cached_dirs: int = 0       # directories skipped: unchanged and nothing old enough
    deleted: int = 0
    bytes: int = 0
    vanished: int = 0
    skipped: int = 0           # mailboxes left alone: busy, accessed meanwhile
    shrunk: int = 0
    restored: int = 0
    errors: int = 0
    seconds: float = 0.0
    planned: list[dict[str, Any]] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in state.RUN_FIELDS}


class Bridge:
    """Lets the worker thread run a store coroutine on the event loop and wait for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Start a write without waiting for it (the loop runs them in order)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


def _yesno(b: bool) -> str:
    return "yes" if b else "no"


_WOULD = {"deleted": "would_delete", "shrunk": "would_shrink"}


def _verb(done: str, dry_run: bool) -> str:
    """The log key for an action: what was done, or in a dry run what would be."""
    return _WOULD[done] if dry_run else done


def should_restore(row: state.MailboxRow) -> bool:
    """A shrunk mailbox accessed after the idle period that justified the shrink."""
    if row.quota_state == "normal" or row.last_access is None:
        return False
    since = row.shrunk_idle_since if row.shrunk_idle_since is not None else (row.shrunk_at or 0.0)
    return row.last_access > since


class Runner:
    """Runs rules, restores quotas; one per configuration."""

    def __init__(self, cfg: RetentionConfig, store: Store, *,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.stop_event = threading.Event()
        self.lock_dir = cfg.resolve(cfg.store.lock_dir)
        bind_store(self.lock_dir, store)  # shared state: mailbox locks take store leases
        self.userdb = (quota.UserdbOverrides(cfg.resolve(cfg.quota.dovecot_userdb), cfg.lock_timeout)
                       if cfg.quota.dovecot_userdb else None)
        self._later: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ public API

    async def run(self, rule_name: str, *, dry_run: bool = False, user: str | None = None,
                  now: float | None = None, trigger: str = "cli",
                  on_progress: Callable[[int, int], None] | None = None,
                  on_plan: Callable[[dict[str, Any]], None] | None = None,
                  quiet: bool = False) -> Report:
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
            work = _Work(self, rule, now, dry_run, report, cache, pending,
                         Bridge(asyncio.get_running_loop()), on_progress, on_plan)
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
            (log.debug if quiet else log.info)("retention: run rule=%s status=%s mailboxes=%d scanned=%d cached_dirs=%d "
                     "%s=%d bytes=%d vanished=%d skipped=%d %s=%d restored=%d errors=%d "
                     "dry_run=%s seconds=%.2f", rule.name, report.status, report.mailboxes,
                     report.scanned, report.cached_dirs, _verb("deleted", dry_run), report.deleted,
                     report.bytes, report.vanished, report.skipped, _verb("shrunk", dry_run),
                     report.shrunk, report.restored, report.errors, _yesno(dry_run), report.seconds)
        return report

    async def _finish(self, report: Report, work: _Work, now: float) -> None:
        try:
            if work.cache_updates:
                await state.save_dircache(self.store, work.flush_cache())
            if report.run_id is not None:
                await state.finish_run(self.store, report.run_id, self.clock(), report.status,
                                       report.figures())
            await state.prune(self.store, now - self.cfg.keep_records)
        except StoreError as e:
            log.error("retention: cannot record run rule=%s error=%s", report.rule, e)

    async def on_access(self, rows: list[tuple[str, float, str]], *,
                        background: bool = False) -> None:
        """Record accesses; a shrunk mailbox accessed again gets its quota back at once.

        In the daemon (background=True) each restore is a task of its own, retried while
        a run holds the mailbox, so following the log never waits for a lock."""
        if not rows:
            return
        await state.record_access(self.store, rows)
        shrunk = await state.shrunk_mailboxes(self.store)
        for user, _ts, source in rows:
            row = shrunk.get(user)
            if row is None or not should_restore(row):
                continue
            if background:
                self._spawn(self._restore_until_done(user, f"access source={source}"))
            elif await self.restore(user, reason=f"access source={source}"):
                self._verify_later(user)

    async def _restore_until_done(self, user: str, reason: str) -> None:
        for _ in range(RESTORE_ATTEMPTS):
            try:
                if await self.restore(user, reason=reason):
                    self._verify_later(user)
                    return
                row = await state.mailbox(self.store, user)
                if row is None or row.quota_state == "normal":
                    return
            except (StoreError, OSError) as e:
                log.error("retention: action=restore user=%s error=%s", user, e)
            await asyncio.sleep(RESTORE_RETRY)
        log.error("retention: action=restore user=%s status=gave up (the next run retries)", user)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def _verify_later(self, user: str) -> None:
        """Dovecot may be recalculating maildirsize with the limit it read just before the
        restore; look again once that is surely over (and at every run for two days)."""
        async def later() -> None:
            waited = 0.0
            for at in VERIFY_AFTER:
                await asyncio.sleep(at - waited)
                waited = at
                with contextlib.suppress(StoreError, OSError):
                    await self.verify_restored(self.clock() - 2 * 86400, only=user)

        self._spawn(later())

    async def restore_due(self) -> int:
        """Restore every shrunk mailbox accessed since (covers logins seen while maild was down)."""
        n = 0
        for user, row in (await state.shrunk_mailboxes(self.store)).items():
            if should_restore(row) and await self.restore(user, reason="access"):
                n += 1
        await self.verify_restored(self.clock() - 2 * 86400)
        return n

    async def verify_restored(self, since: float, only: str | None = None) -> int:
        """Put a restored limit back if maildirsize shows the shrunk one again."""
        if not self.cfg.quota.maildirsize:
            return 0
        rows = [r for r in await state.recently_restored(self.store, since)
                if only is None or r.user == only]
        if not rows:
            return 0
        return await asyncio.to_thread(self._verify, rows)

    def _verify(self, rows: list[state.MailboxRow]) -> int:
        fixed = 0
        for row in rows:
            try:
                with mailbox_lock(self.lock_dir, row.user, self.cfg.lock_timeout):
                    root_fd = open_root(user_path(self.cfg.store.path, row.user))
                    try:
                        md = quota.read(root_fd)
                        if md is None or md.limit_line != row.shrunk_quota:
                            continue
                        if row.restored_quota == quota.NO_FILE:
                            quota.remove(root_fd)
                        else:
                            assert row.restored_quota is not None
                            quota.set_limit(root_fd, row.restored_quota, (0, 0))
                    finally:
                        os.close(root_fd)
            except (LockBusy, OSError, ValueError):
                continue
            fixed += 1
            log.warning("retention: action=restore user=%s quota=%s reason=maildirsize had the "
                        "shrunk limit again (re-applied)", row.user, row.restored_quota)
        return fixed

    async def restore(self, user: str, *, reason: str) -> bool:
        row = await state.mailbox(self.store, user)
        if row is None or row.quota_state == "normal":
            return False
        bridge = Bridge(asyncio.get_running_loop())
        return await asyncio.to_thread(self._restore, row, reason, bridge)

    def stop(self) -> None:
        """Ask a run in progress to end after the current mailbox."""
        self.stop_event.set()

    async def close(self) -> None:
        for task in list(self._later):
            task.cancel()
        for task in list(self._later):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ helpers (thread)

    def _mailboxes(self, rule: Rule, user: str | None) -> list[Mailbox]:
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

    def _restore(self, row: state.MailboxRow, reason: str, bridge: Bridge) -> bool:
        user = row.user
        try:
            with mailbox_lock(self.lock_dir, user, self.cfg.lock_timeout):
                original = row.original_quota
                if self.userdb is not None and self.userdb.remove(user) and \
                        self.cfg.quota.flush_auth_cache:
                    quota.run_doveadm(self.cfg.quota.doveadm, "auth", "cache", "flush", user)
                root_fd = None
                with contextlib.suppress(OSError, ValueError):
                    root_fd = open_root(user_path(self.cfg.store.path, user))
                try:
                    if root_fd is not None:
                        if original is None:
                            original = quota.read_original(root_fd)
                        if self.cfg.quota.maildirsize:
                            if original is None:
                                log.error("retention: action=restore user=%s error=original quota "
                                          "unknown, maildirsize left as it is", user)
                                return False
                            if original == quota.NO_FILE:
                                quota.remove(root_fd)
                            else:
                                quota.set_limit(root_fd, original, self._usage(root_fd))
                        quota.drop_original(root_fd)     # ours; stale, it would mislead
                finally:
                    if root_fd is not None:
                        os.close(root_fd)
                bridge.call(state.mark_restored(
                    self.store, user, self.clock(),
                    original if self.cfg.quota.maildirsize and root_fd is not None else None))
        except LockBusy:
            log.warning("retention: action=restore user=%s status=busy (will retry)", user)
            return False
        log.info("retention: action=restore user=%s quota=%s reason=%s", user,
                 "none" if original in (None, quota.NO_FILE) else original, reason)
        return True

    def _usage(self, root_fd: int) -> tuple[int, int]:
        """What the quota counts, from the directories themselves."""
        counted = quota_counts(self.cfg.store, self.cfg.quota.ignore_folders)
        b = c = 0
        for _folder, fb, fc in folder_usage(root_fd, self.cfg.store.layout, counted):
            b += fb
            c += fc
        return b, c


class _Work:
    """One run's pass over the mailboxes (runs in a worker thread)."""

    def __init__(self, runner: Runner, rule: Rule, now: float, dry_run: bool, report: Report,
                 cache: dict[str, tuple], pending: dict[str, list[tuple[int, str, str, int]]],
                 bridge: Bridge, on_progress: Callable[[int, int], None] | None,
                 on_plan: Callable[[dict[str, Any]], None] | None):
        self.r = runner
        self.cfg = runner.cfg
        self.rule = rule
        self.now = now
        self.dry_run = dry_run
        self.report = report
        self.cache = cache
        self.cache_updates: dict[str, DirSummary] = {}
        self.pending = pending
        self.bridge = bridge
        self.on_progress = on_progress
        self.on_plan = on_plan
        self.selected = folder_matcher(rule, self.cfg.store)
        self.counted = quota_counts(self.cfg.store, self.cfg.quota.ignore_folders)
        self.writes: list[Future] = []
        self.quiet = False

    def flush_cache(self) -> list[tuple]:
        rows = [(p, *s) for p, s in self.cache_updates.items()]
        self.cache_updates = {}
        return rows

    def all(self, boxes: list[Mailbox], rows: dict[str, state.MailboxRow]) -> None:
        try:
            self._all(boxes, rows)
        finally:
            for fut in self.writes:
                try:
                    fut.result()
                except StoreError as e:       # rows stay pending: the next run settles them
                    self.report.errors += 1
                    log.error("retention: rule=%s cannot record deletions: %s", self.rule.name, e)
            self.writes = []

    def _all(self, boxes: list[Mailbox], rows: dict[str, state.MailboxRow]) -> None:
        rule, rep = self.rule, self.report
        for i, mb in enumerate(boxes):
            if self.r.stop_event.is_set():
                rep.status = "interrupted"
                break
            row = rows[mb.user]
            if is_idle(rule.idle, row.idle_since, self.now) or (mb.user in self.pending):
                try:
                    self.mailbox(mb, row)
                except LockBusy:
                    rep.skipped += 1
                    log.warning("retention: rule=%s user=%s skipped=busy", rule.name, mb.user)
                except (OSError, StoreError, ValueError) as e:
                    rep.errors += 1
                    log.error("retention: rule=%s user=%s error=%s", rule.name, mb.user, e)
            if self.on_progress is not None:
                self.on_progress(i + 1, len(boxes))
            if not self.dry_run and (i + 1) % CACHE_FLUSH_EVERY == 0 and self.cache_updates:
                self.bridge.call(state.save_dircache(self.r.store, self.flush_cache()))

    # ------------------------------------------------------------------ one mailbox

    def mailbox(self, mb: Mailbox, row: state.MailboxRow) -> None:
        """Plan without holding anything (read-only); lock, re-check the last access and
        act only if there is something to do."""
        rule = self.rule
        if not self.dry_run and mb.user in self.pending:
            with mailbox_lock(self.r.lock_dir, mb.user, self.cfg.lock_timeout):
                self._recover(mb, self.pending.pop(mb.user))
        if not is_idle(rule.idle, row.idle_since, self.now):
            return
        self.report.mailboxes += 1
        root_fd = open_root(mb.path)
        try:
            folders, totals, victims = self._plan(mb, root_fd)
            if rule.action != "shrink" and not victims:
                return
            if self.dry_run:
                if rule.action == "shrink":
                    self._shrink(mb, row, root_fd, totals, victims)
                else:
                    self._delete(mb, root_fd, folders, victims)
                return
            with mailbox_lock(self.r.lock_dir, mb.user, self.cfg.lock_timeout):
                if rule.action == "shrink":
                    fresh = self.bridge.call(state.mailbox(self.r.store, mb.user)) or row
                    if not is_idle(rule.idle, fresh.idle_since, self.now):
                        self._skipped_accessed(mb, fresh)
                        return
                    self._shrink(mb, fresh, root_fd, totals, victims)
                else:
                    self._delete(mb, root_fd, folders, victims, recheck=True)
        finally:
            os.close(root_fd)

    def _skipped_accessed(self, mb: Mailbox, fresh: state.MailboxRow) -> None:
        self.report.skipped += 1
        log.info("retention: rule=%s user=%s skipped=accessed last_access=%d",
                 self.rule.name, mb.user, int(fresh.idle_since))

    def _plan(self, mb: Mailbox, root_fd: int
              ) -> tuple[list[Folder], dict[str, tuple[int, int]], list[MsgFile]]:
        rule = self.rule
        # Only the folders the rule reads are listed (and checked for being maildirs); the
        # victims, which _delete looks up in `folders`, come from these alone.
        if rule.action == "delete":
            want = self.selected
        else:
            selected, counted = self.selected, self.counted
            def want(name: str) -> bool:
                return selected(name) or counted(name)
        folders = list_folders(root_fd, self.cfg.store.layout, want)
        files, totals, skipped_dirs = self._collect(mb, root_fd, folders)
        if rule.action != "delete":
            usage = self._usage_of(totals, rule)
            limit = rule.quota if rule.action == "shrink" else rule.max_size
            assert limit is not None
            if usage > limit and skipped_dirs:
                files += self._rescan(mb, root_fd, skipped_dirs)
        victims = plan(rule, files, self.now, selected=self.selected, counted=self.counted)
        return folders, totals, victims

    def _usage_of(self, totals: dict[str, tuple[int, int]], rule: Rule) -> int:
        pick = self.counted if rule.action == "shrink" else self.selected
        return sum(b for name, (b, _c) in totals.items() if pick(name))

    def _collect(self, mb: Mailbox, root_fd: int, folders: list[Folder]
                 ) -> tuple[list[MsgFile], dict[str, tuple[int, int]], list[tuple[Folder, str]]]:
        """Scan the folders' cur/ and new/, skipping unchanged directories the cache shows
        hold nothing old enough (delete), or whose totals suffice (trim/shrink)."""
        rule, rep = self.rule, self.report
        files: list[MsgFile] = []
        totals: dict[str, tuple[int, int]] = {}
        skipped: list[tuple[Folder, str]] = []
        cutoff = self.now - rule.age if (rule.action == "delete" and rule.age) else None
        prefilter = (("ctime" if rule.age_by == "saved" else "mtime", cutoff)
                     if cutoff is not None else None)
        for folder in folders:
            try:
                ffd = open_folder(root_fd, folder)
            except OSError:
                continue
            try:
                b_total = c_total = 0
                for sub in SUBDIRS:
                    st = dir_stat(ffd, sub)
                    if st is None:
                        continue
                    key = os.path.join(mb.path, *folder.rel, sub)
                    cached = self.cache.get(key)
                    if cached is not None:
                        summary = DirSummary(*cached)
                        if summary.same_dir(st):
                            oldest = summary.min_ctime if rule.age_by == "saved" else summary.min_mtime
                            if rule.action != "delete" or (cutoff is not None and oldest >= cutoff):
                                rep.cached_dirs += 1
                                b_total += summary.bytes
                                c_total += summary.count
                                skipped.append((folder, sub))
                                continue
                    res = scan_dir(ffd, sub, folder.name, older_than=prefilter)
                    if res is None:
                        continue
                    summary, found = res
                    rep.scanned += summary.count
                    files += found
                    b_total += summary.bytes
                    c_total += summary.count
                    if time.time() - max(st.st_mtime, st.st_ctime) > RACY_SECONDS and \
                            summary.same_dir(st):
                        self.cache_updates[key] = summary
                        self.cache[key] = tuple(summary)
            finally:
                os.close(ffd)
            prev = totals.get(folder.name, (0, 0))
            totals[folder.name] = (prev[0] + b_total, prev[1] + c_total)
        return files, totals, skipped

    def _rescan(self, mb: Mailbox, root_fd: int, dirs: list[tuple[Folder, str]]) -> list[MsgFile]:
        files: list[MsgFile] = []
        for folder, sub in dirs:
            try:
                ffd = open_folder(root_fd, folder)
            except OSError:
                continue
            try:
                res = scan_dir(ffd, sub, folder.name)
            finally:
                os.close(ffd)
            if res is not None:
                self.report.cached_dirs -= 1
                self.report.scanned += len(res[1])
                files += res[1]
        return files

    # ------------------------------------------------------------------ actions

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_plan is not None:
            self.on_plan(event)
        else:
            self.report.planned.append(event)

    def _delete(self, mb: Mailbox, root_fd: int, folders: list[Folder],
                victims: list[MsgFile], *, recheck: bool = False) -> None:
        if not victims:
            return
        rule, rep = self.rule, self.report
        if self.dry_run:
            per: dict[str, list[int]] = {}
            for f in victims:
                self._emit({"action": "delete", "rule": rule.name, "user": mb.user,
                            "folder": f.folder, "file": f"{f.sub}/{f.name}", "size": f.size})
                agg = per.setdefault(f.folder, [0, 0])
                agg[0] += 1
                agg[1] += f.size
                rep.deleted += 1
                rep.bytes += f.size
            for folder, (n, b) in per.items():
                (log.debug if self.quiet else log.info)(
                    "retention: rule=%s user=%s folder=%s %s=%d bytes=%d dry_run=yes",
                    rule.name, mb.user, folder, _verb("deleted", True), n, b)
            return
        by_name = {f.name: f for f in folders}
        ts = self.r.clock()
        fresh, go = self.bridge.call(state.claim(
            self.r.store, mb.user, rule.idle if recheck else None, self.now,
            [(rep.run_id or 0, ts, rule.name, mb.user, f.folder, f"{f.sub}/{f.name}", f.size)
             for f in victims]))
        if not go:
            assert fresh is not None
            self._skipped_accessed(mb, fresh)
            return
        completed = False
        outcomes: list[tuple[str, str, str]] = []
        per_folder: dict[str, list[int]] = {}
        freed_b = freed_c = 0
        groups: dict[tuple[str, str], list[MsgFile]] = {}
        for f in victims:
            groups.setdefault((f.folder, f.sub), []).append(f)
        try:
            for (fname, sub), group in groups.items():
                agg = per_folder.setdefault(fname, [0, 0, 0])
                ffd = open_folder(root_fd, by_name[fname])
                try:
                    sfd = open_dir(ffd, sub)
                finally:
                    os.close(ffd)
                try:
                    for f in group:
                        res = unlink_message(sfd, f)
                        outcomes.append(({"deleted": "deleted", "vanished": "vanished"}.get(res, "kept"),
                                         f.folder, f"{f.sub}/{f.name}"))
                        if res == "deleted":
                            agg[0] += 1
                            agg[1] += f.size
                            if self.counted(f.folder):
                                freed_b += f.size
                                freed_c += 1
                        elif res == "vanished":
                            agg[2] += 1
                finally:
                    os.close(sfd)
            completed = True
        finally:
            if self.cfg.quota.maildirsize and (freed_b or freed_c):
                quota.append_usage(root_fd, -freed_b, -freed_c)
            # not awaited: if maild dies before this lands, the rows stay pending and the
            # next run settles them and recounts maildirsize
            self.writes.append(self.bridge.submit(state.settle(
                self.r.store, rep.run_id or 0, mb.user, outcomes,
                rest="deleted" if completed else None)))
            for fname, (n, b, v) in per_folder.items():
                rep.deleted += n
                rep.bytes += b
                rep.vanished += v
                log.info("retention: rule=%s user=%s folder=%s deleted=%d bytes=%d vanished=%d "
                         "dry_run=no", rule.name, mb.user, fname, n, b, v)
        if self.cfg.quota.recalc and freed_c:
            quota.run_doveadm(self.cfg.quota.doveadm, "quota", "recalc", "-u", mb.user)

    def _shrink(self, mb: Mailbox, row: state.MailboxRow, root_fd: int,
                totals: dict[str, tuple[int, int]], victims: list[MsgFile]) -> None:
        rule, rep, qc = self.rule, self.report, self.cfg.quota
        assert rule.quota is not None
        md = quota.read(root_fd)
        current = md.limit_line if md is not None else quota.NO_FILE
        original = row.original_quota
        if original is None:
            original = quota.read_original(root_fd)
        if original is None:
            original = current
        target = quota.shrunk_line(None if original == quota.NO_FILE else original, rule.quota)
        usage = (sum(b for n, (b, _c) in totals.items() if self.counted(n)),
                 sum(c for n, (_b, c) in totals.items() if self.counted(n)))
        if self.dry_run:
            if row.quota_state == "normal" or current != target:
                self._emit({"action": "shrink", "rule": rule.name, "user": mb.user,
                            "quota": target, "original": original, "usage": usage[0]})
                rep.shrunk += 1
            self._delete(mb, root_fd, [], victims)
            return
        first = row.quota_state == "normal"
        if first and row.original_quota is None and current == target and original == current:
            log.warning("retention: rule=%s user=%s original quota unknown: maildirsize already "
                        "says %s and no record of the original exists", rule.name, mb.user, current)
        if qc.maildirsize:          # kept next to maildirsize: survives losing maild's store
            original = quota.save_original(root_fd, original)
        original = self.bridge.call(state.record_original_quota(self.r.store, mb.user, original))
        target = quota.shrunk_line(None if original == quota.NO_FILE else original, rule.quota)
        self.bridge.call(state.mark_shrunk(self.r.store, mb.user, state="shrinking", quota=target,
                                           rule=rule.name, at=self.now, idle_since=row.idle_since))
        changed = False
        if self.r.userdb is not None and self.r.userdb.set(mb.user, rule.quota):
            changed = True
            if qc.flush_auth_cache:
                quota.run_doveadm(qc.doveadm, "auth", "cache", "flush", mb.user)
        if qc.maildirsize and quota.set_limit(root_fd, target, usage) != target:
            changed = True
        folders = list_folders(root_fd, self.cfg.store.layout)
        self._delete(mb, root_fd, folders, victims)
        self.bridge.call(state.mark_shrunk(self.r.store, mb.user, state="shrunk", quota=target,
                                           rule=rule.name, at=self.now, idle_since=row.idle_since))
        if changed or first:
            rep.shrunk += 1
            log.info("retention: rule=%s user=%s action=shrink quota=%s original=%s usage=%d "
                     "deleted=%d dry_run=no", rule.name, mb.user, target,
                     "none" if original == quota.NO_FILE else original,
                     usage[0] - sum(f.size for f in victims), len(victims))

    # ------------------------------------------------------------------ recovery

    def _recover(self, mb: Mailbox, rows: list[tuple[int, str, str, int]]) -> None:
        """Settle the rows an interrupted run left pending and recount maildirsize."""
        root_fd = open_root(mb.path)
        try:
            folders = {f.name: f for f in list_folders(root_fd, self.cfg.store.layout)}
            by_run: dict[int, list[tuple[str, str, str]]] = {}
            gone = 0
            for run_id, fname, file, _size in rows:
                sub, _, name = file.partition("/")
                present = False
                folder = folders.get(fname)
                if folder is not None and sub in SUBDIRS and name and "/" not in name:
                    try:
                        ffd = open_folder(root_fd, folder)
                        try:
                            sfd = open_dir(ffd, sub)
                            try:
                                present = exists(sfd, name)
                            finally:
                                os.close(sfd)
                        finally:
                            os.close(ffd)
                    except OSError:
                        present = False
                status = "kept" if present else "gone"
                gone += status == "gone"
                by_run.setdefault(run_id, []).append((status, fname, file))
            if gone and self.cfg.quota.maildirsize:
                self._recount(root_fd)
            for run_id, outcomes in by_run.items():
                self.bridge.call(state.settle(self.r.store, run_id, mb.user, outcomes))
            log.info("retention: rule=%s user=%s recovered=%d gone=%d (interrupted run)",
                     self.rule.name, mb.user, len(rows), gone)
        finally:
            os.close(root_fd)

    def _recount(self, root_fd: int) -> None:
        """Recount usage; retried if a directory changed while counting (as Dovecot does)."""
        for _ in range(3):
            before = self._dir_stamps(root_fd)
            usage = self.r._usage(root_fd)
            if self._dir_stamps(root_fd) == before:
                quota.recount(root_fd, usage)
                return
        log.warning("retention: maildirsize recount skipped: the mailbox kept changing")

    def _dir_stamps(self, root_fd: int) -> list[tuple[str, int]]:
        out = []
        for folder in list_folders(root_fd, self.cfg.store.layout):
            try:
                ffd = open_folder(root_fd, folder)
            except OSError:
                continue
            try:
                for sub in SUBDIRS:
                    st = dir_stat(ffd, sub)
                    out.append((f"{folder.name}/{sub}", st.st_mtime_ns if st else 0))
            finally:
                os.close(ffd)
        return out
