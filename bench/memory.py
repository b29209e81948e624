"""maild's memory: RSS before, during and after 200,000 messages, and per idle connection.

Why: a production aiosmtpd filter was rewritten in Rust because its memory grew
(chatmail/relay#804). The question is whether anything in maild keeps a little per
message (decision rows, counters, campaign copies, DNS cache, sessions) without bound.
The messages go to smtp-sink (the fastest downstream, so 200,000 take minutes, not an
hour); every rule is on (bench policy). RSS is read from /proc/PID/status every second.

* before: after start; warm: after a warm-up of ``--warmup`` messages (imports, pools,
  caches and the SQLite page cache settle), the baseline of "flat";
* during: the peak and the last sample while sending; after: 10 s after the last message;
* growth = (after - warm) / warm, and (peak - warm) / warm; target within 10%, < 150 MB;
* idle: ``--idle`` sessions that greeted (EHLO) and wait; (RSS with them - RSS before
  them) / n; target < 40 KB each.

    python -m bench.memory [--messages 200000] [--idle 500]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    MaildProc,
    bench_policy,
    emit,
    log,
    machine,
    new_port,
    raise_nofile,
    smtp_source,
    start_dns,
    table,
    uvloop_path,
    verdict,
)
from bench.smtpclient import park, unpark

TARGET_GROWTH = 0.10
TARGET_RSS_MB = 150.0
TARGET_IDLE_KB = 40.0


class Sampler(threading.Thread):
    """RSS of one process every ``interval`` seconds, with the message count so far."""

    def __init__(self, m: MaildProc, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.m = m
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (t, sent so far, rss kB)
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.wait(self.interval):
            try:
                self.samples.append((time.monotonic() - t0, self.sent, self.m.rss_kb()))
            except (OSError, RuntimeError):
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def measure_one(
    workdir: Path, loop: str, uv: str | None, args: argparse.Namespace, dns: Any, sink_port: int
) -> dict[str, Any]:
    policy = bench_policy(
        workdir,
        listen_port=new_port(),
        downstream_port=sink_port,
        nameserver=dns.nameserver,
        workers=args.workers,
    )
    m = MaildProc(workdir, policy, loop=loop, uvloop_dir=uv).start()
    out: dict[str, Any] = {"loop": loop}
    try:
        time.sleep(2 if args.workers == 1 else 5)
        out["before_kb"] = m.rss_kb()
        # idle connections first, on the fresh process, then again after the load
        out["idle"] = [idle_cost(m, args.idle)]
        r = smtp_source(m.port, sessions=args.sessions, messages=args.warmup, size=args.size)
        if r.returncode:
            raise RuntimeError(f"warm-up failed: {r.output}\n{m.tail()}")
        time.sleep(3)
        out["warm_kb"] = m.rss_kb()
        out["warm_each"] = m.tree_rss_kb()
        sampler = Sampler(m)
        sampler.start()
        sent = 0
        t0 = time.perf_counter()
        checkpoints = []
        while sent < args.messages:
            n = min(args.chunk, args.messages - sent)
            r = smtp_source(
                m.port, sessions=args.sessions, messages=n, size=args.size, timeout=3600
            )
            if r.returncode:
                raise RuntimeError(f"load failed after {sent}: {r.output}\n{m.tail()}")
            sent += n
            sampler.sent = sent
            checkpoints.append((sent, m.rss_kb()))
            log(f"   {loop}: {sent} messages, RSS {checkpoints[-1][1] / 1024:.1f} MB")
        out["seconds"] = time.perf_counter() - t0
        time.sleep(10)
        sampler.stop()
        out["after_kb"] = m.rss_kb()
        out["after_each"] = m.tree_rss_kb()
        rss = [s[2] for s in sampler.samples] or [out["after_kb"]]
        out["peak_kb"] = max(rss + [out["after_kb"]])
        out["checkpoints"] = checkpoints
        out["samples"] = sampler.samples
        out["relayed"] = m.count_log(": relay: DATA")
        out["idle"].append(idle_cost(m, args.idle))
    finally:
        m.stop()
    warm = out["warm_kb"]
    out["growth"] = (out["after_kb"] - warm) / warm
    out["peak_growth"] = (out["peak_kb"] - warm) / warm
    # every process of the tree (the workers of [server] workers), warm-up to after
    out["each_growth"] = {
        str(pid): (out["after_each"][pid] - kb) / kb
        for pid, kb in out["warm_each"].items()
        if pid in out["after_each"]
    }
    return out


def idle_cost(m: MaildProc, n: int) -> dict[str, float]:
    """RSS per parked session: open n, settle, measure, close (with workers, of the
    whole tree: the sessions are in the workers)."""
    if n <= 0:
        return {"n": 0, "kb_each": 0.0}

    def rss() -> int:
        return sum(m.tree_rss_kb().values())

    base = rss()

    async def go() -> int:
        writers = await park(m.port, n)
        await asyncio.sleep(2)
        with_idle = rss()
        await unpark(writers)
        return with_idle

    with_idle = asyncio.run(go())
    time.sleep(1)
    return {
        "n": n,
        "base_kb": base,
        "with_kb": with_idle,
        "kb_each": (with_idle - base) / n,
        "after_close_kb": rss(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=10_000, help="messages per smtp-source run")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="[server] workers; RSS and growth are then also read for every process",
    )
    ap.add_argument("--loops", default="asyncio", help="asyncio, uvloop or both")
    ap.add_argument("--uvloop", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from tests.harness.sink import SmtpSink

    raise_nofile()
    uv = uvloop_path(args.uvloop)
    loops = {"asyncio": ["asyncio"], "uvloop": ["uvloop"], "both": ["asyncio", "uvloop"]}[
        args.loops
    ]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-mem-"))
    info = machine()
    dns = start_dns()
    sink = SmtpSink(backlog=1024).start()
    results = []
    try:
        for loop in loops:
            log(f"memory: {loop}, {args.messages} messages, {args.idle} idle sessions")
            results.append(measure_one(workdir / loop, loop, uv, args, dns, sink.port))
    finally:
        sink.close()
        dns.stop()
    cmd = "python -m bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    mb = 1024.0
    rows, trows = [], []
    for r in results:
        idle_each = max(i["kb_each"] for i in r["idle"])
        rows.append(
            [
                r["loop"]
                + (f", the supervisor of {args.workers} workers" if args.workers > 1 else ""),
                f"{r['before_kb'] / mb:.1f}",
                f"{r['warm_kb'] / mb:.1f}",
                f"{r['peak_kb'] / mb:.1f}",
                f"{r['after_kb'] / mb:.1f}",
                f"{r['growth']:+.1%}",
                f"{r['peak_growth']:+.1%}",
                " / ".join(f"{i['kb_each']:.1f}" for i in r["idle"]),
                f"{args.messages / r['seconds']:.0f}",
            ]
        )
        if args.workers > 1:
            worst = max(r["each_growth"].values())
            each = ", ".join(
                f"{pid}: {r['warm_each'][int(pid)] / mb:.1f} -> "
                f"{r['after_each'][int(pid)] / mb:.1f} MB ({g:+.1%})"
                for pid, g in r["each_growth"].items()
            )
            trows.append(
                [
                    f"RSS of every process flat within 10% ({args.workers} workers, {r['loop']})",
                    f"largest growth {worst:+.1%} (warm -> after, by pid: {each})",
                    verdict(abs(worst) <= TARGET_GROWTH),
                ]
            )
        trows += [
            [
                f"RSS flat within 10% over {args.messages:,} messages ({r['loop']})",
                f"{r['growth']:+.1%} (peak {r['peak_growth']:+.1%})",
                verdict(abs(r["growth"]) <= TARGET_GROWTH and r["peak_growth"] <= TARGET_GROWTH),
            ],
            [
                f"RSS < 150 MB ({r['loop']})",
                f"peak {r['peak_kb'] / mb:.1f} MB",
                verdict(r["peak_kb"] / mb < TARGET_RSS_MB),
            ],
            [
                f"< 40 KB per idle connection ({r['loop']})",
                f"{idle_each:.1f} KB",
                verdict(idle_each < TARGET_IDLE_KB),
            ],
        ]
    md = [
        f"Measured {info['date']} with `{cmd.strip()}`: maild in front of smtp-sink, every "
        f"rule on, {args.messages:,} messages of {args.size} B in smtp-source runs of "
        f"{args.chunk:,} ({args.sessions} sessions), after a {args.warmup:,}-message warm-up; "
        f"{args.idle} idle sessions (banner + EHLO) before and after the load.",
        "",
        table(
            [
                "loop",
                "before MB",
                "warm MB",
                "peak MB",
                "after MB",
                "growth",
                "peak growth",
                "KB per idle session (fresh / after load)",
                "msg/s",
            ],
            rows,
        ),
        "",
        table(["target", "measured", "status"], trows),
    ]
    text = "\n".join(md) + "\n"
    result = {
        "benchmark": "memory",
        "machine": info,
        "command": cmd.strip(),
        "results": results,
        "markdown": text,
    }
    return emit(result, text, args.json)


if __name__ == "__main__":
    main()
