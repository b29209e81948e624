"""One run's pass over the mailboxes, in a worker thread.

For each mailbox it takes maild's mailbox lock, re-reads the last access (a login since
the run started cancels an idle rule), scans with one stat per file (skipping
directories that have not changed since a previous run showed nothing in them was old
enough), plans with the pure functions of select.py, writes the plan to the store as
"pending", then unlinks, appends one negative line to maildirsize and marks the rows
done. Interrupted anywhere, the next run finds the pending rows: files still present are
"kept" (and reconsidered normally), files gone are "gone", and maildirsize is recounted
from the directory, so the store and the quota stay consistent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from maild.retention import quota, state
from maild.retention.config import RetentionRule
from maild.retention.locks import LockBusy, mailbox_lock
from maild.retention.mailboxes import Mailbox
from maild.retention.maildir import (
    SUBDIRS,
    DirSummary,
    Folder,
    MsgFile,
    dir_stat,
    exists,
    list_folders,
    open_dir,
    open_folder,
    open_root,
    scan_dir,
    unlink_message,
)
from maild.retention.select import folder_matcher, is_idle, plan, quota_counts
from maild.retention.worker import Bridge, quota_usage
from maild.store.base import StoreError

if TYPE_CHECKING:
    from maild.retention.jobs import Runner

log = logging.getLogger("maild.retention")
RACY_SECONDS = 2.0  # a directory changed this recently is not summarised (coarse mtimes)
CACHE_FLUSH_EVERY = 2000  # mailboxes between writes of the directory summaries


@dataclass
class Report:
    rule: str
    dry_run: bool
    run_id: int | None = None
    status: str = "done"
    mailboxes: int = 0  # mailboxes the rule applied to
    scanned: int = 0  # files stat'ed
    cached_dirs: int = 0  # directories skipped: unchanged and nothing old enough
    deleted: int = 0
    bytes: int = 0
    vanished: int = 0
    skipped: int = 0  # mailboxes left alone: busy, accessed meanwhile
    shrunk: int = 0
    restored: int = 0
    errors: int = 0
    seconds: float = 0.0
    planned: list[dict[str, Any]] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in state.RUN_FIELDS}


def yesno(b: bool) -> str:
    return "yes" if b else "no"


_WOULD = {"deleted": "would_delete", "shrunk": "would_shrink"}


def verb(done: str, dry_run: bool) -> str:
    """The log key for an action: what was done, or in a dry run what would be."""
    return _WOULD[done] if dry_run else done


class Sweep:
    """One run's pass over the mailboxes (runs in a worker thread)."""

    def __init__(
        self,
        runner: Runner,
        rule: RetentionRule,
        now: float,
        dry_run: bool,
        report: Report,
        cache: dict[str, tuple],
        pending: dict[str, list[tuple[int, str, str, int]]],
        bridge: Bridge,
        on_progress: Callable[[int, int], None] | None,
        on_plan: Callable[[dict[str, Any]], None] | None,
    ):
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
                except StoreError as e:  # rows stay pending: the next run settles them
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
        log.info(
            "retention: rule=%s user=%s skipped=accessed last_access=%d",
            self.rule.name,
            mb.user,
            int(fresh.idle_since),
        )

    def _plan(
        self, mb: Mailbox, root_fd: int
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

    def _usage_of(self, totals: dict[str, tuple[int, int]], rule: RetentionRule) -> int:
        pick = self.counted if rule.action == "shrink" else self.selected
        return sum(b for name, (b, _c) in totals.items() if pick(name))

    def _collect(
        self, mb: Mailbox, root_fd: int, folders: list[Folder]
    ) -> tuple[list[MsgFile], dict[str, tuple[int, int]], list[tuple[Folder, str]]]:
        """Scan the folders' cur/ and new/, skipping unchanged directories the cache shows
        hold nothing old enough (delete), or whose totals suffice (trim/shrink)."""
        rule, rep = self.rule, self.report
        files: list[MsgFile] = []
        totals: dict[str, tuple[int, int]] = {}
        skipped: list[tuple[Folder, str]] = []
        cutoff = self.now - rule.age if (rule.action == "delete" and rule.age) else None
        prefilter = (
            ("ctime" if rule.age_by == "saved" else "mtime", cutoff) if cutoff is not None else None
        )
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
                            oldest = (
                                summary.min_ctime if rule.age_by == "saved" else summary.min_mtime
                            )
                            if rule.action != "delete" or (cutoff is not None and oldest >= cutoff):
                                rep.cached_dirs += 1
                                b_total += summary.bytes
                                c_total += summary.messages
                                skipped.append((folder, sub))
                                continue
                    res = scan_dir(ffd, sub, folder.name, older_than=prefilter)
                    if res is None:
                        continue
                    summary, found = res
                    rep.scanned += summary.messages
                    files += found
                    b_total += summary.bytes
                    c_total += summary.messages
                    if time.time() - max(
                        st.st_mtime, st.st_ctime
                    ) > RACY_SECONDS and summary.same_dir(st):
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

    def _delete(
        self,
        mb: Mailbox,
        root_fd: int,
        folders: list[Folder],
        victims: list[MsgFile],
        *,
        recheck: bool = False,
    ) -> None:
        if not victims:
            return
        rule, rep = self.rule, self.report
        if self.dry_run:
            per: dict[str, list[int]] = {}
            for f in victims:
                self._emit(
                    {
                        "action": "delete",
                        "rule": rule.name,
                        "user": mb.user,
                        "folder": f.folder,
                        "file": f"{f.sub}/{f.name}",
                        "size": f.size,
                    }
                )
                agg = per.setdefault(f.folder, [0, 0])
                agg[0] += 1
                agg[1] += f.size
                rep.deleted += 1
                rep.bytes += f.size
            for folder, (n, b) in per.items():
                (log.debug if self.quiet else log.info)(
                    "retention: rule=%s user=%s folder=%s %s=%d bytes=%d dry_run=yes",
                    rule.name,
                    mb.user,
                    folder,
                    verb("deleted", True),
                    n,
                    b,
                )
            return
        by_name = {f.name: f for f in folders}
        ts = self.r.clock()
        fresh, go = self.bridge.call(
            state.claim(
                self.r.store,
                mb.user,
                rule.idle if recheck else None,
                self.now,
                [
                    (rep.run_id or 0, ts, rule.name, mb.user, f.folder, f"{f.sub}/{f.name}", f.size)
                    for f in victims
                ],
            )
        )
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
                        outcomes.append(
                            (
                                {"deleted": "deleted", "vanished": "vanished"}.get(res, "kept"),
                                f.folder,
                                f"{f.sub}/{f.name}",
                            )
                        )
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
            self.writes.append(
                self.bridge.submit(
                    state.settle(
                        self.r.store,
                        rep.run_id or 0,
                        mb.user,
                        outcomes,
                        rest="deleted" if completed else None,
                    )
                )
            )
            for fname, (n, b, v) in per_folder.items():
                rep.deleted += n
                rep.bytes += b
                rep.vanished += v
                log.info(
                    "retention: rule=%s user=%s folder=%s deleted=%d bytes=%d vanished=%d "
                    "dry_run=no",
                    rule.name,
                    mb.user,
                    fname,
                    n,
                    b,
                    v,
                )
        if self.cfg.quota.recalc and freed_c:
            quota.run_doveadm(self.cfg.quota.doveadm, "quota", "recalc", "-u", mb.user)

    def _shrink(
        self,
        mb: Mailbox,
        row: state.MailboxRow,
        root_fd: int,
        totals: dict[str, tuple[int, int]],
        victims: list[MsgFile],
    ) -> None:
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
        usage = (
            sum(b for n, (b, _c) in totals.items() if self.counted(n)),
            sum(c for n, (_b, c) in totals.items() if self.counted(n)),
        )
        if self.dry_run:
            if row.quota_state == "normal" or current != target:
                self._emit(
                    {
                        "action": "shrink",
                        "rule": rule.name,
                        "user": mb.user,
                        "quota": target,
                        "original": original,
                        "usage": usage[0],
                    }
                )
                rep.shrunk += 1
            self._delete(mb, root_fd, [], victims)
            return
        first = row.quota_state == "normal"
        if first and row.original_quota is None and current == target and original == current:
            log.warning(
                "retention: rule=%s user=%s original quota unknown: maildirsize already "
                "says %s and no record of the original exists",
                rule.name,
                mb.user,
                current,
            )
        if qc.maildirsize:  # kept next to maildirsize: survives losing maild's store
            original = quota.save_original(root_fd, original)
        original = self.bridge.call(state.record_original_quota(self.r.store, mb.user, original))
        target = quota.shrunk_line(None if original == quota.NO_FILE else original, rule.quota)
        self.bridge.call(
            state.mark_shrunk(
                self.r.store,
                mb.user,
                state="shrinking",
                quota=target,
                rule=rule.name,
                at=self.now,
                idle_since=row.idle_since,
            )
        )
        changed = False
        if self.r.userdb is not None and self.r.userdb.set(mb.user, rule.quota):
            changed = True
            if qc.flush_auth_cache:
                quota.run_doveadm(qc.doveadm, "auth", "cache", "flush", mb.user)
        if qc.maildirsize and quota.set_limit(root_fd, target, usage) != target:
            changed = True
        folders = list_folders(root_fd, self.cfg.store.layout)
        self._delete(mb, root_fd, folders, victims)
        self.bridge.call(
            state.mark_shrunk(
                self.r.store,
                mb.user,
                state="shrunk",
                quota=target,
                rule=rule.name,
                at=self.now,
                idle_since=row.idle_since,
            )
        )
        if changed or first:
            rep.shrunk += 1
            log.info(
                "retention: rule=%s user=%s action=shrink quota=%s original=%s usage=%d "
                "deleted=%d dry_run=no",
                rule.name,
                mb.user,
                target,
                "none" if original == quota.NO_FILE else original,
                usage[0] - sum(f.size for f in victims),
                len(victims),
            )

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
            log.info(
                "retention: rule=%s user=%s recovered=%d gone=%d (interrupted run)",
                self.rule.name,
                mb.user,
                len(rows),
                gone,
            )
        finally:
            os.close(root_fd)

    def _recount(self, root_fd: int) -> None:
        """Recount usage; retried if a directory changed while counting (as Dovecot does)."""
        for _ in range(3):
            before = self._dir_stamps(root_fd)
            usage = quota_usage(self.cfg, root_fd)
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
