"""Downstream connection caps, the no-greeting case (Postfix out of smtpd processes),
and a spooled message relayed a block at a time."""

from __future__ import annotations

import asyncio
import socket

import pytest

from maild.smtp.downstream import Downstream, DownstreamBusy
from tests.smtp.test_downstream_client import EHLO, FakeServer

CHUNKING = EHLO.replace(b"250 8BITMIME", b"250-8BITMIME\r\n250 CHUNKING")


async def _server(replies: dict[bytes, bytes]) -> tuple[asyncio.AbstractServer, FakeServer, int]:
    fake = FakeServer(replies)
    srv = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    return srv, fake, srv.sockets[0].getsockname()[1]


async def test_caps_in_all_per_client_and_the_reserved_share():
    srv, _, port = await _server({b"EHLO": EHLO})
    ds = Downstream(
        "127.0.0.1",
        port,
        local_hostname="m",
        timeout=5,
        max_connections=3,
        max_per_client=2,
        reserved=1,
    )
    try:
        a1, _ = await ds.acquire("198.51.100.1", reserved=False)
        a2, _ = await ds.acquire("198.51.100.1", reserved=False)
        with pytest.raises(DownstreamBusy) as e:
            await ds.acquire("198.51.100.1", reserved=False)
        assert e.value.reply.startswith(
            "451 4.4.5 Too many messages in transit from 198.51.100.1 at once (limit 2)"
        )
        assert e.value.rule == "downstream-per-client"
        with pytest.raises(DownstreamBusy) as e:  # the strangers' share (2) is used up
            await ds.acquire("198.51.100.2", reserved=False)
        assert e.value.rule == "downstream-connections"
        c1, _ = await ds.acquire("192.0.2.1", reserved=True)  # a customer: reserved share
        with pytest.raises(DownstreamBusy):
            await ds.acquire("192.0.2.2", reserved=True)  # 3 in all
        assert ds.in_use == 3 and ds.busy == 3
        ds.release(a1, reusable=True)
        assert (
            ds._idle == [a1]
            and ds.in_use == 2
            and ds.per_client == {"198.51.100.1": 1, "192.0.2.1": 1}
        )
        b1, pooled = await ds.acquire("198.51.100.2", reserved=False)
        assert b1 is a1 and pooled
        for c in (a2, c1, b1):
            ds.release(c, reusable=True)
        # idle pooled connections hold smtpd processes too: never more than the cap
        assert len(ds._idle) == 3 and ds.in_use == 0
        assert ds.per_client == {} and ds.strangers_in_use == 0
        await ds.close()
    finally:
        srv.close()


async def test_no_greeting_is_busy_within_the_greeting_timeout():
    # A listening socket nobody accepts from: the kernel completes the handshake and the
    # client waits for a greeting, as with Postfix at its process limit.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(10)
    port = lsock.getsockname()[1]
    ds = Downstream(
        "127.0.0.1", port, local_hostname="m", timeout=60, max_connections=5, greeting_timeout=0.3
    )
    try:
        with pytest.raises(DownstreamBusy) as e:
            await ds.acquire("198.51.100.1", reserved=False)
        assert e.value.reply == (
            "451 4.4.5 Our mail server has no free process (no greeting "
            "from it within 0.3s); try again later"
        )
        assert ds.in_use == 0 and ds.per_client == {}
    finally:
        lsock.close()


BODY = b"".join(b".dot %d\r\nline %d\r\n" % (i, i) for i in range(2000))


def _blocks(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("ehlo", [EHLO, CHUNKING], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("block", [1, 5, 4096])
async def test_a_spooled_body_is_relayed_in_blocks(ehlo, block):
    srv, fake, port = await _server({b"EHLO": ehlo})
    ds = Downstream("127.0.0.1", port, local_hostname="m", timeout=5)
    try:
        conn, _ = await ds.acquire()
        head = b"Subject: big\r\n\r\n"
        body = BODY if block > 1 else BODY[:2000]
        r = await ds.data(conn, head, rest=_blocks(body, block), rest_size=len(body))
        assert r.code == 250 and conn.transactions == 1
        if ehlo is CHUNKING:
            assert fake.seen[-2] == b"BDAT %d LAST\r\n" % (len(head) + len(body))
            assert fake.seen[-1] == head + body
        else:
            assert (
                fake.seen[-1]
                == head
                + body.replace(b"\r\n.", b"\r\n..").replace(b".dot 0", b"..dot 0", 1)
                + b".\r\n"
            )
        ds.release(conn, reusable=True)
        await ds.close()
    finally:
        srv.close()


async def test_the_per_client_cap_is_for_strangers():
    srv, _, port = await _server({b"EHLO": EHLO})
    ds = Downstream(
        "127.0.0.1",
        port,
        local_hostname="m",
        timeout=5,
        max_connections=5,
        max_per_client=1,
        reserved=1,
    )
    try:
        conns = [(await ds.acquire("192.0.2.1", reserved=True))[0] for _ in range(3)]
        with pytest.raises(DownstreamBusy):  # the pool cap still holds
            for _ in range(3):
                conns.append((await ds.acquire("192.0.2.1", reserved=True))[0])
        assert ds.in_use == 5
        for c in conns:
            ds.release(c, reusable=False)
        await ds.close()
    finally:
        srv.close()
