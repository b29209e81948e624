"""maild.gcpolicy: the start-up heap frozen, and a reload's old objects still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from maild import gcpolicy


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_is_alive_and_widens_the_youngest_generation() -> None:
    gc.unfreeze()
    gcpolicy.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == gcpolicy.YOUNGEST


def test_a_cycle_frozen_by_one_settle_is_freed_by_the_next() -> None:
    # An old config after a reload: alive at the first settle, garbage by the second.
    node = _Node()
    ref = weakref.ref(node)
    gcpolicy.settle()
    del node
    gc.collect()
    assert ref() is not None  # frozen: no collection visits it
    gcpolicy.settle()
    assert ref() is None
