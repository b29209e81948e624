"""Profile maild under load: py-spy samples ``maild serve`` (in front of smtp-sink, every
rule on) while smtp-source sends, and the samples are summed per function.

Why: the throughput numbers say *that* maild is slow; this says *where*. The output is
the share of samples per function, inclusive (the function and what it calls) and self
(the function's own code), which is how docs/BENCHMARKS.md explains the cost per message.
py-spy is needed here only (``pip install py-spy``); the benchmarks themselves do not use it.

    python -m bench.profile [--seconds 12] [--size 2048] [--sessions 20] [--maild-src DIR]
                            [--loop asyncio|uvloop] [--raw FILE] [--top 40]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import (
    BIN,
    MaildProc,
    bench_policy,
    new_port,
    raise_nofile,
    smtp_source,
    start_dns,
    uvloop_path,
)

_FRAME = re.compile(r"(.*) \((.*?):\d+\)$")


def summarise(raw: Path, top: int = 40) -> str:
    """py-spy's raw (collapsed stack) output summed per function: inclusive and self."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:
                path = m.group(2).split("site-packages/")[-1].split("/lib/python3")[-1]
                names.append(f"{m.group(1)} ({path})")
            else:
                names.append(frame)
        for name in set(names):
            incl[name] += n
        if names:
            own[names[-1]] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{100 * v / total:5.1f}%  {k}" for k, v in incl.most_common(top)]
    out += ["", "self:"]
    out += [f"{100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=100_000, help="upper bound while sampling")
    ap.add_argument("--loop", default="asyncio")
    ap.add_argument("--uvloop", default=None)
    ap.add_argument("--maild-src", default=None)
    ap.add_argument("--raw", default=None, help="keep py-spy's raw output here")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)

    from tests.harness.sink import SmtpSink

    spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="maild-bench-prof-"))
    raw = Path(args.raw) if args.raw else workdir / "profile.raw"
    dns = start_dns()
    sink = SmtpSink(backlog=1024).start()
    policy = bench_policy(
        workdir, listen_port=new_port(), downstream_port=sink.port, nameserver=dns.nameserver
    )
    m = MaildProc(
        workdir, policy, loop=args.loop, uvloop_dir=uvloop_path(args.uvloop), src=args.maild_src
    ).start()
    try:
        smtp_source(m.port, sessions=args.sessions, messages=200, size=args.size)  # warm-up
        load = threading.Thread(
            target=smtp_source,
            args=(m.port,),
            daemon=True,
            kwargs={"sessions": args.sessions, "messages": args.messages, "size": args.size},
        )
        load.start()
        time.sleep(1)
        before = m.count_log(": relay: DATA")
        subprocess.run(
            [
                spy,
                "record",
                "-p",
                str(m.pid),
                "-r",
                "200",
                "-d",
                str(int(args.seconds)),
                "-f",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
            ],
            check=True,
            capture_output=True,
        )
        relayed = m.count_log(": relay: DATA") - before
    finally:
        m.stop()  # ends the load too (smtp-source fails and exits)
        sink.close()
        dns.stop()
    text = (
        f"maild in front of smtp-sink, {args.sessions} sessions, {args.size} B: "
        f"{relayed} messages in {args.seconds:g} s ({relayed / args.seconds:.0f} msg/s "
        "while sampled)\n\n" + summarise(raw, args.top)
    )
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
