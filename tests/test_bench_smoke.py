"""Smoke runs of every benchmark in bench/ with tiny sizes: the scripts keep working.

Why: CI does not run the benchmarks (too slow and too noisy for a shared machine), but
scripts nobody runs rot. Each benchmark runs once in a subprocess, exactly as a person
would run it (``python -m bench.NAME``, the smoke preset of bench/run.py), and its JSON
result is checked for shape: every configuration measured, numbers that are numbers, a
Markdown table with the targets. No assertion is about speed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.peers import CONFIGS, LABELS, Peer, report
from bench.run import PRESETS, write_docs
from tests.integration.conftest import need

REPO = Path(__file__).resolve().parent.parent


def need_postfix() -> None:
    need("postfix", "smtp-source", "smtp-sink")


def run_bench(name: str, tmp_path: Path, *extra: str, timeout: float = 180) -> dict:
    out = tmp_path / f"{name}.json"
    args = [
        *PRESETS["smoke"][name],
        *extra,
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"bench.{name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert result["markdown"].count("|") > 10 and "status" in result["markdown"]
    assert result["machine"]["cores"] >= 1
    return result


def finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_throughput_smoke(tmp_path):
    need_postfix()
    r = run_bench("throughput", tmp_path)
    (combo,) = r["combos"]
    assert set(combo["rates"]) >= {"postfix", "sink", "maild>sink", "maild>postfix"}
    for stat in combo["rates"].values():
        assert stat["n"] == 1 and finite(stat["median"]) and stat["median"] > 0
    assert set(combo["ratios"]) >= {"maild>postfix", "maild>sink"}


def test_latency_smoke(tmp_path):
    need_postfix()
    r = run_bench("latency", tmp_path)
    assert not r["problems"], r["problems"]
    assert set(r["p99_ms"]) == {"postfix", "maild>postfix"}
    assert finite(r["added_p99_ms"]["maild>postfix"]["median"])


def test_memory_smoke(tmp_path):
    need_postfix()
    r = run_bench("memory", tmp_path)
    (one,) = r["results"]
    assert one["relayed"] >= 100 + 20  # the load and the warm-up, every message relayed
    for key in ("before_kb", "warm_kb", "peak_kb", "after_kb"):
        assert isinstance(one[key], int) and one[key] > 1000
    assert all(i["n"] == 5 and finite(i["kb_each"]) for i in one["idle"])


def test_retention_smoke(tmp_path):
    r = run_bench("retention", tmp_path)
    assert r["mismatch"] == [], (r["find_counts"], r["maild_counts"])
    assert r["manifest"]["messages"] == 300
    assert r["maild_counts"]["trash-7d"] == r["manifest"]["trash_old"] > 0
    assert finite(r["ratio"]["median"]) and finite(r["unchanged_ratio"]["median"])
    assert r["real"]["rules"]["idle-60d-older-90d"]["status"] == "done"


def test_peers_smoke(tmp_path):
    # every peer runs (CI installs them: Makefile DEB_PACKAGES; policyd-rate-limit from PyPI)
    need_postfix()
    need("rspamd", "redis-server", "postfwd")
    r = run_bench("peers", tmp_path, timeout=600)  # rspamd alone takes 15-20 s to start
    peers = r["peers"]
    assert list(peers) == list(CONFIGS)
    for name, p in peers.items():
        assert not p["missing"] and not p["uncounted"], (name, p)
        assert p["rates"]["n"] == 1 and finite(p["rates"]["median"]) and p["rates"]["median"] > 0
        assert finite(p["ratios"]["median"]) and finite(p["vs_rspamd"]["median"])
        assert finite(p["postfix_cpu_us"]["median"]) and p["postfix_cpu_us"]["median"] > 0
        if name != "postfix":  # the add-on's own processes did work for each message
            assert p["addon_cpu_us"]["n"] == 1 and p["addon_cpu_us"]["median"] > 0, name
        assert p["label"] in r["markdown"]
    assert peers["postfix"]["ratios"]["median"] == 1.0
    assert r["markdown"].count("**met**") + r["markdown"].count("**missed**") == 4


def test_peers_report_names_what_is_not_installed(tmp_path):
    """A configuration that cannot run is a row that says so, and its targets are n/a."""
    args = type("Args", (), {"messages": 10, "sessions": 1, "size": 2048, "reps": 1})
    peers = [
        Peer(n, tmp_path, missing="not installed (rspamd, redis-server)" if n == "rspamd" else "")
        for n in CONFIGS
    ]
    for p in peers:
        if p.name != "rspamd":
            p.rates.add(100.0)
            p.ratios.add(1.0)
    md = report(peers, args, {"date": "now", "loadavg": "0"}, "python -m bench.peers")
    assert f"| {LABELS['rspamd']} | not installed (rspamd, redis-server) | - | - | - |" in md
    assert "| >= 2x rspamd's msg/s (maild-front) | - | n/a: rspamd not installed" in md
    assert "| >= 60% of Postfix alone (maild-front) | 100% | **met** |" in md


def test_write_docs_keeps_the_analysis(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(
        "# B\n\nanalysis by hand\n\n<!-- bench:memory -->\nold\n<!-- /bench:memory -->\n"
        "\nmore analysis\n"
    )
    write_docs({"memory": {"markdown": "| new |\n"}}, {"cores": 2}, "python -m bench.run", doc)
    text = doc.read_text()
    assert "analysis by hand" in text and "more analysis" in text
    assert "| new |" in text and "old" not in text
    assert "<!-- bench:machine -->" in text  # a missing block is appended


def test_customers_smoke(tmp_path):
    need_postfix()  # smtp-source and smtp-sink come with Postfix
    r = run_bench("customers", tmp_path)
    assert [s["customers"] for s in r["sizes"]] == [100, 1000]
    for s in r["sizes"]:
        assert all(finite(s[k]) and s[k] > 0 for k in ("miss_ns", "hit_ns", "build_s"))
    assert finite(r["sizes"][0]["files_load_s"])
    assert r["throughput"]["ratio"]["n"] == 1 and finite(r["throughput"]["ratio"]["median"])


def test_cpu_smoke_with_the_floor(tmp_path):
    # bench/cpu.py, with the bare aiosmtpd server (--floor) in the rotation
    need_postfix()
    from bench import cpu

    tiny = ["--messages", "20", "--sessions", "2", "--reps", "1", "--floor"]
    r = cpu.main([*tiny, "--workdir", str(tmp_path)])
    per = r["per_message_us"]
    assert set(per) == {"maild", "bare aiosmtpd (floor)"}
    assert all(finite(v["median"]) and v["median"] > 0 for v in per.values()), per
    assert "bare aiosmtpd (floor)" in r["markdown"]


def test_profile_smoke_with_the_cpu_sampler():
    # bench/profile.py --sampler cpu: samples from inside maild (bench/_cpusample), no py-spy
    need_postfix()
    from bench import profile

    text = profile.main(["--sampler", "cpu", "--seconds", "2", "--sessions", "2", "--top", "40"])
    assert "cpu samples" in text and "inclusive:" in text
    assert "(maild/smtp/server.py)" in text
