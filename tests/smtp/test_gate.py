"""The gate (maild.smtp.gate): admission control at connect, before a session is built.

Real loopback sockets and maild's own MaildSMTP; the handler is a stand-in that records
what the server tells it (the proxy's policy work is not what these tests are about).
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import weakref

from maild.config import Server, parse
from maild.smtp.admission import Admission, Refusal
from maild.smtp.budget import Budget
from maild.smtp.gate import Door
from maild.smtp.server import MaildSession, MaildSMTP
from maild.smtp.sessions import SessionCounter
from tests.harness.waits import wait_until_async


class Handler:
    """SessionHooks that records the refusals and lost sessions."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []
        self.lost = 0

    def session_refused(self, session: MaildSession, refusal: Refusal) -> None:
        self.refused.append((session.client.addr, refusal.reply))

    def session_lost(self, session: MaildSession) -> None:
        self.lost += 1

    def session_shed(self, session: MaildSession, reply: str) -> None:
        pass


def server_settings(**limits: object) -> Server:
    doc = {"postmaster": {"domains": ["h.example"]}, "server": {"limits": limits}}
    return parse(doc).server


async def serve(max_sessions_per_ip: int = 1):
    """A server with the gate; (admission, handler, sessions built, server, port, counter)."""
    settings = server_settings(max_sessions_per_ip=max_sessions_per_ip)
    admission = Admission(settings.limits)
    handler = Handler()
    built: list[MaildSMTP] = []
    counter = SessionCounter()
    budget = Budget(1 << 20, 1 << 16, tempfile.gettempdir())

    def make() -> MaildSMTP:
        smtp = MaildSMTP(
            handler,  # type: ignore[arg-type]
            settings=settings,
            counter=counter,
            trusted=(),
            admission=admission,
            budget=budget,
        )
        built.append(smtp)
        return smtp

    door = Door(make, admission, (), "mx.example", handler.session_refused)
    server = await asyncio.get_running_loop().create_server(door.factory, "127.0.0.1", 0)
    return admission, handler, built, server, server.sockets[0].getsockname()[1], counter


async def first_line(port: int) -> tuple[bytes, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    return await r.readline(), w


async def test_a_refused_connection_gets_421_without_a_session():
    admission, handler, built, server, port, counter = await serve()
    try:
        line, first = await first_line(port)
        assert line.startswith(b"220 ")
        refusals = []
        for _ in range(5):
            line, w = await first_line(port)
            refusals.append(line)
            w.close()
        assert all(
            x.startswith(b"421 4.7.0 mx.example Too many connections from 127.0.0.1")
            for x in refusals
        ), refusals
        assert len(built) == 1  # only the admitted connection got a session
        # the decision line once per client per minute, not once per connection
        assert [a for a, _ in handler.refused] == ["127.0.0.1"]
        assert admission.total == 1 and counter.total == 1
        first.close()
        await wait_for(lambda: admission.total == 0 and handler.lost == 1)
        assert counter.total == 0
        line, w = await first_line(port)  # the slot is free again
        assert line.startswith(b"220 ")
        w.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_refused_connections_leave_nothing_for_the_garbage_collector():
    """A crowd that reconnects at once must not cost a collection per few connections:
    a refused connection is freed by reference counting alone."""
    admission, handler, built, server, port, counter = await serve()
    try:
        line, first = await first_line(port)
        assert line.startswith(b"220 ")
        for _ in range(20):  # warm: the client side's own objects settle
            _, w = await first_line(port)
            w.close()
            await w.wait_closed()
        gc.collect()
        gc.disable()
        try:
            for _ in range(100):
                _, w = await first_line(port)
                w.close()
                await w.wait_closed()
            await asyncio.sleep(0.05)
            garbage = gc.collect()
        finally:
            gc.enable()
        assert len(built) == 1
        # the client's side of 100 connections (asyncio's streams make a few cycles)
        # is all that is left (about 1,400); a session per refused connection left 45
        # objects more each (5,900 in all)
        assert garbage < 3000, garbage
        first.close()
    finally:
        server.close()
        await server.wait_closed()


async def wait_for(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met"
        await asyncio.sleep(0.01)


async def _session_gone(port: int, built: list[MaildSMTP], handler: Handler, quit: bool) -> bool:
    """One admitted session (EHLO, then QUIT or a hang-up), ended: whether reference
    counting alone freed it."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    w.write(b"EHLO client.example\r\n")
    while (await r.readline())[3:4] != b" ":
        pass
    lost = handler.lost
    if quit:
        w.write(b"QUIT\r\n")
        assert (await r.readline()).startswith(b"221 ")
    w.close()
    await w.wait_closed()

    async def ended() -> bool:  # connection lost, and the session's task over
        task = built[-1]._handler_coroutine
        return handler.lost > lost and (not isinstance(task, asyncio.Task) or task.done())

    assert await wait_until_async(ended)
    session = weakref.ref(built.pop())
    await asyncio.sleep(0)  # the loop's last handles of the connection
    return session() is None


async def test_an_ended_session_is_freed_without_the_garbage_collector():
    """A closed session used to be a web of reference cycles (its command tables' bound
    methods, the stream writer, the strict reader, the slot's notify, the task's
    exception and its frames) that only a full collection freed: under a crowd, hundreds
    of dead sessions waited for it at a time. Reference counting frees it now."""
    admission, handler, built, server, port, counter = await serve()
    gc.collect()
    gc.disable()
    try:
        assert await _session_gone(port, built, handler, quit=True)
        assert await _session_gone(port, built, handler, quit=False)
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
