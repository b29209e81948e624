"""Asking the running `maild serve` to act now, and reading its answer.

The CLI signals the daemon (SIGHUP: reload policies.toml; SIGUSR1: apply the state
store's control rows now) and waits until the daemon's status file records that it
acted, with a time read from CLOCK_MONOTONIC. That clock is one clock for every process
of a Linux host, so "the daemon began after I wrote" is a comparison of two readings,
free of wall-clock steps. The status file is per node: with several nodes on one
PostgreSQL state, this asks the daemon on this node only.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from maild.config import Config
from maild.store.base import resolve_state_path

SIG_CONTROL = signal.SIGUSR1
WAIT = 15.0  # seconds: a reload probes a new downstream for up to 9 s (3 s per step)


def monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Answer:
    outcome: str  # "done", "not-running", "timeout"
    pid: int | None = None
    status: dict | None = None  # the daemon's status when it answered
    signal_error: str = ""  # the signal could not be sent (the daemon acts on its own schedule)


def ask(config: Config, sig: int, key: str, *, timeout: float = WAIT) -> Answer:
    """Signal the daemon and wait until its status file's `key` (a CLOCK_MONOTONIC time
    at which it began the work) is later than the moment the signal was sent.

    The daemon is found by its status file, else by `[server] pid_file`, else as the
    `maild serve` process of this policies.toml: after an edit of `[server] state` the
    status file is where the old state is until the daemon reloads (it then writes one
    where the file says, too)."""
    st = daemon_status(config)
    pid = (
        int(st["pid"])
        if st
        else (pid_from_file(config.server.pid_file) or pid_serving(config.path))
    )
    if pid is None:
        return Answer("not-running")
    began = monotonic()
    err = ""
    try:
        os.kill(pid, sig)
    except OSError as e:
        err = f"cannot signal pid {pid}: {e.strerror}"
    deadline = began + timeout
    while True:
        st = daemon_status(config)
        if st is not None and _began(st, key) >= began:
            return Answer("done", pid, st, err)
        if not alive(pid):
            return Answer("not-running", pid, signal_error=err)
        if monotonic() > deadline:
            return Answer("timeout", pid, st, err)
        time.sleep(0.05)


def pid_from_file(path: str) -> int | None:
    """The pid in `[server] pid_file`, if that process lives."""
    try:
        pid = int(Path(path).read_text().strip() or 0) if path else 0
    except (OSError, ValueError):
        return None
    return pid if pid and alive(pid) else None


def pid_serving(config_path: str) -> int | None:
    """The one `maild serve` process whose policies.toml is config_path (Linux /proc)."""
    want = Path(config_path).resolve()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
            if "serve" not in argv or not any(Path(a).name == "maild" for a in argv[:2]):
                continue
            path = _config_arg(argv) or _environ(d).get("MAILD_CONFIG") or "policies.toml"
            if (d / "cwd").resolve() / path == want or Path(path).resolve() == want:
                found.append(int(d.name))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    # With [server] workers the supervisor's children (fork server, workers) share its
    # command line: the daemon is the one whose parent is not among them.
    roots = [pid for pid in found if _ppid(pid) not in found]
    return roots[0] if len(roots) == 1 else None


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _environ(d: Path) -> dict[str, str]:
    pairs = (
        e.decode(errors="replace").partition("=") for e in (d / "environ").read_bytes().split(b"\0")
    )
    return {k: v for k, _, v in pairs if k}


def alive(pid: int) -> bool:
    """Whether the process exists (one of another user is not ours to signal, but lives)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def daemon_status(config: Config) -> dict | None:
    """The running daemon's status file for this policies.toml, or None if none is alive."""
    path = Path(resolve_state_path(config.server.state, config.path)).with_name("maild.status.json")
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        running = alive(int(st["pid"]))
    except (KeyError, ValueError):
        return None
    return st if running else None


def _began(st: dict, key: str) -> float:
    value = st.get(key)
    if isinstance(value, dict):
        value = value.get("began")
    return float(value or 0)


def apply_control(config: Config) -> tuple[bool, str]:
    """After the CLI wrote control rows (block, unblock, counter reset): have the daemon
    apply them now. Returns whether that is settled, and when the change takes effect."""
    from maild.store.base import is_postgres

    shared = is_postgres(config.server.state)
    others = (
        ("; other nodes sharing the state store apply it at their next poll, within 2 seconds")
        if shared
        else ""
    )
    a = ask(config, SIG_CONTROL, "control_synced", timeout=10.0)
    if a.outcome == "done":
        how = f" at its next poll ({a.signal_error})" if a.signal_error else ""
        here = " on this node" if shared else ""
        return True, f"applied in the running daemon (pid {a.pid}){here}{how}{others}"
    if a.outcome == "not-running":
        if shared:
            return True, (
                "no maild runs on this node: the nodes sharing the state store apply "
                "it at their next poll, within 2 seconds; a node that starts reads it"
            )
        return True, "the daemon is not running: takes effect when it starts"
    why = f" ({a.signal_error})" if a.signal_error else ""
    return False, (
        f"recorded, but the running daemon (pid {a.pid}) did not confirm it within "
        f"10 seconds{why}: see `maild status` and its log"
    )
