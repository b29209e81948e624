"""CPU time per message: maild's own CPU (user + system, from /proc) per relayed message.

Why: on a shared machine the throughput ratios move by tens of percent between runs,
because the other tenants' load changes while a run lasts. The CPU maild spends per
message moves far less, so it is the number to compare two trees by (an optimisation,
a proposal): maild from this checkout and maild from ``--compare-src`` run side by side
in front of the same smtp-sink (or Postfix), each fed the same smtp-source load in turn,
alternated, and the CPU seconds each consumed are divided by the messages it relayed.

`--floor` adds, in the same rotation, the floor of the chosen stack: a bare aiosmtpd
server whose handler only answers 250 (no downstream, no rules, no log line), so a
tree's CPU per message can be read against what aiosmtpd and asyncio alone cost.

    python -m bench.cpu [--compare-src TREE] [--messages 2000] [--sessions 20]
                        [--size 2048] [--reps 3] [--downstream sink|postfix]
                        [--uvloop DIR] [--loops asyncio|uvloop|both] [--floor]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    NO_UVLOOP,
    MaildProc,
    Stat,
    bench_policy,
    bench_postfix,
    end_process,
    log,
    new_port,
    proc_times,
    raise_nofile,
    rotate,
    smtp_source,
    start_dns,
    table,
    uvloop_path,
)

# aiosmtpd with a handler that answers 250 to DATA: the stack's floor (--floor).
_BARE = """
import asyncio, sys
from aiosmtpd.smtp import SMTP
class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"
async def main(port):
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(Handler()), "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[1])))
"""


class BareAiosmtpd:
    """The floor: the bare aiosmtpd server above, on asyncio, as a subprocess."""

    def __init__(self) -> None:
        self.port = new_port()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(NO_UVLOOP)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BARE, str(self.port)], stdout=subprocess.PIPE, env=env
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the bare aiosmtpd server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        end_process(self.proc)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads)."""
    return proc_times(pid)[:2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--compare-src", default=None, help="also run maild from this tree, as @patched"
    )
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--downstream", default="sink", choices=("sink", "postfix"))
    ap.add_argument("--loops", default="asyncio", choices=("asyncio", "uvloop", "both"))
    ap.add_argument("--uvloop", default=None, help="directory holding uvloop (pip --target)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--floor", action="store_true", help="also run a bare aiosmtpd server")
    args = ap.parse_args(argv)

    from tests.harness.sink import SmtpSink

    raise_nofile()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-cpu-"))
    loops = ["asyncio", "uvloop"] if args.loops == "both" else [args.loops]
    srcs: list[tuple[str, str | None]] = [("maild", None)]
    if args.compare_src:
        srcs.append(("maild@patched", args.compare_src))
    dns = start_dns()
    sink = pf = None
    mailds: dict[str, MaildProc | BareAiosmtpd] = {}
    try:
        if args.downstream == "postfix":
            pf = bench_postfix(workdir / "pf")
            pf.start()
            port = pf.reinject_port
        else:
            sink = SmtpSink(backlog=1024).start()
            port = sink.port
        for loop in loops:
            for name, src in srcs:
                key = name + ("+uvloop" if loop == "uvloop" else "")
                wd = workdir / key.replace("@", "-").replace("+", "-")
                policy = bench_policy(
                    wd, listen_port=new_port(), downstream_port=port, nameserver=dns.nameserver
                )
                mailds[key] = MaildProc(
                    wd, policy, loop=loop, src=src, uvloop_dir=uvloop_path(args.uvloop)
                ).start()
        if args.floor:
            mailds["bare aiosmtpd (floor)"] = BareAiosmtpd()
        for m in mailds.values():  # warm-up: imports, pools, DNS cache
            smtp_source(m.port, sessions=args.sessions, messages=args.sessions * 4, size=args.size)
        per_msg = {k: Stat() for k in mailds}
        user_msg = {k: Stat() for k in mailds}
        for rep in range(args.reps):
            for key in rotate(list(mailds), rep):
                m = mailds[key]
                bare = isinstance(m, BareAiosmtpd)
                before = cpu_times(m.pid)
                relayed0 = 0 if bare else m.count_log(": relay: DATA")
                r = smtp_source(
                    m.port, sessions=args.sessions, messages=args.messages, size=args.size
                )
                if r.returncode != 0:
                    tail = "" if bare else m.tail()
                    raise RuntimeError(f"smtp-source into {key} failed:\n{r.output}\n{tail}")
                after = cpu_times(m.pid)
                user, system = after[0] - before[0], after[1] - before[1]
                n = args.messages if bare else max(m.count_log(": relay: DATA") - relayed0, 1)
                per_msg[key].add(1e6 * (user + system) / n)
                user_msg[key].add(1e6 * user / n)
                log(
                    f"   rep {rep + 1} {key:22s} {1e6 * (user + system) / n:7.0f} us CPU/msg "
                    f"(user {1e6 * user / n:.0f}, system {1e6 * system / n:.0f}; {n} relayed, "
                    f"{r.rate:.0f} msg/s)"
                )
                if pf is not None:
                    pf.wait_queue_empty(timeout=300)
    finally:
        for m in mailds.values():
            m.stop()
        if sink is not None:
            sink.close()
        if pf is not None:
            pf.close()
        dns.stop()
    rows = [[k, v.fmt(".0f", " us"), user_msg[k].fmt(".0f", " us")] for k, v in per_msg.items()]
    md = (
        f"maild CPU per message ({args.sessions} sessions, {args.size} B, in front of "
        f"{args.downstream}, {args.reps} repetitions alternated; median (min-max)):\n\n"
        + table(["maild", "CPU per message", "of which user"], rows)
        + "\n"
    )
    print(md)
    return {
        "benchmark": "cpu",
        "per_message_us": {k: v.as_dict() for k, v in per_msg.items()},
        "user_per_message_us": {k: v.as_dict() for k, v in user_msg.items()},
        "markdown": md,
    }


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
