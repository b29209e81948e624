"""The cyclic garbage collector set for a long-running server.

What maild builds at start (modules, the config, customer tables, compiled patterns:
~40,000 objects) would be traversed again by every full collection, each ~60 ms on the
event loop; `gc.freeze()` puts it in a generation no collection visits. The collector
stays on, since a session leaves reference cycles (asyncio tasks, futures, exceptions)
that only it frees; a youngest generation of 5,000 allocations instead of 700 lets most
of a message's objects die by reference count before a collection looks at them, so
fewer survive into the older generations, which are the costly ones to traverse
(docs/BENCHMARKS.md section 8).
"""

from __future__ import annotations

import gc

YOUNGEST = 5000  # allocations between collections of the youngest generation


def settle() -> None:
    """Collect, then freeze what is left. Called when the daemon is ready and after each
    reload: what an earlier call froze is unfrozen first, so an old config's cycles are
    freed rather than kept for ever."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNGEST, middle, oldest)
