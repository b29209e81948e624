"""Run maild's benchmarks (``make bench``) and optionally write the results into
docs/BENCHMARKS.md.

Why one entry point: the issue's numbers come from one command a reviewer can re-run;
sizes come in three presets (``full``: the issue's sizes, about an hour on 2 cores;
``quick``: the same shape in about ten minutes; ``smoke``: seconds, what
tests/test_bench_smoke.py runs to keep the scripts working). ``--write-docs`` replaces
only the generated blocks of docs/BENCHMARKS.md (between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``), so the analysis written by hand around them stays.

    python -m bench.run [--only throughput,latency,memory,retention,peers,customers] [--preset quick]
                        [--uvloop DIR] [--maild-src DIR] [--write-docs] [--json-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, log, machine, table

DOCS = REPO / "docs" / "BENCHMARKS.md"
BENCHMARKS = ("throughput", "latency", "memory", "retention", "peers", "customers")

PRESETS: dict[str, dict[str, list[str]]] = {
    "full": {
        "throughput": ["--sessions", "20,100", "--sizes", "2048,102400", "--reps", "5"],
        "latency": ["--seconds", "20", "--reps", "3"],
        "memory": ["--messages", "200000", "--idle", "500"],
        "retention": ["--mailboxes", "2000", "--messages", "1000000", "--reps", "3"],
        "peers": ["--messages", "3000", "--sessions", "20", "--size", "2048", "--reps", "5"],
        "customers": ["--messages", "5000", "--sessions", "20", "--reps", "5"],
    },
    "quick": {
        "throughput": [
            "--sessions",
            "20,100",
            "--sizes",
            "2048,102400",
            "--reps",
            "3",
            "--scale",
            "0.3",
        ],
        "latency": ["--seconds", "10", "--reps", "2", "--max-messages", "1500"],
        "memory": ["--messages", "20000", "--chunk", "5000", "--idle", "500"],
        "retention": ["--mailboxes", "400", "--messages", "200000", "--reps", "2"],
        "peers": ["--messages", "1000", "--sessions", "20", "--size", "2048", "--reps", "3"],
        "customers": ["--files", "1000,10000", "--messages", "2000", "--reps", "3"],
    },
    "smoke": {
        "throughput": [
            "--sessions",
            "2",
            "--sizes",
            "2048",
            "--messages",
            "20",
            "--reps",
            "1",
            "--loops",
            "asyncio",
        ],
        "latency": ["--seconds", "1", "--reps", "1", "--rate", "20"],
        "memory": ["--messages", "100", "--chunk", "50", "--warmup", "20", "--idle", "5"],
        "retention": ["--mailboxes", "6", "--messages", "300", "--reps", "1"],
        "peers": ["--messages", "20", "--sessions", "2", "--size", "2048", "--reps", "1"],
        "customers": [
            "--sizes",
            "100,1000",
            "--files",
            "100",
            "--throughput-customers",
            "200",
            "--messages",
            "20",
            "--sessions",
            "2",
            "--reps",
            "1",
        ],
    },
}


def write_docs(
    results: dict[str, dict[str, Any]], info: dict[str, Any], cmd: str, path: Path = DOCS
) -> None:
    """Replace the generated blocks; a block missing from the file is appended."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    blocks = {"machine": machine_block(info, cmd)}
    blocks.update({name: r["markdown"] for name, r in results.items()})
    for name, body in blocks.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        new = f"{start}\n{body.rstrip()}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m, new=new: new, text)
        else:
            text = text.rstrip() + f"\n\n## {name}\n\n{new}\n"
    path.write_text(text)


def machine_block(info: dict[str, Any], cmd: str) -> str:
    rows = [[k, v] for k, v in info.items()]
    return f"Last run: `{cmd}`\n\n" + table(["", ""], rows) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(BENCHMARKS))
    ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
    ap.add_argument("--uvloop", default=None, help="directory holding uvloop (pip --target)")
    ap.add_argument("--maild-src", default=None, help="run maild from this tree")
    ap.add_argument("--write-docs", action="store_true", help=f"update {DOCS.relative_to(REPO)}")
    ap.add_argument("--json-dir", default=None, help="write each benchmark's raw JSON here")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    only = [b for b in args.only.split(",") if b]
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.maild_src:
        import os

        os.environ["BENCH_MAILD_SRC"] = args.maild_src
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-"))
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    for name in only:
        extra = list(PRESETS[args.preset][name]) + ["--workdir", str(workdir / name)]
        if args.uvloop and name not in ("retention", "peers"):
            extra += ["--uvloop", args.uvloop]
        if args.maild_src and name == "retention":
            extra += ["--maild-src", args.maild_src]
        if args.json_dir:
            extra += ["--json", str(Path(args.json_dir) / f"{name}.json")]
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
        log(f"== {name}: {' '.join(extra)}")
        mod = importlib.import_module(f"bench.{name}")
        results[name] = mod.main(extra)
    cmd = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.write_docs:
        write_docs(results, info, cmd.strip())
        log(f"wrote {DOCS}")
    if args.json_dir:
        (Path(args.json_dir) / "machine.json").write_text(json.dumps(info, indent=1))
    return results


if __name__ == "__main__":
    main()
