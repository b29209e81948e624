"""The workers' Acceptor on a shared listening socket: how many connections one wake-up
takes, and what it does when the process is out of file descriptors."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from maild.workers import worker
from maild.workers.worker import ACCEPT_BATCH, Acceptor


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        transport.close()


def _listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=256)
    sock.setblocking(False)
    return sock


async def test_one_wake_up_takes_a_batch_and_leaves_the_rest_queued():
    sock = _listener()
    clients = [socket.create_connection(sock.getsockname()) for _ in range(ACCEPT_BATCH + 9)]
    acc = Acceptor(sock, _Refused)
    try:
        acc.loop.remove_reader(sock.fileno())  # one wake-up, called by hand
        acc._accept()
        assert len(acc.tasks) == ACCEPT_BATCH
        await asyncio.gather(*list(acc.tasks))
        acc._accept()  # the next wake-up takes the rest; the empty queue ends it
        assert len(acc.tasks) == 9
        await asyncio.gather(*list(acc.tasks))
    finally:
        acc.close()
        for c in clients:
            c.close()
        sock.close()


class _OutOfFiles:
    """A listening socket whose accept fails as it does at RLIMIT_NOFILE."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.calls = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


async def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(monkeypatch, caplog):
    delays: list[float] = []
    real = _listener()
    client = socket.create_connection(real.getsockname())  # the socket stays readable
    sock = _OutOfFiles(real)
    acc = Acceptor(sock, _Refused)  # type: ignore[arg-type]
    monkeypatch.setattr(acc.loop, "call_later", lambda delay, cb: delays.append(delay))
    try:
        for _ in range(20):  # loop iterations: a level-triggered reader would run in each
            await asyncio.sleep(0)
        assert sock.calls == 1
        assert delays == [worker.ACCEPT_RETRY]
        assert (
            sum("error: accept: Too many open files" in r.getMessage() for r in caplog.records) == 1
        )
        acc._resume()  # what call_later would run after ACCEPT_RETRY
        for _ in range(20):
            await asyncio.sleep(0)
        assert sock.calls == 2 and len(delays) == 2
    finally:
        acc.close()
        client.close()
        real.close()
