"""Loopback port allocation for tests that start real servers."""

from __future__ import annotations

import os
import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    The kernel picks the port (bind to 0), so parallel test processes rarely
    collide; within one process a port is never handed out twice, because the
    server it was meant for may not have bound it yet.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("could not find a free loopback port")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _listen_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any IPv4/IPv6 address), from /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    listening = len(fields) > 9 and fields[3] == "0A"  # 0A = LISTEN
                    if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes


def listened_by(pid: int, port: int) -> bool:
    """True when process ``pid`` holds the socket listening on ``port``.

    Tells "our server is up" apart from "someone else grabbed the port that
    free_port() handed out" (tests of other suites may run at the same time).
    """
    inodes = _listen_inodes(port)
    if not inodes:
        return False
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False
