"""Privileges: maild drops root after binding; refuses unsafe files and bare root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness.clients import swaks
from tests.harness.maild import MAILD, Maild, render
from tests.harness.ports import free_port
from tests.integration.conftest import STRANGER, front_policy


@pytest.fixture
def open_dir():
    """A directory the unprivileged user can reach (pytest's tmp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="maild-priv-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_root_drops_to_the_configured_user_after_binding(postfix, open_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to test dropping root")
    policy = front_policy(
        postfix.reinject_port, user="nobody", state=str(open_dir / "state" / "maild.db")
    )
    m = Maild(open_dir / "m", policy)
    (open_dir / "m").chmod(0o755)
    with m:
        assert uids(m.proc.pid) == [65534] * 4  # real, effective, saved, fs
        assert (
            swaks(m.port, frm="a@outside.example", to="bob@hosted.example", bind=STRANGER).data_code
            == 250
        )
        m.wait_log("privileges: running as user=nobody uid=65534")
        st = (open_dir / "state").stat()
        assert st.st_uid == 65534 and (open_dir / "state" / "maild.db").stat().st_uid == 65534


def run_serve(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MAILD, "serve", "-c", str(config), "--log", "stderr", *extra],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_root_without_a_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        render(front_policy(9, listen=f"127.0.0.1:{free_port()}", state=str(tmp_path / "s.db")))
    )
    r = run_serve(cfg)
    assert (
        r.returncode == 2 and "refusing to run as root" in r.stderr and "Traceback" not in r.stderr
    )


def test_world_writable_policy_or_state_dir_is_refused(tmp_path):
    cfg = tmp_path / "p.toml"
    state = tmp_path / "state"
    state.mkdir()
    cfg.write_text(
        render(front_policy(9, listen=f"127.0.0.1:{free_port()}", state=str(state / "s.db")))
    )
    cfg.chmod(0o666)
    r = run_serve(cfg, "--allow-root")
    assert r.returncode == 2 and "world-writable" in r.stderr and "chmod o-w" in r.stderr
    cfg.chmod(0o640)
    state.chmod(0o777)
    r = run_serve(cfg, "--allow-root")
    assert r.returncode == 2 and f"state directory {state} is world-writable" in r.stderr


def test_web_pages_and_metrics_work_after_dropping_root(postfix, open_dir):
    """[web] imports aiohttp and prometheus_client, whose standard-library parts the
    unprivileged user may not be able to read: they are loaded before root is dropped."""
    if os.geteuid() != 0:
        pytest.skip("needs root to test dropping root")
    import urllib.request

    web_port = free_port()
    policy = front_policy(
        postfix.reinject_port, user="nobody", state=str(open_dir / "state" / "maild.db")
    )
    policy["web"] = {
        "enabled": True,
        "listen": f"127.0.0.1:{web_port}",
        "base_url": f"http://127.0.0.1:{web_port}",
    }
    m = Maild(open_dir / "m", policy)
    (open_dir / "m").chmod(0o755)
    with m:
        assert uids(m.proc.pid) == [65534] * 4
        m.wait_log("web: listening on")
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"maild_relayed_total" in r.read()
