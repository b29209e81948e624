"""systemd's sd_notify protocol (Type=notify): one datagram to $NOTIFY_SOCKET.

Twelve lines of standard library instead of a dependency; a no-op outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except OSError:
        return False
