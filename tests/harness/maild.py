"""Run the real `maild serve` as a subprocess, with a policies.toml written by the test."""

from __future__ import annotations

import os
import signal as _signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.ports import free_port
from tests.harness.waits import patience

MAILD = [str(Path(sys.executable).parent / "maild")]


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render(doc: dict) -> str:
    """A small TOML writer for the shapes policies.toml uses (tables, arrays of tables)."""
    out: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {
            k: v
            for k, v in d.items()
            if not isinstance(v, dict)
            and not (isinstance(v, list) and v and isinstance(v[0], dict))
        }
        if prefix:
            out.append(f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{k} = {toml_value(v)}")
        out.append("")
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(key, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    out.append(f"[[{key}]]")
                    nested = {
                        ik: iv
                        for ik, iv in item.items()
                        if isinstance(iv, dict)
                        or (isinstance(iv, list) and iv and isinstance(iv[0], dict))
                    }
                    for ik, iv in item.items():
                        if ik not in nested:
                            out.append(f"{ik} = {toml_value(iv)}")
                    out.append("")
                    # sub-tables and arrays of sub-tables belong to the item just written
                    for ik, iv in nested.items():
                        if isinstance(iv, dict):
                            table(f"{key}.{ik}", iv)
                        else:
                            for sub in iv:
                                out.append(f"[[{key}.{ik}]]")
                                out.extend(f"{sk} = {toml_value(sv)}" for sk, sv in sub.items())
                                out.append("")

    table("", doc)
    return "\n".join(out) + "\n"


class Maild:
    """`maild serve` on a free loopback port; stop() at teardown."""

    def __init__(self, root: Path, policy: dict, *, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        server = policy.setdefault("server", {})
        server.setdefault("listen", f"127.0.0.1:{self.port}")
        server.setdefault("state", str(self.root / "state.db"))
        server.setdefault("hostname", "mx.hosted.example")
        # One process unless a test asks for workers (tests/integration/test_workers.py):
        # the default, "auto", would make the process model depend on the machine.
        server.setdefault("workers", 1)
        self.policy = policy
        self.config = self.root / "policies.toml"
        self.logfile = self.root / "maild.log"
        self.proc: subprocess.Popen | None = None

    def write(self) -> None:
        self.config.write_text(render(self.policy))

    def cli_argv(self, *args: str) -> list[str]:
        return [*MAILD, *args, "-c", str(self.config)]

    def cli(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.cli_argv(*args), capture_output=True, text=True, timeout=timeout, check=check
        )

    def start(self, timeout: float = 15) -> Maild:
        timeout = patience(timeout)
        self.write()
        root_flag = (
            ["--allow-root"] if os.geteuid() == 0 and not self.policy["server"].get("user") else []
        )
        self.proc = subprocess.Popen(
            [*MAILD, "serve", "-c", str(self.config), "--log", str(self.logfile), *root_flag],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"maild exited with {self.proc.returncode}: {out}\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.recv(100)
                    s.sendall(b"QUIT\r\n")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"maild did not listen on {self.port}:\n{self.log()}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10) -> str:
        timeout = patience(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in maild log:\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = _signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        rc = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return rc

    def __enter__(self) -> Maild:
        """`with Maild(...) as m` starts it; `with Maild(...).start() as m` must not start
        a second maild (the first would be left running, never stopped)."""
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
