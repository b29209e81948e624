"""A short, bounded, coverage-guided fuzzing run (atheris/libFuzzer) of
tests/fuzz/atheris_target.py: SMTP argument parsing, policies.toml, message headers,
xtext. libFuzzer's own limits make hangs (-timeout) and memory blow-ups (-rss_limit_mb)
findings; a finding fails the test with the input and its traceback.

The default run is ~10 s; MAILD_SLOW=1 runs fifteen times longer. atheris is in pyproject's
test extra for x86-64 Linux (binary wheels); elsewhere the same target is driven by
hypothesis with many examples instead, so the test never silently skips.
"""

from __future__ import annotations

import re
import subprocess
import sys
import traceback
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import atheris_target
from tests.fuzz.budget import SLOW, budget

TARGET = Path(atheris_target.__file__)


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def test_coverage_guided_fuzzing(tmp_path: Path, record_property) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(atheris_target.SEEDS):
        (corpus / f"seed{i}").write_bytes(seed)
    if not _have_atheris():
        record_property("engine", "hypothesis (atheris not installed)")
        _hypothesis_fallback()
        return
    seconds = 150 if SLOW else 10
    cmd = [
        sys.executable,
        str(TARGET),
        f"-runs={2_000_000 if SLOW else 200_000}",
        "-seed=1",
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-max_len=4096",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(corpus),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 120, cwd=TARGET.parents[2]
    )
    out = proc.stdout + proc.stderr
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"cov: (\d+)", out)
    record_property("engine", "atheris")
    record_property("executions", int(runs.group(1)) if runs else None)
    record_property("coverage_edges", int(cov[-1]) if cov else None)
    crashes = (
        sorted(tmp_path.glob("crash-*"))
        + sorted(tmp_path.glob("timeout-*"))
        + sorted(tmp_path.glob("oom-*"))
    )
    assert proc.returncode == 0 and not crashes, (
        f"atheris found a problem (rc={proc.returncode}); input: "
        f"{crashes[0].read_bytes()[:300] if crashes else None!r}\n"
        f"{replay(crashes[0]) if crashes else out[-4000:]}"
    )
    assert runs and int(runs.group(1)) > 1000, out[-2000:]


def replay(crash: Path) -> str:
    """The finding's traceback, reproduced in this process."""
    try:
        atheris_target.one_input(crash.read_bytes())
    except BaseException:  # noqa: BLE001  any finding, reported as text
        return traceback.format_exc()
    return "(does not reproduce in-process: a timeout or memory limit?)"


@budget(3000)
@given(st.one_of(st.sampled_from(atheris_target.SEEDS), st.binary(max_size=4096)))
def _hypothesis_fallback(data: bytes) -> None:
    atheris_target.one_input(data)
