"""Loaded into `maild serve` by bench/hostile.py --trace: where the event loop's time goes,
and what the heap holds (bench only; maild never imports this).

bench.hostile puts this directory first on maild's PYTHONPATH with MAILD_TRACE_DIR set:

* every loop iteration's busy time (from the selector's return to the next select: how
  long a ready client waits at most) and every callback's duration, summed per callback
  (a task step is named by its coroutine), with the slowest kept;
* with MAILD_TRACE_MEMORY=1, tracemalloc from the start;
* on SIGUSR2, a report N.json in MAILD_TRACE_DIR: the loop figures since the last one, a
  census of live objects by type, glibc's mallinfo2, /proc's smaps_rollup and RSS by
  kind of mapping (glibc's heap, anonymous: CPython's arenas), CPython's allocator
  statistics (sys._debugmallocstats, its arena summary in the report), the memory
  budget's state, objects the collector freed per generation and, with tracemalloc, a
  snapshot file.

Experiments, each behind its own variable (they change what they measure):
MAILD_TRACE_PINNED=1 lists the small objects living in memory mapped since report 1 (what
keeps CPython's arenas from being returned after a load) by type, bytes and the daemon's
attribute that reaches them; MAILD_TRACE_TRIM=1 calls malloc_trim(0) at each report and
records RSS before and after; MAILD_TRACE_SAVEALL=1 keeps the cyclic garbage between
reports 1 and 2 and counts it by type (memory grows meanwhile); MAILD_TRACE_GC_EVERY=S
runs a full collection every S seconds; MAILD_TRACE_FREEZE=1 calls gc.freeze() after
report 1.
"""

from __future__ import annotations

import os

