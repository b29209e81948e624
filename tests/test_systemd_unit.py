"""The systemd unit: hardened, unprivileged, notify-type, and scored by systemd itself."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path("systemd/maild.service")


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keep key case
    cp.read(UNIT)
    return cp


def test_unit_runs_unprivileged_with_notify_and_reload():
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["User"] == "maild"
    assert "maild serve" in s["ExecStart"] and "--allow-root" not in s["ExecStart"]
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("KillMode", "mixed"),  # the supervisor stops its workers itself
    ]:
        assert s[key] == value, key
    assert "/var/lib/maild" in s["ReadWritePaths"]


def test_systemd_analyze_security_exposure_at_most_1_3():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing: CI installs systemd")
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run(
        [exe, "security", "--offline=true", "--threshold=13", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "Overall exposure level for maild.service: 1.3" in r.stdout
