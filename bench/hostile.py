"""Issue 15's hostile load, full size: probe latency and maild's RSS while strangers attack.

A real Postfix downstream at Debian's default process limit (100 re-injection smtpd
processes) and maild with the shipped [server.limits]; the crowd of the audit, all at
once (tests/reliability/hostile.py): 1,000 idle stranger connections that come back when
closed, 200 slowloris, 100 strangers holding MAIL FROM (half of them a RCPT too) and 30
concurrent 24 MB messages sent back to back. Meanwhile a customer and a stranger writing
to postmaster each send one message a second for --seconds.

Reported: each probe's latency (connect to the final 250) p50/p99/max and any probe not
accepted; maild's RSS before the load, its peak, and 10 s after the crowd left (targets:
p99 < 2 s, peak < 400 MB, after within 20% of before).

    python -m bench.hostile [--seconds 60] [--big-only] [--code DIR] [--json FILE]
                            [--workers N] [--direct] [--profile FILE]
                            [--trace DIR [--trace-memory]]

--workers N runs maild with [server] workers = N (1 by default, as the earlier rows of
docs/BENCHMARKS.md section 6): RSS and CPU are then every process's together.

--code DIR runs maild from another checkout (PYTHONPATH), e.g. the code before issue 15,
for the before/after comparison; --big-only runs the 30 big messages and the probes
without the rest of the crowd (the event loop's responsiveness while big messages are
read, checked and relayed).

Finding where the time goes: each probe's replies are timed (connect, 220, EHLO, MAIL,
RCPT, 354, final reply) and reported per step; --direct adds a third probe that sends
the customer's message straight to Postfix's re-injection port under the same crowd
(Postfix's own share of the latency); --profile FILE samples maild with py-spy during
the probe window (raw stacks to FILE, the per-function summary printed); --trace DIR
loads bench/_trace into maild (event-loop iteration and callback times; with
--trace-memory tracemalloc too) and writes its reports to DIR before the load (1), at
the end of the probes (2) and 10 s after the crowd left (3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BIN,
    descendants,
    emit,
    log,
    machine,
    proc_times,
    raise_nofile,
    table,
    tree_cpu,
    tree_rss_kb,
    verdict,
)
from bench.profile import summarise
from tests.harness.maild import Maild
from tests.harness.postfix import Postfix
from tests.integration.conftest import HOSTED, front_policy
from tests.reliability.hostile import (
    BIG_DOMAIN,
    Crowd,
    CrowdProcess,
    percentile,
    postfix_main_cf,
    probes,
)

FULL = Crowd(idle=1000, slowloris=200, holders=100, big=30)
TARGET_P99 = 2.0
TARGET_PEAK_MB = 400.0
TARGET_AFTER = 0.20
STEPS = ("connect", "220", "EHLO", "MAIL", "RCPT", "DATA", "dot")
TRACE = Path(__file__).resolve().parent / "_trace"


def maild_rss_kb(pid: int) -> int:
    """maild's RSS: with [server] workers, the supervisor's, the fork server's and every
    worker's together (the memory budget is the host's, split between the workers)."""
    return sum(tree_rss_kb(pid).values())


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, maild_rss_kb(self.pid))
            except (OSError, RuntimeError):
                return
            self._halt.wait(0.25)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


@dataclass(frozen=True)
class Tools:
    """What else a run measures (see the module's docstring)."""

    direct: bool = False
    profile: str | None = None
    trace: str | None = None
    trace_memory: bool = False


def _py_spy(pid: int, seconds: int, raw: str) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    argv = [spy, "record", "-p", str(pid), "-r", "100", "-d", str(seconds), "-f", "raw", "-o", raw]
    # --native (C frames: the garbage collector, the allocator) must stop the process
    # for each sample; without it py-spy reads it as it runs.
    argv.append("--native" if os.environ.get("BENCH_PY_SPY_NATIVE") else "--nonblocking")
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _cpu(maild: int, crowd: int, postfix: int | None) -> dict[str, float]:
    """CPU seconds so far: maild's (and the time its threads waited for a CPU, from
    schedstat), the crowd's, Postfix's tree and the whole machine's busy time."""
    waited = 0.0
    for pid in (maild, *descendants(maild)):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{pid}/task/{task}/schedstat").read_text()
                    waited += int(stat.split()[1])
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in cpu]
    idle = ticks[3] + ticks[4]
    tck = os.sysconf("SC_CLK_TCK")
    return {
        "maild": tree_cpu([maild]),
        "maild_waited_for_cpu": waited / 1e9,
        "crowd": sum(proc_times(crowd)[:2]),
        "postfix": tree_cpu([postfix]) if postfix else float("nan"),
        "machine_busy": (sum(ticks) - idle) / tck,
        "machine_all": sum(ticks) / tck,
    }


