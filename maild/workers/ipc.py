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


class Channel(asyncio.Protocol):
    """Frames in and out of one socketpair end. A Protocol, not streams: a frame costs no
    coroutine on either side, and the frames written in one turn of the event loop go
    out in one write."""

    def __init__(self, sock: socket.socket, handler: Handler, *, name: str = "") -> None:
        self.sock = sock
        self.handler = handler
        self.name = name
        self.on_close: list[Callable[[], None]] = []
        self.closed = False
        self.peer_closed = False  # the other end went away first (not a bad frame, not us)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._receiving = False  # in data_received: answers go out together at its end
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        await self._loop.connect_accepted_socket(lambda: self, self.sock)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.peer_closed = True
        self._close()

    def data_received(self, data: bytes) -> None:
        buf = self._inbox
        buf += data
        pos = 0
        self._receiving = True
        try:
            while len(buf) - pos >= _LEN.size:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes")
                end = pos + _LEN.size + n
                if len(buf) < end:
                    break
                mid, kind, args = pickle.loads(memoryview(buf)[pos + _LEN.size : end])
                pos = end
                if mid < 0:
                    self._answered(-mid, kind, args)
                else:
                    self._dispatch(mid, kind, args)
        except Exception as e:  # noqa: BLE001  a bad frame ends the channel, logged once
            log.error("error: workers: channel %s: %s: %s", self.name, type(e).__name__, e)
            del buf[:]
            self._close()
            return
        finally:
            self._receiving = False
        del buf[:pos]
        self._flush()

    # ------------------------------------------------------------------ sending

    def _write(self, frame: tuple) -> None:
        if self.closed or self._transport is None:
            raise ChannelClosed(f"channel {self.name} is closed")
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outbox and not self._receiving:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._outbox.append(_LEN.pack(len(data)))
        self._outbox.append(data)

    def _flush(self) -> None:
        """Notices and calls wait for the end of this turn of the loop: the frames of
        every session that ran in it go out in one write (one wake-up of the peer, not
        one per call); the answers to a batch of frames received go at its end."""
        out, self._outbox = self._outbox, []
        if out and not self.closed and self._transport is not None:
            self._transport.write(b"".join(out))

    def send(self, kind: str, *args: Any) -> None:
        """A notice: no answer, no wait."""
        self._write((0, kind, args))

    async def call(self, kind: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Ask and wait for the answer (ChannelClosed, RemoteError or TimeoutError)."""
        mid = next(self._ids)
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting[mid] = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            self._write((mid, kind, args))
            return await fut
        finally:
            timer.cancel()
            self._waiting.pop(mid, None)

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
        if self._transport is not None:
            self._transport.close()
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("workers: on_close of %s", self.name)

    async def close(self) -> None:
        """Close our end (the peer sees end of file), after what is queued to go."""
        self._flush()
        self._close()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