if os.environ.get("MAILD_TRACE_DIR"):
    import asyncio.events
    import collections
    import ctypes
    import gc
    import json
    import selectors
    import signal
    import sys
    import time
    import tracemalloc

    _DIR = os.environ["MAILD_TRACE_DIR"]
    if os.environ.get("MAILD_TRACE_MEMORY"):
        tracemalloc.start(12)

    _BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, float("inf"))

    class _Loop:
        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.t0 = time.perf_counter()
            self.iterations = collections.Counter()  # busy-time bucket -> iterations
            self.busy = 0.0
            self.slowest_iterations: list[tuple[float, int]] = []
            self.by_callback: collections.Counter[str] = collections.Counter()
            self.calls: collections.Counter[str] = collections.Counter()
            self.slow: list[tuple[float, str]] = []
            self.selected_at: float | None = None
            self.callbacks_this_iteration = 0
            self.gc_seconds: collections.Counter[int] = collections.Counter()
            self.gc_cpu: collections.Counter[int] = collections.Counter()
            self.gc_runs: collections.Counter[int] = collections.Counter()
            self.gc_collected: collections.Counter[int] = collections.Counter()
            self.gc_longest = 0.0

    _loop = _Loop()
    _gc_started = [0.0, 0.0]

    def _gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            _gc_started[:] = time.perf_counter(), time.thread_time()
            return
        d = time.perf_counter() - _gc_started[0]
        _loop.gc_cpu[info["generation"]] += time.thread_time() - _gc_started[1]
        _loop.gc_seconds[info["generation"]] += d
        _loop.gc_runs[info["generation"]] += 1
        _loop.gc_collected[info["generation"]] += info["collected"]
        _loop.gc_longest = max(_loop.gc_longest, d)

    gc.callbacks.append(_gc_timer)

    def _bucket(d: float) -> str:
        for b in _BUCKETS:
            if d <= b:
                return f"<={b:g}"
        return "inf"

    def _label(h: asyncio.events.Handle) -> str:
        cb = h._callback
        owner = getattr(cb, "__self__", None)
        if isinstance(owner, asyncio.Task):
            coro = owner.get_coro()
            return f"task {getattr(coro, '__qualname__', repr(coro))}"
        name = getattr(cb, "__qualname__", None) or repr(cb)
        if owner is not None and not isinstance(owner, type):
            name = f"{type(owner).__qualname__}.{getattr(cb, '__name__', name)}"
        return name

    _run = asyncio.events.Handle._run

    def _timed_run(self: asyncio.events.Handle) -> None:
        t = time.perf_counter()
        try:
            _run(self)
        finally:
            d = time.perf_counter() - t
            _loop.callbacks_this_iteration += 1
            if d >= 0.0005:
                label = _label(self)
                _loop.by_callback[label] += d
                _loop.calls[label] += 1
                if d >= 0.02:
                    _loop.slow.append((d, label))
                    if len(_loop.slow) > 400:
                        _loop.slow.sort(reverse=True)
                        del _loop.slow[200:]

    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]

    _select = selectors.EpollSelector.select

    def _timed_select(self: selectors.EpollSelector, timeout: float | None = None) -> list:
        now = time.perf_counter()
        if _loop.selected_at is not None:
            busy = now - _loop.selected_at
            _loop.busy += busy
            _loop.iterations[_bucket(busy)] += 1
            if busy >= 0.05:
                _loop.slowest_iterations.append((busy, _loop.callbacks_this_iteration))
        _loop.callbacks_this_iteration = 0
        try:
            return _select(self, timeout)
        finally:
            _loop.selected_at = time.perf_counter()

    selectors.EpollSelector.select = _timed_select  # type: ignore[method-assign]

    def _mallinfo() -> dict[str, int]:
        class Mallinfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        try:
            f = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            return {}
        f.restype = Mallinfo2
        m = f()
        return {n: getattr(m, n) for n, _ in Mallinfo2._fields_}

    def _pymalloc_stats(path: str) -> str:
        """sys._debugmallocstats writes to the C stderr: sent to a file for the call."""
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(path, "w") as f:
                os.dup2(f.fileno(), 2)
                sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        with open(path) as f:
            return f.read()

    def _rss_by_mapping() -> dict[str, int]:
        """Resident KiB by kind of mapping: glibc's main heap (brk), anonymous mappings
        (CPython's 1 MiB object arenas, glibc's thread arenas and mmapped blocks), files."""
        out = collections.Counter()
        kind = "file"
        with open("/proc/self/smaps") as f:
            for ln in f:
                head = ln.split()
                if "-" in head[0] and ":" not in head[0]:
                    path = head[5] if len(head) > 5 else ""
                    kind = path if path.startswith("[") else ("file" if path else "anon")
                elif head[0] == "Rss:":
                    out[kind] += int(head[1])
        return dict(out)

    def _pymalloc_summary(stats: str) -> dict[str, int]:
        out = {}
        for ln in stats.splitlines():
            name, _, value = ln.partition("=")
            if "arenas" in name or "bytes in" in name or "unused pools" in name:
                out[" ".join(name.split())] = int(value.replace(",", "").strip())
        return out

    def _rss_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))

    def _anon_ranges() -> list[tuple[int, int]]:
        out = []
        with open("/proc/self/maps") as f:
            for ln in f:
                head = ln.split()
                if len(head) == 5 and head[1].startswith("rw"):
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    out.append((lo, hi))
        return out

    _first_anon: list[tuple[int, int]] = []

    def _pinned(objects: list) -> dict[str, object]:
        """The small objects living in anonymous memory mapped since report 1: what keeps
        CPython's arenas made under the load from being returned (by type, with samples
        and, for a few, the types of their referrers)."""
        old = _first_anon

        def new(addr: int) -> bool:
            return not any(lo <= addr < hi for lo, hi in old) and any(
                lo <= addr < hi for lo, hi in now
            )

        now = _anon_ranges()
        seen = {id(o) for o in objects}
        found: list = []
        todo = list(objects)
        while todo:  # every object reachable from the tracked ones (untracked too)
            x = todo.pop()
            if sys.getsizeof(x) <= 512 and new(id(x)):
                found.append(x)
            for y in gc.get_referents(x):
                if id(y) not in seen:
                    seen.add(id(y))
                    todo.append(y)
        pools = collections.Counter(id(x) >> 14 for x in found)
        mib = collections.Counter(id(x) >> 20 for x in found)
        by_type = collections.Counter(type(x).__qualname__ for x in found)
        bytes_by_type: collections.Counter[str] = collections.Counter()
        for x in found:
            bytes_by_type[type(x).__qualname__] += sys.getsizeof(x)
        # Whose they are: the first of the daemon's attributes (or the event loop's
        # queues) that reaches each, breadth first.
        roots: list[tuple[str, object]] = []
        loop = asyncio.events._get_running_loop()
        visited: set[int] = {id(objects), id(found), id(loop)}
        for o in objects:
            if type(o).__qualname__ == "Daemon" and type(o).__module__ == "maild.daemon":
                visited |= {id(o), id(vars(o))}
                roots += [(f"daemon.{k}", v) for k, v in vars(o).items()]
        if loop is not None:
            roots += [("loop._scheduled", loop._scheduled), ("loop._ready", loop._ready)]
            roots += [("loop._selector", loop._selector), ("loop", vars(loop))]
        pinned_ids = {id(x) for x in found}
        claimed: dict[int, str] = {}
        for name, root in roots:
            queue = [root]
            while queue:
                x = queue.pop()
                if id(x) in visited or isinstance(x, type | type(sys)):
                    continue
                visited.add(id(x))
                if id(x) in pinned_ids:
                    claimed.setdefault(id(x), name)
                queue.extend(gc.get_referents(x))
        by_root = collections.Counter(claimed.get(id(x), "?") for x in found)
        root_pools: dict[str, set[int]] = collections.defaultdict(set)
        for x in found:
            root_pools[claimed.get(id(x), "?")].add(id(x) >> 14)
        samples: dict[str, list[str]] = {}
        owners: collections.Counter[str] = collections.Counter()
        for x in found:
            t = type(x).__qualname__
            if len(samples.setdefault(t, [])) < 5:
                samples[t].append(repr(x)[:120])
        for x in found[:: max(1, len(found) // 300)]:
            for r in gc.get_referrers(x):
                if r is not found and r is not objects:
                    owners[f"{type(x).__qualname__} <- {type(r).__qualname__}"] += 1
        return {
            "count": len(found),
            "bytes": sum(sys.getsizeof(x) for x in found),
            "pools": len(pools),
            "mib_spans": sorted(mib.items()),
            "by_type": by_type.most_common(40),
            "bytes_by_type": bytes_by_type.most_common(40),
            "samples": samples,
            "owners_sampled": owners.most_common(40),
            "by_root": by_root.most_common(),
            "pools_by_root": {k: len(v) for k, v in root_pools.items()},
        }

    _seq = [0]

    def _report(_signum: int, _frame: object) -> None:
        _seq[0] += 1
        n = _seq[0]
        gc.collect()
        garbage = None
        if os.environ.get("MAILD_TRACE_SAVEALL"):  # experiment: what the collector frees
            if gc.garbage:
                garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
                garbage = garbage.most_common(80)
                gc.garbage.clear()
            gc.set_debug(gc.DEBUG_SAVEALL if n == 1 else 0)
        objects = gc.get_objects()
        census = collections.Counter(type(o).__qualname__ for o in objects)
        budgets = [
            {k: v for k, v in vars(o).items() if isinstance(v, int | bool)}
            for o in objects
            if type(o).__qualname__ == "Budget" and type(o).__module__ == "maild.smtp.budget"
        ]
        pinned = None
        if os.environ.get("MAILD_TRACE_PINNED"):  # experiment: see _pinned
            if n == 1:
                _first_anon[:] = _anon_ranges()
            else:
                pinned = _pinned(objects)
        del objects
        with open("/proc/self/smaps_rollup") as f:
            smaps = {
                k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f if ":" in ln[:30])
            }
        stats = _pymalloc_stats(os.path.join(_DIR, f"{n}.pymalloc.txt"))
        wall = time.perf_counter() - _loop.t0
        out = {
            "seq": n,
            "wall": wall,
            "loop_busy": _loop.busy,
            "iterations": dict(_loop.iterations),
            "slowest_iterations": sorted(_loop.slowest_iterations, reverse=True)[:30],
            "callbacks_by_time": _loop.by_callback.most_common(40),
            "calls": {k: _loop.calls[k] for k, _ in _loop.by_callback.most_common(40)},
            "slow_callbacks": sorted(_loop.slow, reverse=True)[:60],
            "census": census.most_common(60),
            "gc_count": gc.get_count(),
            "gc_seconds_by_generation": dict(_loop.gc_seconds),
            "gc_runs_by_generation": dict(_loop.gc_runs),
            "gc_cpu_by_generation": dict(_loop.gc_cpu),
            "gc_collected_by_generation": dict(_loop.gc_collected),
            "gc_longest": _loop.gc_longest,
            "gc_objects": sum(census.values()),
            "mallinfo2": _mallinfo(),
            "smaps_rollup_kb": smaps,
            "pymalloc": _pymalloc_summary(stats),
            "rss_by_mapping_kb": _rss_by_mapping(),
            "budget": budgets,
            "pinned": pinned,
            "cyclic_garbage": garbage,
            "threads": len(os.listdir("/proc/self/task")),
        }
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(os.path.join(_DIR, f"{n}.tracemalloc"))
            out["tracemalloc_traced"] = tracemalloc.get_traced_memory()
        if os.environ.get("MAILD_TRACE_TRIM"):  # experiment: what malloc_trim(0) gives back
            before = _rss_kb()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            out["malloc_trim_kb"] = [before, _rss_kb(), _rss_by_mapping()]
        with open(os.path.join(_DIR, f"{n}.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
        _loop.reset()
        if n == 1 and os.environ.get("MAILD_TRACE_FREEZE"):  # experiment: gc.freeze()
            gc.freeze()

    signal.signal(signal.SIGUSR2, _report)

    if os.environ.get("MAILD_TRACE_GC_EVERY"):  # experiment: a full collection that often
        import threading

        def _collector(every: float) -> None:
            while True:
                time.sleep(every)
                gc.collect()

        threading.Thread(
            target=_collector, args=(float(os.environ["MAILD_TRACE_GC_EVERY"]),), daemon=True
        ).start()