def _trace_report(pid: int, trace: str, n: int) -> None:
    """maild's bench/_trace report n (SIGUSR2), waited for."""
    os.kill(pid, signal.SIGUSR2)
    path = Path(trace) / f"{n}.json"
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def run(
    seconds: int,
    crowd: Crowd,
    code: str | None,
    workdir: Path,
    tools: Tools = Tools(),
    workers: int = 1,
) -> dict[str, Any]:
    paths = [code] if code else []
    if tools.trace:
        Path(tools.trace).mkdir(parents=True, exist_ok=True)
        paths.insert(0, str(TRACE))
        os.environ["MAILD_TRACE_DIR"] = tools.trace
        if tools.trace_memory:
            os.environ["MAILD_TRACE_MEMORY"] = "1"
    if paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    raise_nofile(20000)
    pf = Postfix(
        workdir / "pf",
        hosted_domains=[*HOSTED, BIG_DOMAIN],
        hostname="host.hosted.example",
        main_cf=postfix_main_cf(),
    )
    pf.start()
    policy = front_policy(pf.reinject_port)
    policy["postmaster"]["domains"] = ["hosted.example", BIG_DOMAIN]
    policy["server"]["workers"] = workers
    m = Maild(workdir / "maild", policy)
    try:
        m.start(timeout=60)
        assert m.proc is not None
        pid = m.proc.pid
        asyncio.run(probes(m.port, 0, count=3))  # warm-up: imports, pools, caches
        if tools.trace:
            _trace_report(pid, tools.trace, 1)
        before = maild_rss_kb(pid)
        before_each = tree_rss_kb(pid)
        sampler = Sampler(pid)
        sampler.start()
        log(f"crowd: {crowd}")
        direct = pf.reinject_port if tools.direct else None
        with CrowdProcess(m.port, crowd) as cp:
            ready = cp.wait_ready(300)
            log(f"crowd in (ready={ready}); probing for {seconds}s")
            spy = _py_spy(pid, seconds, tools.profile) if tools.profile else None
            load = [os.getloadavg()[0]]
            cpu0 = _cpu(pid, cp.proc.pid, pf.master_pid())
            t0 = time.monotonic()
            results = asyncio.run(probes(m.port, seconds, direct_port=direct))
            window = time.monotonic() - t0
            cpu1 = _cpu(pid, cp.proc.pid, pf.master_pid())
            load.append(os.getloadavg()[0])
            if tools.trace:
                _trace_report(pid, tools.trace, 2)
            stats = cp.stop()
        if spy is not None:
            spy.wait(60)
        time.sleep(10)
        after = maild_rss_kb(pid)
        after_each = tree_rss_kb(pid)
        sampler.stop()
        if tools.trace:
            _trace_report(pid, tools.trace, 3)
        status = m.cli("status", "--json").stdout
    finally:
        m.stop()
        pf.stop()
    out: dict[str, Any] = {
        "seconds": seconds,
        "window": window,
        "crowd": crowd.__dict__,
        "crowd_stats": stats,
        "rss_before_kb": before,
        "rss_peak_kb": sampler.peak,
        "rss_after_kb": after,
        "rss_each_kb": {"before": before_each, "after": after_each},
        "workers": workers,
        "code": code or "this checkout",
        "status": status,
        "loadavg_start_end": load,
        "cpu_seconds": {k: cpu1[k] - cpu0[k] for k in cpu0},
        "profile": (
            summarise(Path(tools.profile))
            if tools.profile and Path(tools.profile).exists()
            else None
        ),
    }
    for who in ("customer", "postmaster", "postfix"):
        rs = [r for r in results if r.who == who]
        if not rs:
            continue
        ok = [r for r in rs if r.code == 250]
        secs = [r.seconds for r in ok]
        out[who] = {
            "sent": len(rs),
            "accepted": len(ok),
            "failures": [f"{r.code} {r.reply[:120]}" for r in rs if r.code != 250][:10],
            "p50": percentile(secs, 50),
            "p99": percentile(secs, 99),
            "max": max(secs, default=float("nan")),
            "steps": step_stats(ok),
            "slowest": [
                {"seconds": r.seconds, "steps": r.steps}
                for r in sorted(ok, key=lambda r: -r.seconds)[:3]
            ],
        }
    return out


def step_stats(results: list[Any]) -> dict[str, dict[str, float]]:
    """Per step, the time from the previous reply to this one: p50, p99, max, and its
    share of all the probes' time."""
    total = sum(r.seconds for r in results) or 1.0
    out = {}
    for i, step in enumerate(STEPS):
        prev = STEPS[i - 1] if i else None
        d = [r.steps[step] - (r.steps[prev] if prev else 0.0) for r in results if step in r.steps]
        out[step] = {
            "p50": percentile(d, 50),
            "p99": percentile(d, 99),
            "max": max(d, default=float("nan")),
            "share": sum(d) / total,
        }
    return out


