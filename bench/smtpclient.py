"""A minimal asyncio SMTP client for the latency and idle-connection benchmarks.

Why not smtplib or aiosmtplib: the latency benchmark needs an open-loop load (a new
session every 1/rate seconds whatever the server does, so queueing in the server shows
up as latency instead of slowing the client down) and the timestamp of the final reply
with as little client code as possible in between; and the memory benchmark needs
hundreds of parked sessions. Raw asyncio streams do both in a few lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from bench.common import HELO, RECIPIENT, SENDER


class SmtpFailure(Exception):
    """The server answered something other than the expected reply class."""


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One complete (possibly multi-line) reply: (code, last line)."""
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpFailure("connection closed")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line


async def _expect(reader: asyncio.StreamReader, lo: int, hi: int, what: str) -> None:
    code, line = await _reply(reader)
    if not lo <= code < hi:
        raise SmtpFailure(f"{what}: {line!r}")


def message(size: int, serial: int) -> bytes:
    """A well-formed message of about ``size`` body bytes, CRLF, dot-safe, like
    smtp-source's (the same content every time: see bench/common.py on [bulk])."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: {date}\r\n"
        f"Message-Id: <{serial}.{time.time_ns()}@{HELO}>\r\nSubject: maild bench\r\n\r\n"
    )
    line = b"X" * 78 + b"\r\n"
    body = line * max(1, size // len(line))
    return head.encode() + body


@dataclass
class Timing:
    """Per-message latency (seconds, start of connect to the final 250) and failures."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    late_starts: int = 0  # sessions the generator started > 5 ms after their slot


async def one_message(port: int, payload: bytes, host: str = "127.0.0.1") -> float:
    """Connect, EHLO, MAIL, RCPT, DATA, the message; seconds until the final 250."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, 200, 300, "banner")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, 200, 300, "EHLO")
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await _expect(reader, 200, 300, "MAIL")
        writer.write(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
        await _expect(reader, 200, 300, "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, 300, 400, "DATA")
        writer.write(payload + b".\r\n")
        await _expect(reader, 200, 300, "end of data")
        dt = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(SmtpFailure, OSError):
            await _reply(reader)
        return dt
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def open_loop(
    port: int, *, rate: float, seconds: float, size: int, max_in_flight: int = 500
) -> Timing:
    """Start one session every 1/rate s for ``seconds``; collect each message's latency."""
    timing = Timing()
    payload = message(size, 0)
    interval = 1.0 / rate
    start = time.perf_counter()
    n = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()

    async def run() -> None:
        try:
            timing.latencies.append(await one_message(port, payload))
        except (SmtpFailure, OSError) as e:
            timing.failures.append(str(e))

    for i in range(n):
        slot = start + i * interval
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            timing.late_starts += 1
        if len(tasks) >= max_in_flight:
            timing.failures.append("too many sessions in flight: server cannot keep up")
            break
        t = asyncio.get_running_loop().create_task(run())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=120)
    return timing


async def park(
    port: int, n: int, *, ehlo: bool = True, host: str = "127.0.0.1"
) -> list[asyncio.StreamWriter]:
    """Open ``n`` sessions that greet and then stay idle; the caller closes them."""
    writers: list[asyncio.StreamWriter] = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        await _expect(reader, 200, 300, "banner")
        if ehlo:
            writer.write(f"EHLO {HELO}\r\n".encode())
            await _expect(reader, 200, 300, "EHLO")
        writers.append(writer)
    return writers


async def unpark(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        with contextlib.suppress(OSError):
            w.write(b"QUIT\r\n")
        w.close()
    for w in writers:
        with contextlib.suppress(OSError):
            await w.wait_closed()
