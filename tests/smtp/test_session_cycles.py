"""A session that has ended is freed by reference counting, not by the garbage collector.

Why: every session's protocol was a reference cycle (its command table of its own bound
methods, the reader naming it, its task, its slot's callback): ~75 objects a session
that the collector had to find and traverse on the event loop, the CPU of every message.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from tests.smtp.test_gate import serve, wait_for


@pytest.mark.parametrize("ending", ["quit", "client-drops"])
async def test_an_ended_session_leaves_no_cycle_for_the_collector(ending):
    """Both ends of a session: QUIT (the task ends by itself, then connection_lost) and a
    client that drops an idle session (connection_lost cancels the task)."""
    admission, handler, built, server, port, counter = await serve()
    gc.disable()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await r.readline()).startswith(b"220 ")
        w.write(b"EHLO client.example\r\n")
        while not (await r.readline()).startswith(b"250 "):
            pass
        if ending == "quit":
            w.write(b"QUIT\r\n")
            assert (await r.readline()).startswith(b"221 ")
        w.close()
        await w.wait_closed()
        protocol = weakref.ref(built.pop())
        await wait_for(lambda: handler.lost == 1 and admission.total == 0)
        # a few loop turns for the cancelled session task to finish; no collection runs
        await wait_for(lambda: protocol() is None)
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