def report(r: dict[str, Any]) -> str:
    mb = 1024.0
    rows = []
    for who in ("customer", "postmaster", "postfix"):
        if who not in r:
            continue
        p = r[who]
        rows.append(
            (
                who,
                f"{p['accepted']}/{p['sent']}",
                f"{p['p50']:.2f}",
                f"{p['p99']:.2f}",
                f"{p['max']:.2f}",
                "; ".join(p["failures"][:2]) or "-",
            )
        )
    lines = [table(("probe", "accepted", "p50 s", "p99 s", "max s", "first failures"), rows), ""]
    for who in ("customer", "postmaster", "postfix"):
        if who not in r:
            continue
        st = r[who]["steps"]
        lines.append(
            table(
                (f"{who}: step", "p50 s", "p99 s", "max s", "share of time"),
                [
                    (
                        k,
                        f"{v['p50']:.3f}",
                        f"{v['p99']:.3f}",
                        f"{v['max']:.3f}",
                        f"{v['share']:.0%}",
                    )
                    for k, v in st.items()
                ],
            )
        )
        lines.append("")
    before, peak, after = (r["rss_before_kb"] / mb, r["rss_peak_kb"] / mb, r["rss_after_kb"] / mb)
    grow = (after - before) / before
    p99 = max(r["customer"]["p99"], r["postmaster"]["p99"])
    lines.append(
        table(
            ("target", "measured", "status"),
            [
                (
                    "every probe accepted",
                    f"{r['customer']['accepted'] + r['postmaster']['accepted']}"
                    f"/{r['customer']['sent'] + r['postmaster']['sent']}",
                    verdict(
                        r["customer"]["accepted"] == r["customer"]["sent"]
                        and r["postmaster"]["accepted"] == r["postmaster"]["sent"]
                    ),
                ),
                (f"probe p99 < {TARGET_P99:g} s", f"{p99:.2f} s", verdict(p99 < TARGET_P99)),
                (
                    f"peak RSS < {TARGET_PEAK_MB:g} MB",
                    f"{peak:.0f} MB (before {before:.0f} MB)",
                    verdict(peak < TARGET_PEAK_MB),
                ),
                (
                    "RSS after within 20% of before",
                    f"{after:.0f} MB ({grow:+.0%})",
                    verdict(grow <= TARGET_AFTER),
                ),
            ],
        )
    )
    lines.append("")
    if r.get("workers", 1) > 1:
        each = r["rss_each_kb"]
        lines.append(
            f"workers = {r['workers']}: RSS is every process's together; before / after by pid: "
            + ", ".join(
                f"{pid} {kb / mb:.0f} / {each['after'].get(pid, 0) / mb:.0f} MB"
                for pid, kb in each["before"].items()
            )
        )
    lines.append("crowd saw: " + ", ".join(f"{k} {v}" for k, v in sorted(r["crowd_stats"].items())))
    lines.append(
        "load average at the start / end of the probes: {:.2f} / {:.2f}".format(
            *r["loadavg_start_end"]
        )
    )
    c = r["cpu_seconds"]
    lines.append(
        f"CPU in the {r['window']:.0f} s of probes: maild {c['maild']:.1f} s (and "
        f"{c['maild_waited_for_cpu']:.1f} s waiting for a CPU), the crowd {c['crowd']:.1f} s, "
        f"Postfix {c['postfix']:.1f} s; the machine {c['machine_busy']:.0f} of "
        f"{c['machine_all']:.0f} CPU-seconds busy"
    )
    if r["profile"]:
        lines += ["", "maild's samples (py-spy) during the probes:", r["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--big-only", action="store_true")
    ap.add_argument("--idle", type=int, default=FULL.idle)
    ap.add_argument("--slowloris", type=int, default=FULL.slowloris)
    ap.add_argument("--holders", type=int, default=FULL.holders)
    ap.add_argument("--big", type=int, default=FULL.big)
    ap.add_argument("--code", help="run maild from this checkout (PYTHONPATH)")
    ap.add_argument("--json")
    ap.add_argument(
        "--workers", type=int, default=1, help="[server] workers (RSS and CPU: all processes)"
    )
    ap.add_argument("--direct", action="store_true", help="also probe Postfix directly")
    ap.add_argument("--profile", help="py-spy's raw samples of maild to this file")
    ap.add_argument("--trace", help="bench/_trace's reports from maild to this directory")
    ap.add_argument("--trace-memory", action="store_true", help="with --trace: tracemalloc")
    a = ap.parse_args(argv)
    crowd = Crowd(
        idle=0 if a.big_only else a.idle,
        slowloris=0 if a.big_only else a.slowloris,
        holders=0 if a.big_only else a.holders,
        big=a.big,
    )
    with tempfile.TemporaryDirectory(prefix="maild-hostile-") as d:
        tools = Tools(a.direct, a.profile, a.trace, a.trace_memory)
        r = run(a.seconds, crowd, a.code, Path(d), tools, a.workers)
    r["machine"] = machine()
    emit(r, report(r), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
