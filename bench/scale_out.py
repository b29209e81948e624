"""Two maild nodes on one PostgreSQL versus one node: throughput with shared state.

Both configurations send the same total with smtp-source (20 sessions, 2 KB messages)
into maild in front of one smtp-sink, the state on a private PostgreSQL; with two nodes
the sessions are split between them. Alternates the configurations and reports the
median of the repeats. What it measures is the cost of sharing state (counters synced
through PostgreSQL, decisions written there), not the capacity of more machines: on one
2-core host two nodes share the same cores.

Deviations from "all rules on", and why: the bulk rule is off (smtp-source sends the same
body every time, which is one campaign by definition and would be refused after 20
copies), header checks are in tag mode (smtp-source's messages have no Date: or
Message-ID:), and the customer's rate limits are raised out of the way.

    python -m bench.scale_out [--messages 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness.maild import Maild
from tests.harness.postgres import Postgres, pg_bindir
from tests.harness.sink import SmtpSink
from tests.integration.conftest import front_policy


def policy(sink_port: int, state: str) -> dict:
    p = front_policy(sink_port, state=state)
    p["customers"].append(
        {
            "name": "bench",
            "networks": ["127.0.0.1/32"],
            "ratelimit": {
                "messages": ["10000000/1h"],
                "recipients": ["10000000/1h"],
                "bytes": ["100GB/1h"],
                "same_recipient": ["10000000/1h"],
            },
        }
    )
    p["server"]["trusted_upstreams"] = []
    p["bulk"] = {"enabled": False}
    return p


def source(port: int, sessions: int, messages: int) -> subprocess.Popen:
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    return subprocess.Popen(
        [
            exe,
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            "2048",
            "-f",
            "a@bench.example",
            "-t",
            "r@outside.example",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_once(nodes: list[Maild], total: int, sessions: int) -> float:
    per = total // len(nodes)
    t0 = time.monotonic()
    procs = [source(n.port, sessions // len(nodes), per) for n in nodes]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode()[:300]}")
    return per * len(nodes) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the run's files (logs) for a look")
    args = ap.parse_args()
    if pg_bindir() is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="maild-bench-scale-"))
    pg = Postgres(pg_bindir()).start()
    sink = SmtpSink()
    sink.start()
    try:
        url = pg.create_db("bench")
        one = [Maild(root / "one", policy(sink.port, url))]
        two = [Maild(root / f"two{i}", policy(sink.port, url)) for i in range(2)]
        results: dict[str, list[float]] = {"1 node": [], "2 nodes": []}
        for _ in range(args.repeats):
            for label, nodes in (("1 node", one), ("2 nodes", two)):
                for n in nodes:
                    n.start()
                try:
                    results[label].append(run_once(nodes, args.messages, args.sessions))
                finally:
                    for n in nodes:
                        n.stop()
        for label, vals in results.items():
            print(
                f"{label}: median {statistics.median(vals):.0f} msg/s "
                f"(min {min(vals):.0f}, max {max(vals):.0f}, n={len(vals)})"
            )
        ratio = statistics.median(results["2 nodes"]) / statistics.median(results["1 node"])
        print(f"2 nodes / 1 node: {ratio:.2f}")
    finally:
        sink.stop()
        pg.remove()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
