"""The supervisor <-> worker channel: one Unix socketpair per worker, framed messages.

A frame is a 4-byte big-endian length and a pickled tuple (id, kind, args). id > 0 asks
for an answer, which comes back as (-id, "ok" | "error", value); id 0 is a notice that
needs none (a commit, a release, a stats report). The socketpair is created by the
supervisor and exists only in it and its one worker (no name in the filesystem), so
nothing else can write to it: pickle carries what both ends already trust (the parsed
policy, rates, signatures).

Frames of one channel are handled in the order they were sent; a handler that returns
an awaitable is awaited in its own task, so a slow answer does not hold up the notices
behind it. When the peer goes away (a worker killed, the supervisor gone) every call
waiting for an answer fails with ChannelClosed, and `on_close` runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("maild.workers")

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a policy with many customers; anything larger is a bug
CALL_TIMEOUT = 10.0  # seconds: a supervisor that does not answer is a tempfail, not a hang

Handler = Callable[[str, tuple], Any]


class ChannelClosed(ConnectionError):
    """The other end of the channel is gone; the call was not answered."""


class RemoteError(RuntimeError):
    """The handler at the other end raised; the message names the exception."""


class Channel:
    def __init__(self, sock: socket.socket, handler: Handler, *, name: str = "") -> None:
        self.sock = sock
        self.handler = handler
        self.name = name
        self.on_close: list[Callable[[], None]] = []
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._serving: asyncio.Task | None = None

    async def start(self) -> None:
        self.sock.setblocking(False)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
        self._serving = asyncio.get_running_loop().create_task(self._serve())

    # ------------------------------------------------------------------ sending

    def _write(self, frame: tuple) -> None:
        if self.closed or self._writer is None:
            raise ChannelClosed(f"channel {self.name} is closed")
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_LEN.pack(len(data)) + data)

    def send(self, kind: str, *args: Any) -> None:
        """A notice: no answer, no wait."""
        self._write((0, kind, args))

    async def call(self, kind: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Ask and wait for the answer (ChannelClosed, RemoteError or TimeoutError)."""
        mid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        try:
            self._write((mid, kind, args))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(mid, None)

    # ------------------------------------------------------------------ receiving

    async def _serve(self) -> None:
        assert self._reader is not None
        try:
            while True:
                head = await self._reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes")
                mid, kind, args = pickle.loads(await self._reader.readexactly(n))
                if mid < 0:
                    self._answered(-mid, kind, args)
                else:
                    self._dispatch(mid, kind, args)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001  a bad frame ends the channel, logged once
            log.error("error: workers: channel %s: %s: %s", self.name, type(e).__name__, e)
        finally:
            self._close()

    def _answered(self, mid: int, status: str, value: Any) -> None:
        fut = self._waiting.get(mid)
        if fut is None or fut.done():
            return  # timed out meanwhile
        if status == "ok":
            fut.set_result(value)
        else:
            fut.set_exception(RemoteError(value))

    def _dispatch(self, mid: int, kind: str, args: tuple) -> None:
        try:
            result = self.handler(kind, args)
        except Exception as e:  # noqa: BLE001  answered as an error, the channel goes on
            self._reply(mid, e)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(self._await(mid, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif mid:
            self._reply(mid, None, result)

    async def _await(self, mid: int, awaitable: Any) -> None:
        try:
            value = await awaitable
        except Exception as e:  # noqa: BLE001
            self._reply(mid, e)
        else:
            self._reply(mid, None, value)

    def _reply(self, mid: int, error: BaseException | None, value: Any = None) -> None:
        if error is not None and not mid:
            log.error("error: workers: %s: %s: %s", self.name, type(error).__name__, error)
            return
        if not mid:
            return
        with contextlib.suppress(ChannelClosed):
            if error is None:
                self._write((-mid, "ok", value))
            else:
                self._write((-mid, "error", f"{type(error).__name__}: {error}"))

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"channel {self.name} closed"))
        if self._writer is not None:
            self._writer.close()
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("workers: on_close of %s", self.name)

    async def close(self) -> None:
        """Close our end (the peer sees end of file) and stop reading."""
        self._close()
        if self._serving is not None and self._serving is not asyncio.current_task():
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
