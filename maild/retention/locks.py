"""Advisory locks that serialise maild's own hands on one mailbox (and one rule's runs).

A scheduled run, a `maild retention run` from cron, and a login that restores a quota
may all touch the same mailbox; each takes the mailbox's lock first. Locks live in
maild's lock directory, never in the mail store, and vanish with the process holding
them (flock), so a crash never leaves a stale lock behind.

With a shared PostgreSQL state (several nodes, each with its own lock directory), a
mailbox lock also takes the mailbox's lease in the store (maild.store.leases), so two
nodes never work on one mailbox at the same time: the second waits up to the lock
timeout, then skips the mailbox as busy, exactly as with a local lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from types import TracebackType
from typing import Any

LEASE_TTL = 900.0  # a crashed node's mailbox lease frees itself after this many seconds
# lock_dir -> (store, event loop): mailbox locks under that directory also take a lease
_LEASES: dict[str, tuple[Any, asyncio.AbstractEventLoop]] = {}


def bind_store(lock_dir: str, store: Any) -> None:
    """Make mailbox locks under lock_dir take store leases too, when the store is shared
    (PostgreSQL). Call from the event loop the store runs on."""
    if getattr(store, "dialect", "sqlite") != "postgresql":
        return
    with contextlib.suppress(RuntimeError):
        _LEASES[lock_dir] = (store, asyncio.get_running_loop())


class LockBusy(Exception):
    """Another maild process holds the lock."""


class FileLock:
    def __init__(self, path: str, timeout: float = 0.0):
        self.path = path
        self.timeout = timeout
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockBusy(self.path) from None
                time.sleep(0.05)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


class LeasedLock(FileLock):
    """The local file lock, then the store lease (from a worker thread, never the loop)."""

    def __init__(
        self, path: str, timeout: float, name: str, store: Any, loop: asyncio.AbstractEventLoop
    ):
        super().__init__(path, timeout)
        self.name, self.store, self.loop = name, store, loop

    def _call(self, coro: Any) -> Any:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # waiting here would deadlock the loop: treat as busy, never skip the lease
            coro.close()
            raise LockBusy(f"{self.name}: lease taken from the event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def acquire(self) -> None:
        from maild.store import leases

        super().acquire()
        deadline = time.monotonic() + self.timeout
        try:
            while not self._call(leases.acquire(self.store, self.name, ttl=LEASE_TTL)):
                if time.monotonic() >= deadline:
                    raise LockBusy(self.name)
                time.sleep(0.1)
        except BaseException:
            super().release()
            raise

    def release(self) -> None:
        from maild.store import leases

        try:
            if self.fd is not None:
                self._call(leases.release(self.store, self.name))
        finally:
            super().release()


def mailbox_lock(lock_dir: str, user: str, timeout: float) -> FileLock:
    path = os.path.join(lock_dir, "mailbox", _key(user) + ".lock")
    shared = _LEASES.get(lock_dir)
    if shared is not None:
        return LeasedLock(path, timeout, f"mailbox:{user}", *shared)
    return FileLock(path, timeout)


def rule_lock(lock_dir: str, rule: str) -> FileLock:
    return FileLock(os.path.join(lock_dir, "rule", _key(rule) + ".lock"), 0.0)


def file_lock(path: str, timeout: float) -> FileLock:
    return FileLock(path + ".lock", timeout)
