"""Profile maild under load: py-spy samples ``maild serve`` (in front of smtp-sink, every
rule on) while smtp-source sends, and the samples are summed per function.

Why: the throughput numbers say *that* maild is slow; this says *where*. The output is
the share of samples per function, inclusive (the function and what it calls) and self
(the function's own code), which is how docs/BENCHMARKS.md explains the cost per message.
py-spy is needed here only (``pip install py-spy``); the benchmarks themselves do not use it.

`--sampler cpu` samples by maild's own CPU time instead (bench/_cpusample, SIGPROF every
2 ms of CPU): py-spy samples by wall clock, so on a machine shared with the load
generator a maild waiting for a CPU inside a send() is counted there. Use it to say
where the CPU per message goes (bench/cpu.py's number); it needs no py-spy.

    python -m bench.profile [--seconds 12] [--size 2048] [--sessions 20] [--maild-src DIR]
                            [--loop asyncio|uvloop] [--raw FILE] [--top 40]
                            [--sampler py-spy|cpu]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
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

SAMPLER = Path(__file__).resolve().parent / "_cpusample"
_PREFIX = re.compile(r"^.*/site-packages/|^.*/lib/python3\.\d+/")
_FRAME = re.compile(r"(.*) \((.*?):\d+\)$")


def _short(path: str) -> str:
    """A frame's file as py-spy names it: from the package or the standard library."""
    path = _PREFIX.sub("", path)
    return "maild/" + path.split("/maild/", 1)[1] if "/maild/" in path else path


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
                path = _short(m.group(2))
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
    ap.add_argument("--sampler", default="py-spy", choices=("py-spy", "cpu"))
    args = ap.parse_args(argv)

    from tests.harness.sink import SmtpSink

    spy = shutil.which("py-spy") or (str(BIN / "py-spy") if (BIN / "py-spy").exists() else None)
    if spy is None and args.sampler == "py-spy":
        raise SystemExit("py-spy is not installed: pip install py-spy (or --sampler cpu)")
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
    )
    samples = workdir / "samples"
    if args.sampler == "cpu":
        samples.mkdir()
        path = os.pathsep.join([str(SAMPLER), m.env()["PYTHONPATH"]])
        m.extra_env.update({"PYTHONPATH": path, "MAILD_CPU_SAMPLE": str(samples)})
    m.start()
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
        if args.sampler == "cpu":
            _cpu_samples(m.pid, samples, args.seconds, raw)
        else:
            _py_spy(spy, m.pid, args.seconds, raw)
        relayed = m.count_log(": relay: DATA") - before
    finally:
        m.stop()  # ends the load too (smtp-source fails and exits)
        sink.close()
        dns.stop()
    text = (
        f"maild in front of smtp-sink, {args.sessions} sessions, {args.size} B: "
        f"{relayed} messages in {args.seconds:g} s ({relayed / args.seconds:.0f} msg/s "
        f"while sampled; {args.sampler} samples)\n\n" + summarise(raw, args.top)
    )
    print(text)
    return text


def _cpu_samples(pid: int, samples: Path, seconds: float, raw: Path) -> None:
    """bench/_cpusample's samples over `seconds`: the report at the start resets them."""
    for n in (1, 2):
        if n == 2:
            time.sleep(seconds)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not (samples / f"{n}.raw").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("maild wrote no CPU samples (bench/_cpusample)")
            time.sleep(0.05)
    shutil.copyfile(samples / "2.raw", raw)


def _py_spy(spy: str | None, pid: int, seconds: float, raw: Path) -> None:
    assert spy is not None
    subprocess.run(
        [spy, "record", "-p", str(pid), "-r", "200", "-d", str(int(seconds))]
        + ["-f", "raw", "-o", str(raw), "--nonblocking"],
        check=True,
        capture_output=True,
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
