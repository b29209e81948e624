"""The [web] listener bounds open connections, in all and per client address: a client
cannot take the file descriptors the SMTP side of the same process needs.

The real listener (WebService._serve, as `maild serve` runs it) on a free port, real
TCP connections from loopback.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from maild.web import guard
from tests.harness.ports import free_port
from tests.harness.waits import patience
from tests.web.conftest import LIST, web_config

PAGE = f"/maild/subscribe/{LIST}"


async def listener(site, **web) -> int:
    site.daemon.config = web_config(**web)
    port = free_port()
    await site.web._serve(
        site.web.app(pages=True, with_metrics=False), ("127.0.0.1", port), "listen"
    )
    return port


async def held(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """n connections that each got a page and stay open (keep-alive)."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await get(reader, writer) == b"HTTP/1.1 200 OK\r\n"
        conns.append((reader, writer))
    return conns


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(f"GET {PAGE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readline(), patience(10))
    if status.startswith(b"HTTP/1.1 200"):
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), patience(10))
        length = next(
            int(h.split(b":", 1)[1])
            for h in headers.split(b"\r\n")
            if h.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
    return status


async def first_line(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await get(reader, writer)
    finally:
        writer.close()


def close(conns) -> None:
    for _, w in conns:
        w.close()


@pytest.mark.parametrize("trusted", [False, True])
async def test_connections_per_client_address_are_capped(site, trusted, caplog):
    """Past max_connections_per_ip a client hears 503 and is closed; a trusted proxy,
    from which every client's connection comes, is held only to max_connections."""
    proxies = ["127.0.0.0/8"] if trusted else ["192.0.2.0/24"]
    port = await listener(
        site, max_connections=8, max_connections_per_ip=3, trusted_proxies=proxies
    )
    caplog.set_level(logging.WARNING, "maild.web")
    conns = await held(port, 3)
    try:
        if trusted:
            more = await held(port, 5)  # up to max_connections
            conns += more
            assert await first_line(port) == b"HTTP/1.1 503 Service Unavailable\r\n"
            reason = "max_connections = 8"
        else:
            assert await first_line(port) == b"HTTP/1.1 503 Service Unavailable\r\n"
            assert await first_line(port) == b"HTTP/1.1 503 Service Unavailable\r\n"
            reason = "max_connections_per_ip = 3"
        refusals = [r.getMessage() for r in caplog.records if "connection refused" in r.message]
        assert refusals == [f"web: connection refused: 503 client=127.0.0.1 reason={reason}"]
        # a connection that ends frees its place
        _, w = conns.pop()
        w.close()
        await w.wait_closed()

        async def served() -> bool:
            return await first_line(port) == b"HTTP/1.1 200 OK\r\n"

        for _ in range(100):
            if await served():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("a closed connection's place was not given back")
    finally:
        close(conns)
        await site.web.stop()


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_64(addr, key):
    assert guard.client_key(addr) == key
