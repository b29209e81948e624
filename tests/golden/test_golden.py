"""Behaviour unchanged: the golden corpus, run afresh, is byte-identical to expected.json.

The corpus (tests/golden/corpus.py, seeded) goes through the maild on sys.path in a fresh
interpreter (tests/golden/run.py: its own fixed clock, loggers and module state), so the
same file checks any tree. After an intended change of a reply or a log line, regenerate
with `python -m tests.golden.run tests/golden/expected.json` and review the diff.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected.json"
ROOT = HERE.parent.parent


def test_corpus_output_is_byte_identical(tmp_path):
    out = tmp_path / "golden.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    r = subprocess.run(
        [sys.executable, "-m", "tests.golden.run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    got, want = out.read_bytes(), EXPECTED.read_bytes()
    if got != want:
        diff = difflib.unified_diff(
            want.decode().splitlines(),
            got.decode().splitlines(),
            "expected.json",
            "this tree",
            lineterm="",
            n=2,
        )
        raise AssertionError("golden corpus differs:\n" + "\n".join(list(diff)[:200]))


def test_corpus_covers_the_groups_the_issue_names():
    cases = json.loads(EXPECTED.read_text())["cases"]
    groups = {c["group"] for c in cases}
    assert groups >= {
        "headers",
        "relay",
        "postmaster",
        "recipients",
        "ratelimit",
        "bulk",
        "sanctions",
        "optin",
        "protocol",
    }
    assert len(cases) >= 250
    logged = [line for c in cases for line in c["log"]]
    for rule in (
        "rule=relay",
        "rule=ratelimit",
        "rule=bulk",
        "rule=blocked",
        "rule=optin-consent",
        "rule=smuggling",
        "rule=xforward",
        "rule=smtputf8",
        "rule=limits",
        "notice=warn",
        "notice=block",
    ):
        assert any(rule in line for line in logged), rule
