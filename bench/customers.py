"""Customers at provider scale (issue 19): lookups, index build and RSS by number of
customers, and maild's throughput with 100,000 customers against the same run with one.

Why this shape: the issue's claim is that nothing per connection grows with the number
of customers. Each size runs in a fresh interpreter (RSS is that process's growth while
it parses the customer tables and builds the index, nothing left over from a bigger
size); lookups are timed for a client that is no customer (the case the old linear scan
paid in full), for a customer's address, login and sender domain, and for the linear
scan maild did before, as a reference. The files source is timed too: a first load of
N files, and a refresh that finds nothing changed (one stat per file).

The throughput comparison runs two ``maild serve`` in front of one smtp-sink, one with
the bench customer alone, one with N generated customers in policies.toml and the bench
customer last; smtp-source feeds them alternately (the order rotates each repetition)
and the ratio is taken within each repetition; the machine's load average is reported
with it, because the machine is shared.

    python -m bench.customers [--sizes 1000,10000,100000] [--throughput-customers 100000]
                              [--messages 2000] [--sessions 20] [--reps 3]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    MaildProc,
    Stat,
    bench_policy,
    emit,
    log,
    machine,
    new_port,
    raise_nofile,
    rotate,
    rss_kb,
    smtp_source,
    start_dns,
    table,
    verdict,
)


def customer_table(i: int) -> dict[str, Any]:
    """Customer i: one /32, one login, one domain (the issue's shape)."""
    return {
        "name": f"cust{i:06d}",
        "networks": [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"],
        "logins": [f"user{i}@cust{i}.example"],
        "domains": [f"cust{i}.example"],
        "contact": f"ops@cust{i}.example",
    }


def _median_ns(fn: Any, arg: Any, n: int) -> float:
    """Median of 5 batches of n calls, in ns per call."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(arg)
        times.append((time.perf_counter_ns() - t0) / n)
    times.sort()
    return times[2]


def measure_size(n: int, workdir: Path, files: bool) -> dict[str, Any]:
    """One size, in this (fresh) process."""
    from maild.address import parse_path
    from maild.components import WIRING
    from maild.config import Reader, parse_customer
    from maild.customers.index import CustomerIndex

    rss0 = rss_kb(os.getpid())
    tables = [customer_table(i) for i in range(n)]
    t0 = time.perf_counter()
    customers = [parse_customer(Reader(t, "", []), WIRING.customer_keys, "bench") for t in tables]
    parse_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = CustomerIndex.build(customers)
    build_s = time.perf_counter() - t0
    del tables
    rss = rss_kb(os.getpid()) - rss0
    stranger = ipaddress.ip_address("192.0.2.1")
    last = ipaddress.ip_address(str(customers[-1].networks[0].network_address))
    sender = parse_path(f"<a@cust{n - 1}.example>")
    reps = 20000
    out: dict[str, Any] = {
        "customers": n,
        "parse_s": parse_s,
        "build_s": build_s,
        "rss_mb": rss / 1024,
        "miss_ns": _median_ns(idx.by_ip, stranger, reps),
        "hit_ns": _median_ns(idx.by_ip, last, reps),
        "login_ns": _median_ns(idx.by_login, f"user{n - 1}@cust{n - 1}.example", reps),
        "sender_ns": _median_ns(idx.by_sender, sender, reps),
    }
    # The linear scan of maild before this index, for a stranger (every network tried).
    nets = sorted(
        ((net, c) for c in customers for net in c.networks), key=lambda x: -x[0].prefixlen
    )

    def linear(ip: Any) -> Any:
        for net, c in nets:
            if ip.version == net.version and ip in net:
                return c
        return None

    out["linear_miss_ns"] = _median_ns(linear, stranger, max(3, 200000 // n))
    if files:
        out.update(_files(customers, tables_dir=workdir / f"files-{n}"))
    return out


def _files(customers: list[Any], tables_dir: Path) -> dict[str, Any]:
    """Write N customer files, load them once, then refresh with nothing changed."""
    from maild.components import parse
    from maild.customers.cli import render
    from maild.customers.sources import FilesSource

    tables_dir.mkdir(parents=True, exist_ok=True)
    for i in range(len(customers)):
        (tables_dir / f"cust{i:06d}.toml").write_text(render(customer_table(i)))
    config = parse(
        {"customer_source": {"type": "files", "path": str(tables_dir)}},
        str(tables_dir.parent / "policies.toml"),
    )
    src = FilesSource(config.customer_source, config)
    t0 = time.perf_counter()
    loaded = src.load()
    src.commit(loaded)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = src.load()
    unchanged = time.perf_counter() - t0
    assert len(loaded.customers) == len(customers) and not again.changed
    return {"files_load_s": first, "files_unchanged_refresh_s": unchanged}


def sizes_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['customers']:,}",
                f"{r['miss_ns'] / 1000:.2f} us",
                f"{r['hit_ns'] / 1000:.2f} us",
                f"{r['login_ns'] / 1000:.2f} us / {r['sender_ns'] / 1000:.2f} us",
                f"{r['linear_miss_ns'] / 1e6:.2f} ms",
                f"{r['parse_s']:.2f} s + {r['build_s']:.2f} s",
                f"{r['rss_mb']:.0f} MB",
                (
                    f"{r['files_load_s']:.1f} s / {r['files_unchanged_refresh_s'] * 1000:.0f} ms"
                    if "files_load_s" in r
                    else "-"
                ),
            ]
        )
    return table(
        [
            "customers",
            "by_ip, no customer",
            "by_ip, a customer",
            "by_login / by_sender",
            "old linear scan, no customer",
            "parse + index build",
            "RSS growth",
            "files: first load / unchanged refresh",
        ],
        rows,
    )


def throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.harness.sink import SmtpSink

    raise_nofile()
    dns = start_dns()
    sink = SmtpSink(backlog=1024).start()
    mailds: dict[str, MaildProc] = {}
    try:
        for label, n in (("1 customer", 0), (f"{args.throughput_customers:,} customers", 1)):
            wd = workdir / ("one" if n == 0 else "many")
            policy = bench_policy(
                wd, listen_port=new_port(), downstream_port=sink.port, nameserver=dns.nameserver
            )
            bench = policy["customers"][-1]
            generated = [customer_table(i) for i in range(args.throughput_customers)] if n else []
            policy["customers"] = [*generated, bench]  # the sending customer last
            log(f"   starting maild with {len(policy['customers'])} customer(s)")
            mailds[label] = MaildProc(wd, policy).start(timeout=600)
        for m in mailds.values():  # warm-up
            smtp_source(m.port, sessions=args.sessions, messages=args.sessions * 4, size=2048)
        rates = {k: Stat() for k in mailds}
        ratios = Stat()
        loads = []
        for rep in range(args.reps):
            got: dict[str, float] = {}
            for key in rotate(list(mailds), rep):
                r = smtp_source(
                    mailds[key].port, sessions=args.sessions, messages=args.messages, size=2048
                )
                if r.returncode != 0:
                    raise RuntimeError(f"smtp-source into {key} failed:\n{r.output}")
                got[key] = r.rate
                rates[key].add(r.rate)
            many, one = (got[k] for k in mailds if k != "1 customer"), got["1 customer"]
            ratios.add(next(many) / one)
            loads.append(os.getloadavg()[0])
            log(f"   rep {rep + 1}: " + ", ".join(f"{k} {v:.0f} msg/s" for k, v in got.items()))
        rss = {k: m.rss_kb() / 1024 for k, m in mailds.items()}
    finally:
        for m in mailds.values():
            m.stop()
        sink.close()
        dns.stop()
    return {
        "rates": {k: v.as_dict() for k, v in rates.items()},
        "ratio": ratios.as_dict(),
        "rss_mb": rss,
        "loadavg_1m": loads,
        "markdown": (
            table(
                ["maild in front of smtp-sink", "msg/s", "RSS"],
                [[k, v.fmt(".0f"), f"{rss[k]:.0f} MB"] for k, v in rates.items()],
            )
            + f"\n\nRatio (many / one, within each repetition): {ratios.fmt('.3f')}; "
            f"1-minute load average during the runs: "
            + ", ".join(f"{x:.2f}" for x in loads)
            + ".\n"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument(
        "--files", default="1000,10000,100000", help="sizes to time the files source at"
    )
    ap.add_argument("--throughput-customers", type=int, default=100000, help="0: skip")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--uvloop", default=None, help=argparse.SUPPRESS)  # bench.run passes it
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-customers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with_files = {int(x) for x in args.files.split(",") if x}
    if args.child:
        print(json.dumps(measure_size(args.child, workdir, args.child in with_files)))
        return {}
    sizes = []
    for n in (int(x) for x in args.sizes.split(",") if x):
        log(f"== {n} customers")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.customers",
                "--child",
                str(n),
                "--files",
                args.files,
                "--workdir",
                str(workdir),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        sizes.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(f"   {sizes[-1]}")
    md = (
        "Lookups, build and memory by number of customers (each customer one /32, one "
        "login, one domain; each size in a fresh process):\n\n" + sizes_table(sizes) + "\n"
    )
    result: dict[str, Any] = {"benchmark": "customers", "sizes": sizes, "machine": machine()}
    # Does not grow: the largest size's stranger lookup within 2x the smallest's.
    grow = sizes[-1]["miss_ns"] / sizes[0]["miss_ns"] if sizes else 0.0
    targets = [
        [
            f"by_ip for a stranger does not grow ({sizes[0]['customers']:,} -> "
            f"{sizes[-1]['customers']:,} customers)"
            if sizes
            else "by_ip",
            f"x{grow:.2f}",
            verdict(grow <= 2.0 if sizes else None),
        ]
    ]
    if args.throughput_customers:
        tp = throughput(args, workdir)
        result["throughput"] = tp
        md += (
            f"\nThroughput, {args.sessions} sessions x {args.messages} messages of 2 KiB, "
            f"{args.reps} repetitions alternated:\n\n" + tp["markdown"]
        )
        ratio = tp["ratio"]["median"]
        targets.append(
            [
                f"throughput with {args.throughput_customers:,} customers >= 90% of 1",
                f"{ratio:.3f}",
                verdict(ratio >= 0.90),
            ]
        )
    md = table(["target", "measured", "status"], targets) + "\n\n" + md
    result["markdown"] = md
    return emit(result, md, args.json)


if __name__ == "__main__":
    main()
