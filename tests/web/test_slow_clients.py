"""A slow client (slowloris) cannot hold a connection of the [web] listener open.

The listener shares the daemon's process, and so its file descriptors, with the SMTP
side: a connection that trickles its headers or its body must be closed after
guard.CLIENT_SECONDS, not after aiohttp's default keep-alive of an hour.
"""

from __future__ import annotations

import asyncio

from maild.web import guard
from tests.harness.ports import free_port
from tests.harness.waits import patience
from tests.web.conftest import LIST

PAGE = f"/maild/subscribe/{LIST}"


async def listener(site, monkeypatch) -> int:
    """The real listener (WebService._serve, as `maild serve` runs it) on a free port."""
    monkeypatch.setattr(guard, "CLIENT_SECONDS", 0.5, raising=False)
    port = free_port()
    await site.web._serve(
        site.web.app(pages=True, with_metrics=False), ("127.0.0.1", port), "listen"
    )
    return port


async def answer_to(port: int, data: bytes) -> bytes:
    """The first line the server sends (b"" if it closes) on a connection that sent
    `data` and nothing more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.readline(), patience(10))
    finally:
        writer.close()


async def test_headers_never_finished_are_cut_off(site, monkeypatch):
    port = await listener(site, monkeypatch)
    try:
        got = await answer_to(port, f"GET {PAGE} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        assert got == b""  # closed by maild, nothing answered
    finally:
        await site.web.stop()


async def test_a_body_never_finished_is_a_408(site, monkeypatch):
    port = await listener(site, monkeypatch)
    try:
        got = await answer_to(
            port,
            (
                f"POST {PAGE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                "\r\nContent-Length: 100\r\n\r\ncsrf="
            ).encode(),
        )
        assert got.startswith(b"HTTP/1.1 408 ")
    finally:
        await site.web.stop()
