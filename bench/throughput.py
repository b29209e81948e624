"""Throughput: smtp-source into Postfix alone versus into maild in front of the same Postfix.

Why this shape: the issue's targets are ratios (maild keeps >= 85% of Postfix-alone
throughput; maild in front of smtp-sink >= 2,000 msg/s), and the machine is shared and
noisy, so every configuration is measured in the same run, alternated (the order rotates
each repetition), and a ratio is taken within each repetition before the median.

Configurations (all on 127.0.0.1, smtp-source -s SESSIONS -m MESSAGES -l SIZE):

* ``postfix``         smtp-source -> Postfix's public smtpd (the port clients use without
                      maild: mynetworks relay to a non-hosted domain, delivered by
                      ``discard:`` so delivery does not dominate);
* ``maild>postfix``   smtp-source -> maild (front mode, every rule on, bench policy) ->
                      Postfix's re-injection smtpd -> the same queue and ``discard:``;
* ``sink``            smtp-source -> smtp-sink (the ceiling of the load generator);
* ``maild>sink``      smtp-source -> maild -> smtp-sink (maild's own ceiling);
* ``...+uvloop``      the maild configurations again with uvloop, when it can be
                      imported (``--uvloop DIR`` or installed);
* ``...+wN``          the maild configurations again with ``[server] workers = N``
                      (``--workers 1,2``; the plain names are workers = 1), each compared
                      with workers = 1 within the same repetition (issue 16: >= 1.7x).

"Postfix alone" is the public smtpd because that is what clients talk to when maild is
not there; with maild, clients talk to maild and maild to the re-injection smtpd (fewer
restrictions, same cleanup/queue/qmgr work). Each run must have every message accepted
(smtp-source aborts on a refusal; maild's log is checked for one relay line per message).

    python -m bench.throughput [--sessions 20,100] [--sizes 2048,102400] [--reps 5]
    python -m bench.throughput --no-postfix --sessions 20 --sizes 2048 --workers 1,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MaildProc,
    SourceRun,
    Stat,
    bench_policy,
    bench_postfix,
    emit,
    log,
    machine,
    new_port,
    raise_nofile,
    rotate,
    smtp_source,
    start_dns,
    table,
    uvloop_path,
    verdict,
)

TARGET_POSTFIX_RATIO = 0.85
TARGET_SINK_RATE = 2000.0
TARGET_WORKERS_RATIO = 1.7  # workers = 2 over workers = 1 on a 2-core machine (issue 16)


@dataclass
class Combo:
    """One (sessions, size) point: rates per configuration and the per-rep ratios."""

    sessions: int
    size: int
    messages: int
    rates: dict[str, Stat] = field(default_factory=dict)
    ratios: dict[str, Stat] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "size": self.size,
            "messages": self.messages,
            "rates": {k: v.as_dict() for k, v in self.rates.items()},
            "ratios": {k: v.as_dict() for k, v in self.ratios.items()},
        }


def default_messages(size: int, sessions: int, scale: float) -> int:
    """Enough messages for a run of several seconds at the rates this machine reaches."""
    base = 4000 if size <= 16384 else 800
    return max(sessions * 2, int(base * scale))


class Rig:
    """Postfix, smtp-sink, a DNS server and one maild per (downstream, loop)."""

    def __init__(
        self,
        workdir: Path,
        loops: list[str],
        uvloop_dir: str | None,
        with_postfix: bool = True,
        maild_in_front_of: tuple[str, ...] = ("sink", "postfix"),
        compare_src: str | None = None,
        workers: tuple[int, ...] = (1,),
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        # a second maild tree (a proposal applied) measured alongside, as "...@patched"
        self.srcs: list[tuple[str, str | None]] = [("", None)]
        if compare_src:
            self.srcs.append(("@patched", compare_src))
        self.maild_in_front_of = maild_in_front_of
        self.loops = loops
        self.uvloop_dir = uvloop_dir
        self.with_postfix = with_postfix
        self.dns: Any = None
        self.pf: Any = None
        self.sink: Any = None
        self.mailds: dict[str, MaildProc] = {}

    def start(self) -> Rig:
        from tests.harness.sink import SmtpSink

        raise_nofile()
        self.dns = start_dns()
        if self.with_postfix:
            log("starting Postfix (discard:)")
            self.pf = bench_postfix(self.workdir / "pf")
            self.pf.start()
        self.sink = SmtpSink(backlog=1024).start()
        downstreams = {"sink": self.sink.port}
        if self.pf is not None:
            downstreams["postfix"] = self.pf.reinject_port
        for down, port in downstreams.items():
            if down not in self.maild_in_front_of:
                continue
            for loop in self.loops:
                for (suffix, src), n in [(x, n) for x in self.srcs for n in self.workers]:
                    name = f"maild>{down}" + ("+uvloop" if loop == "uvloop" else "")
                    name += (f"+w{n}" if n != 1 else "") + suffix
                    wd = self.workdir / name.replace(">", "-").replace("+", "-").replace("@", "-")
                    policy = bench_policy(
                        wd,
                        listen_port=new_port(),
                        downstream_port=port,
                        nameserver=self.dns.nameserver,
                        workers=n,
                    )
                    log(f"starting {name}" + (f" from {src}" if src else ""))
                    self.mailds[name] = MaildProc(
                        wd, policy, loop=loop, src=src, uvloop_dir=self.uvloop_dir
                    ).start()
        return self

    def configs(self) -> dict[str, int]:
        """Configuration name -> port smtp-source connects to."""
        out: dict[str, int] = {}
        if self.pf is not None:
            out["postfix"] = self.pf.smtpd_port
        out["sink"] = self.sink.port
        for name, m in self.mailds.items():
            out[name] = m.port
        return out

    def settle(self, config: str) -> None:
        """After a run that went into Postfix, wait until its queue is empty (the
        next configuration must not compete with leftover deliveries)."""
        if self.pf is not None and "postfix" in config:
            self.pf.wait_queue_empty(timeout=300)

    def stop(self) -> None:
        for m in self.mailds.values():
            m.stop()
        if self.sink is not None:
            self.sink.close()
        if self.pf is not None:
            self.pf.close()
        if self.dns is not None:
            self.dns.stop()


def run_one(rig: Rig, config: str, port: int, combo: Combo) -> SourceRun:
    m = rig.mailds.get(config)
    before = m.count_log(": relay: DATA") if m is not None else 0
    r = smtp_source(port, sessions=combo.sessions, messages=combo.messages, size=combo.size)
    if r.returncode != 0:
        tail = m.tail() if m is not None else ""
        raise RuntimeError(
            f"smtp-source into {config} failed ({r.returncode}):\n{r.output}\n{tail}"
        )
    if m is not None:
        # decision lines are written synchronously; give the last ones a moment
        deadline = time.monotonic() + 10
        while (
            m.count_log(": relay: DATA") - before < combo.messages and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        relayed = m.count_log(": relay: DATA") - before
        if relayed != combo.messages:
            raise RuntimeError(f"{config}: {relayed} relayed of {combo.messages}:\n{m.tail()}")
    rig.settle(config)
    return r


def measure(rig: Rig, combos: list[Combo], reps: int) -> None:
    configs = rig.configs()
    for combo in combos:
        log(f"-- {combo.sessions} sessions, {combo.size} B, {combo.messages} messages x {reps}")
        # one unmeasured warm-up per configuration: imports, pools, DNS cache
        for name, port in configs.items():
            warm = Combo(combo.sessions, combo.size, min(combo.messages, combo.sessions * 2))
            run_one(rig, name, port, warm)
        for rep in range(reps):
            rates: dict[str, float] = {}
            for name in rotate(list(configs), rep):
                r = run_one(rig, name, configs[name], combo)
                rates[name] = r.rate
                combo.rates.setdefault(name, Stat()).add(r.rate)
                log(f"   rep {rep + 1} {name:22s} {r.rate:8.0f} msg/s ({r.seconds:.2f} s)")
            for name, rate in rates.items():
                if (one := workers_one(name)) in rates:
                    combo.ratios.setdefault(name + " / w1", Stat()).add(rate / rates[one])
                if name.startswith("maild>postfix") and "postfix" in rates:
                    combo.ratios.setdefault(name, Stat()).add(rate / rates["postfix"])
                elif name.startswith("maild>sink") and "sink" in rates:
                    combo.ratios.setdefault(name, Stat()).add(rate / rates["sink"])


def workers_one(name: str) -> str:
    """'maild>sink+w2' -> 'maild>sink' (the same configuration with workers = 1); other
    names map to '' (no such comparison)."""
    base, sep, rest = name.partition("+w")
    if not sep or not rest[:1].isdigit():
        return ""
    return base + rest.lstrip("0123456789")


def report(combos: list[Combo], info: dict[str, Any], cmd: str, reps: int) -> str:
    """Markdown: one table of rates and ratios, then the targets."""
    rows = []
    names: list[str] = []
    for c in combos:
        for n in c.rates:
            if n not in names:
                names.append(n)
    for c in combos:
        row = [c.sessions, f"{c.size // 1024} KB", c.messages]
        row += [c.rates[n].fmt() if n in c.rates else "-" for n in names]
        row += [
            c.ratios[n].fmt(".0%") if n in c.ratios else "-" for n in names if n.startswith("maild")
        ]
        row += [c.ratios[n + " / w1"].fmt(".2f") + "x" for n in names if n + " / w1" in c.ratios]
        rows.append(row)
    headers = ["sessions", "size", "msgs/run"] + [f"{n} msg/s" for n in names]
    headers += [
        f"{n} / {'postfix' if 'postfix' in n else 'sink'}" for n in names if n.startswith("maild")
    ]
    headers += [f"{n} / w1" for n in names if any(n + " / w1" in c.ratios for c in combos)]
    lines = [
        f"Measured {info['date']} with `{cmd}`: {reps} repetitions per point, "
        "configurations alternated; median (min-max). Ratios are taken within each "
        "repetition.",
        "",
        table(headers, rows),
        "",
    ]
    trows = []
    for c in combos:
        for n, st in c.ratios.items():
            if n.startswith("maild>postfix") and not n.endswith(" / w1"):
                trows.append(
                    [
                        f">= 85% of Postfix alone ({n})",
                        f"{c.sessions} sessions, {c.size // 1024} KB",
                        st.fmt(".0%"),
                        verdict(st.median >= TARGET_POSTFIX_RATIO),
                    ]
                )
        for n, st in c.ratios.items():
            if n.endswith(" / w1"):
                trows.append(
                    [
                        f">= {TARGET_WORKERS_RATIO}x workers = 1 ({n})",
                        f"{c.sessions} sessions, {c.size // 1024} KB",
                        st.fmt(".2f") + "x",
                        verdict(st.median >= TARGET_WORKERS_RATIO),
                    ]
                )
        for n, st in c.rates.items():
            if n.startswith("maild>sink"):
                trows.append(
                    [
                        f">= 2,000 msg/s in front of smtp-sink ({n})",
                        f"{c.sessions} sessions, {c.size // 1024} KB",
                        st.fmt(),
                        verdict(st.median >= TARGET_SINK_RATE),
                    ]
                )
    lines += [table(["target", "point", "measured", "status"], trows)]
    return "\n".join(lines) + "\n"


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="20,100", help="comma-separated (default 20,100)")
    ap.add_argument("--sizes", default="2048,102400", help="body bytes, comma-separated")
    ap.add_argument("--messages", type=int, default=0, help="per run (default: by size)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the default counts")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--loops",
        default="auto",
        help="asyncio, uvloop, both or auto (both when uvloop is importable)",
    )
    ap.add_argument("--uvloop", default=None, help="directory holding uvloop (pip --target)")
    ap.add_argument("--no-postfix", action="store_true", help="only the smtp-sink configurations")
    ap.add_argument(
        "--compare-src",
        default=None,
        help="also measure maild from this tree (a proposal applied), as ...@patched",
    )
    ap.add_argument(
        "--workers",
        default="1",
        help="[server] workers values to measure, comma-separated (e.g. 1,2: each N > 1 "
        "is compared with 1 in the same repetition)",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args(argv)

    uv = uvloop_path(args.uvloop)
    loops = {
        "asyncio": ["asyncio"],
        "uvloop": ["uvloop"],
        "both": ["asyncio", "uvloop"],
        "auto": ["asyncio"] + (["uvloop"] if uv is not None else []),
    }[args.loops]
    combos = [
        Combo(s, z, args.messages or default_messages(z, s, args.scale))
        for s in parse_ints(args.sessions)
        for z in parse_ints(args.sizes)
    ]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maild-bench-tp-"))
    info = machine()
    rig = Rig(
        workdir,
        loops,
        uv,
        with_postfix=not args.no_postfix,
        compare_src=args.compare_src,
        workers=tuple(parse_ints(args.workers)) or (1,),
    )
    try:
        rig.start()
        measure(rig, combos, args.reps)
    finally:
        rig.stop()
    cmd = "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    md = report(combos, info, cmd.strip(), args.reps)
    result = {
        "benchmark": "throughput",
        "machine": info,
        "command": cmd.strip(),
        "combos": [c.as_dict() for c in combos],
        "markdown": md,
    }
    return emit(result, md, args.json)


if __name__ == "__main__":
    main()
