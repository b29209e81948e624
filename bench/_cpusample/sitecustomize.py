"""Loaded into `maild serve` by bench/profile.py --sampler cpu: samples of the main
thread's stack every 2 ms of the process's CPU time (bench only; maild never imports this).

py-spy samples by wall clock: on a machine shared with the load generator and the sink,
a maild waiting for a CPU inside send() is sampled there, so the socket writes looked
like a third of its time. SIGPROF (ITIMER_PROF) fires only while the process runs.
On SIGUSR2 the samples so far are written (py-spy's raw format, one collapsed stack and
its count per line) to N.raw in MAILD_CPU_SAMPLE, and counting starts again.
"""

from __future__ import annotations

import os

if os.environ.get("MAILD_CPU_SAMPLE"):
    import collections
    import signal

    _DIR = os.environ["MAILD_CPU_SAMPLE"]
    _stacks: collections.Counter[str] = collections.Counter()
    _reports = [0]

    def _sample(_sig: int, frame: object) -> None:
        names = []
        f = frame
        while f is not None:
            code = f.f_code  # type: ignore[attr-defined]
            names.append(f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})")
            f = f.f_back  # type: ignore[attr-defined]
        _stacks[";".join(reversed(names))] += 1

    def _report(_sig: int, _frame: object) -> None:
        _reports[0] += 1
        path = os.path.join(_DIR, f"{_reports[0]}.raw")
        # one C call each, so a sample (a Python handler) cannot run in between
        taken = dict(_stacks)
        _stacks.clear()
        with open(path + ".tmp", "w") as out:
            out.writelines(f"{k} {v}\n" for k, v in taken.items())
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGPROF, _sample)
    signal.signal(signal.SIGUSR2, _report)
    signal.setitimer(signal.ITIMER_PROF, 0.002, 0.002)
