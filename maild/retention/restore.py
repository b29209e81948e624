"""Restore-on-login: a shrunk mailbox accessed again gets its quota back at once.

An access (a login in Dovecot's log, `maild access touch`) after the idle period that
justified a shrink restores the original limit, under the mailbox lock, in a worker
thread. Dovecot may write the shrunk limit back when it recalculates maildirsize just
after the login, so each restore is checked again a little later, and at every run for
two days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from maild.retention import quota, state
from maild.retention.config import RetentionConfig
from maild.retention.locks import LockBusy, mailbox_lock
from maild.retention.mailboxes import user_path
from maild.retention.maildir import (
    open_root,
)
from maild.retention.worker import Bridge, quota_usage
from maild.store.base import Store, StoreError

log = logging.getLogger("maild.retention")
# Seconds after a live restore to check that it held: a Dovecot process that read the
# shrunk limit just before (the login that triggered the restore) may write it back when
# it recalculates maildirsize, usually within a second or two.
VERIFY_AFTER = (2.0, 30.0)
RESTORE_RETRY = 10.0  # seconds between attempts while a run holds the mailbox
RESTORE_ATTEMPTS = 60


def should_restore(row: state.MailboxRow) -> bool:
    """A shrunk mailbox accessed after the idle period that justified the shrink."""
    if row.quota_state == "normal" or row.last_access is None:
        return False
    since = row.shrunk_idle_since if row.shrunk_idle_since is not None else (row.shrunk_at or 0.0)
    return row.last_access > since


class QuotaRestorer:
    """Restores the quotas of one configuration's shrunk mailboxes."""

    def __init__(
        self,
        cfg: RetentionConfig,
        store: Store,
        lock_dir: str,
        userdb: quota.UserdbOverrides | None,
        clock: Callable[[], float],
    ):
        self.cfg = cfg
        self.store = store
        self.lock_dir = lock_dir
        self.userdb = userdb
        self.clock = clock
        self._later: set[asyncio.Task] = set()

    async def on_access(
        self, rows: list[tuple[str, float, str]], *, background: bool = False
    ) -> None:
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
        rows = [
            r
            for r in await state.recently_restored(self.store, since)
            if only is None or r.user == only
        ]
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
            log.warning(
                "retention: action=restore user=%s quota=%s reason=maildirsize had the "
                "shrunk limit again (re-applied)",
                row.user,
                row.restored_quota,
            )
        return fixed

    async def restore(self, user: str, *, reason: str) -> bool:
        row = await state.mailbox(self.store, user)
        if row is None or row.quota_state == "normal":
            return False
        bridge = Bridge(asyncio.get_running_loop())
        return await asyncio.to_thread(self._restore, row, reason, bridge)

    async def close(self) -> None:
        for task in list(self._later):
            task.cancel()
        for task in list(self._later):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _restore(self, row: state.MailboxRow, reason: str, bridge: Bridge) -> bool:
        user = row.user
        try:
            with mailbox_lock(self.lock_dir, user, self.cfg.lock_timeout):
                original = row.original_quota
                if (
                    self.userdb is not None
                    and self.userdb.remove(user)
                    and self.cfg.quota.flush_auth_cache
                ):
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
                                log.error(
                                    "retention: action=restore user=%s error=original quota "
                                    "unknown, maildirsize left as it is",
                                    user,
                                )
                                return False
                            if original == quota.NO_FILE:
                                quota.remove(root_fd)
                            else:
                                quota.set_limit(root_fd, original, quota_usage(self.cfg, root_fd))
                        quota.drop_original(root_fd)  # ours; stale, it would mislead
                finally:
                    if root_fd is not None:
                        os.close(root_fd)
                bridge.call(
                    state.mark_restored(
                        self.store,
                        user,
                        self.clock(),
                        original if self.cfg.quota.maildirsize and root_fd is not None else None,
                    )
                )
        except LockBusy:
            log.warning("retention: action=restore user=%s status=busy (will retry)", user)
            return False
        log.info(
            "retention: action=restore user=%s quota=%s reason=%s",
            user,
            "none" if original in (None, quota.NO_FILE) else original,
            reason,
        )
        return True
