"""What the worker threads of a run and of a quota restore share."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from maild.retention.config import RetentionConfig
from maild.retention.maildir import folder_usage
from maild.retention.select import quota_counts

T = TypeVar("T")


class Bridge:
    """Lets the worker thread run a store coroutine on the event loop and wait for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        """Start a write without waiting for it (the loop runs them in order)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


def quota_usage(cfg: RetentionConfig, root_fd: int) -> tuple[int, int]:
    """What the quota counts (bytes, messages), from the directories themselves."""
    counted = quota_counts(cfg.store, cfg.quota.ignore_folders)
    b = c = 0
    for _folder, fb, fc in folder_usage(root_fd, cfg.store.layout, counted):
        b += fb
        c += fc
    return b, c
