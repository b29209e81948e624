"""The fork server: where workers are forked from, then and at every restart.

The supervisor forks it once, after binding the listening socket, giving up root and
loading every module, and before any event loop or thread exists (fork() copies only the
calling thread: a lock another thread held would stay locked in the child). It stays
single-threaded, so every worker it forks starts from that clean state, with the
modules already loaded (an unprivileged user may not be able to read them again) and in
a few milliseconds (no new interpreter).

It speaks datagrams over a SOCK_SEQPACKET pair with the supervisor:

    supervisor -> "spawn INDEX" with the worker's end of its channel (SCM_RIGHTS)
    fork server -> "spawned INDEX PID"
    fork server -> "exit PID STATUS" (the raw wait status) when a worker ends

When the supervisor goes away (its end closes), the fork server sends SIGTERM to the
workers it forked and exits; the workers see their channel close too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
from collections.abc import Callable

WorkerMain = Callable[[int, socket.socket, socket.socket], int]
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def start(listen: socket.socket, worker_main: WorkerMain) -> tuple[int, socket.socket]:
    """Fork the fork server; returns its pid and the supervisor's end of its socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            mine.close()
            code = _serve(theirs, listen, worker_main)
        finally:
            os._exit(code)
    theirs.close()
    return pid, mine


def _serve(ctl: socket.socket, listen: socket.socket, worker_main: WorkerMain) -> int:
    for sig in _SIGNALS:  # the supervisor decides; a stop reaches us as end of file
        signal.signal(sig, signal.SIG_IGN)
    children: set[int] = set()
    while True:
        _reap(ctl, children)
        ready, _, _ = select.select([ctl], [], [], 0.2)
        if not ready:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 256, 1)
        except OSError:
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            for pid in children:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            return 0
        words = msg.decode().split()
        if words[:1] != ["spawn"] or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        index = int(words[1])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker
            code = 70  # EX_SOFTWARE: worker_main raised
            try:
                ctl.close()
                for sig in _SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                code = worker_main(index, socket.socket(fileno=fds[0]), listen)
            finally:
                os._exit(code)
        os.close(fds[0])
        children.add(pid)
        ctl.send(f"spawned {index} {pid}".encode())


def _reap(ctl: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            ctl.send(f"exit {pid} {status}".encode())


def describe(status: int) -> str:
    """A wait status as the log says it: 'exit status 1' or 'killed by signal 9 (SIGKILL)'."""
    if os.WIFSIGNALED(status):
        n = os.WTERMSIG(status)
        try:
            name = signal.Signals(n).name
        except ValueError:
            name = "?"
        return f"killed by signal {n} ({name})"
    return f"exit status {os.WEXITSTATUS(status)}"


class ForkServer:
    """The supervisor's side: ask for a worker, hear of every worker's end."""

    def __init__(
        self,
        pid: int,
        sock: socket.socket,
        on_exit: Callable[[int, int], None],
        on_gone: Callable[[], None] = lambda: None,
    ):
        self.pid = pid
        self.sock = sock
        self.on_exit = on_exit
        self.on_gone = on_gone  # it died: no worker can be forked, none's end is heard
        self.gone = False
        self._spawning: dict[int, asyncio.Future[int]] = {}
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def spawn(self, index: int, channel_end: socket.socket) -> int:
        """Fork worker `index` with channel_end as its channel; returns its pid."""
        fut = asyncio.get_running_loop().create_future()
        self._spawning[index] = fut
        socket.send_fds(self.sock, [f"spawn {index}".encode()], [channel_end.fileno()])
        try:
            return await asyncio.wait_for(fut, 10.0)
        finally:
            self._spawning.pop(index, None)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msg = await loop.sock_recv(self.sock, 256)
            except OSError:
                msg = b""
            if not msg:
                self.gone = True
                for fut in self._spawning.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the fork server is gone"))
                self.on_gone()
                return
            words = msg.decode().split()
            if words[0] == "spawned":
                waiting = self._spawning.get(int(words[1]))
                if waiting is not None and not waiting.done():
                    waiting.set_result(int(words[2]))
            elif words[0] == "exit":
                self.on_exit(int(words[1]), int(words[2]))

    async def exit_status(self) -> str:
        """How the fork server ended (its socket closes a moment before it can be reaped)."""
        for _ in range(40):
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                return describe(status)
            await asyncio.sleep(0.05)
        return "exited"

    async def close(self) -> None:
        """Close our end: the fork server stops (after SIGTERM to any worker left)."""
        self.on_gone = lambda: None
        self.sock.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.pid, 0)
