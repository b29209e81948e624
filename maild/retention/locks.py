"""Advisory locks that serialise maild's own hands on one mailbox (and one rule's runs).

A scheduled run, a `maild retention run` from cron, and a login that restores a quota
may all touch the same mailbox; each takes the mailbox's lock first. Locks live in
maild's lock directory, never in the mail store, and vanish with the process holding
them (flock), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from types import TracebackType


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

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]


def mailbox_lock(lock_dir: str, user: str, timeout: float) -> FileLock:
    return FileLock(os.path.join(lock_dir, "mailbox", _key(user) + ".lock"), timeout)


def rule_lock(lock_dir: str, rule: str) -> FileLock:
    return FileLock(os.path.join(lock_dir, "rule", _key(rule) + ".lock"), 0.0)


def file_lock(path: str, timeout: float) -> FileLock:
    return FileLock(path + ".lock", timeout)
