"""`maild serve`: one process (`[server] workers = 1`) or a supervisor and its workers.

The choice is made here, above both, so that maild.daemon need not know the workers and
the workers can build on it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from maild import config as cfg
from maild.daemon import Daemon
from maild.daemonctl import SIG_CONTROL
from maild.wiring import Wiring
from maild.workers.supervisor import Supervisor


def serve(
    config: cfg.Config, wiring: Wiring, *, allow_root: bool = False, init_state: bool = False
) -> None:
    for sig in (signal.SIGHUP, SIG_CONTROL):  # until run() handles them: never die of one
        signal.signal(sig, signal.SIG_IGN)
    daemon: Daemon
    if config.server.workers > 1:
        sup = Supervisor(config, wiring, allow_root=allow_root, init_state=init_state)
        sup.prepare()  # bind, drop root, fork the fork server: before any loop or thread
        daemon = sup
    else:
        daemon = Daemon(config, wiring, allow_root=allow_root, init_state=init_state)
    run_loop(daemon.run())


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, on uvloop where it is installed (a faster event loop)."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(main)
    else:
        asyncio.run(main)
