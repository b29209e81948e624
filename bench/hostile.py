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

--code DIR runs maild from another checkout (PYTHONPATH), e.g. the code before issue 15,
for the before/after comparison; --big-only runs the 30 big messages and the probes
without the rest of the crowd (the event loop's responsiveness while big messages are
read, checked and relayed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import emit, log, machine, raise_nofile, rss_kb, table, verdict
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


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, rss_kb(self.pid))
            except (OSError, RuntimeError):
                return
            self._halt.wait(0.25)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def run(seconds: int, crowd: Crowd, code: str | None, workdir: Path) -> dict[str, Any]:
    if code:
        os.environ["PYTHONPATH"] = code
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
    m = Maild(workdir / "maild", policy)
    try:
        m.start(timeout=60)
        assert m.proc is not None
        pid = m.proc.pid
        asyncio.run(probes(m.port, 0, count=3))  # warm-up: imports, pools, caches
        before = rss_kb(pid)
        sampler = Sampler(pid)
        sampler.start()
        log(f"crowd: {crowd}")
        with CrowdProcess(m.port, crowd) as cp:
            ready = cp.wait_ready(300)
            log(f"crowd in (ready={ready}); probing for {seconds}s")
            t0 = time.monotonic()
            results = asyncio.run(probes(m.port, seconds))
            window = time.monotonic() - t0
            stats = cp.stop()
        time.sleep(10)
        after = rss_kb(pid)
        sampler.stop()
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
        "code": code or "this checkout",
        "status": status,
    }
    for who in ("customer", "postmaster"):
        rs = [r for r in results if r.who == who]
        ok = [r.seconds for r in rs if r.code == 250]
        out[who] = {
            "sent": len(rs),
            "accepted": len(ok),
            "failures": [f"{r.code} {r.reply[:120]}" for r in rs if r.code != 250][:10],
            "p50": percentile(ok, 50),
            "p99": percentile(ok, 99),
            "max": max(ok, default=float("nan")),
        }
    return out


def report(r: dict[str, Any]) -> str:
    mb = 1024.0
    rows = []
    for who in ("customer", "postmaster"):
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
    lines.append("crowd saw: " + ", ".join(f"{k} {v}" for k, v in sorted(r["crowd_stats"].items())))
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
    a = ap.parse_args(argv)
    crowd = Crowd(
        idle=0 if a.big_only else a.idle,
        slowloris=0 if a.big_only else a.slowloris,
        holders=0 if a.big_only else a.holders,
        big=a.big,
    )
    with tempfile.TemporaryDirectory(prefix="maild-hostile-") as d:
        r = run(a.seconds, crowd, a.code, Path(d))
    r["machine"] = machine()
    emit(r, report(r), a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
