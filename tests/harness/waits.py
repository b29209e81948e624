"""How long tests wait for a condition before giving up (a wait, never a timed assertion).

Every wait helper returns as soon as its condition holds, so a generous limit costs
nothing when the test passes; it only decides how long a broken test takes to fail. CI
machines are shared and can be several times slower than a laptop, so limits are scaled:
MAILD_TEST_WAIT_SCALE, else 4 under CI=true and 2 elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _scale() -> float:
    env = os.environ.get("MAILD_TEST_WAIT_SCALE")
    if env:
        return float(env)
    return 4.0 if os.environ.get("CI") == "true" else 2.0


SCALE = _scale()


def patience(seconds: float) -> float:
    """The limit to wait for something that normally takes well under `seconds`."""
    return seconds * SCALE


def wait_until(cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.1) -> T | None:
    """Poll ``cond()`` until it returns something truthy; that value, or None at the limit."""
    deadline = time.monotonic() + patience(timeout)
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


async def wait_until_async(
    cond: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.05
) -> T | None:
    """The same for an async predicate, without blocking the event loop."""
    deadline = time.monotonic() + patience(timeout)
    while True:
        value = await cond()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(interval)
