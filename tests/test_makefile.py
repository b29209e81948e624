"""The README's two commands on a fresh checkout: `make run` installs what runs, no more;
`make test`'s install (`make venv`) is not skipped because `make run` installed first."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.harness import require_binary
from tests.harness.ports import free_port
from tests.harness.waits import wait_until

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = ("pytest", "hypothesis", "ruff", "xdist")


def fresh_checkout(dest: Path) -> Path:
    """What a clone holds that `make run` uses: no .venv, no var/."""
    for name in ("Makefile", "pyproject.toml", "README.md", "policies.toml"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "maild", dest / "maild", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    return dest


def installed(venv: Path, modules: tuple[str, ...]) -> dict[str, bool]:
    code = (
        "import importlib.util, json, sys; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *modules],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def banner(port: int) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(512)
    except OSError:
        return None


def test_make_run_installs_only_what_runs_and_make_test_still_installs_its_tools(tmp_path):
    require_binary("make")
    tree = fresh_checkout(tmp_path)
    port = free_port()
    policy = tree / "policies.toml"
    text, n = re.subn(
        r'^listen = "[^"]*"',
        f'listen = "127.0.0.1:{port}"',
        policy.read_text(),
        count=1,
        flags=re.M,
    )
    assert n == 1, "the shipped policies.toml has no [server] listen line"
    policy.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS")}
    make = subprocess.Popen(
        ["make", "run"],
        cwd=tree,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # the banner, or make's exit (a failed install or check-config) ends the wait
        greeting = wait_until(
            lambda: banner(port) or (make.poll() is not None and b"exited"),
            timeout=300,
            interval=0.5,
        )
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        output = make.communicate(timeout=60)[0].decode(errors="replace")
    assert greeting and greeting.startswith(b"220 "), output
    venv = tree / ".venv"
    assert installed(venv, ("maild", "aiosmtpd", "dns", "click")) == dict.fromkeys(
        ("maild", "aiosmtpd", "dns", "click"), True
    )
    assert installed(venv, TEST_TOOLS) == dict.fromkeys(TEST_TOOLS, False), output
    # `make test` installs through `make venv`: the run's install must not stand in for it
    r = subprocess.run(
        ["make", "venv"], cwd=tree, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert installed(venv, TEST_TOOLS) == dict.fromkeys(TEST_TOOLS, True)
