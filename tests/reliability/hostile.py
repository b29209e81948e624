"""A hostile crowd against one `maild serve`, and the probes that must get through.

Shared by tests/reliability/test_hostile_load.py (a scaled-down crowd, behaviour asserted)
and bench/hostile.py (the full crowd of issue 15, latency and RSS measured).

The crowd, all strangers from many loopback addresses, runs in a spawned process, so the
probes' latency is maild's and not this process's event loop's:

* idle: connect, EHLO, then silence; when maild closes one (421 4.7.0 to make room,
  421 4.4.2 at the idle timeout), it reconnects a second later: a constant pressure;
* slowloris: one byte of "EHLO ..." every 2 s;
* holders: EHLO and MAIL FROM (half of them also a RCPT to a hosted address), then silence
  (before issue 15 each held a re-injection smtpd process from MAIL on);
* big: concurrent 24 MB messages to a hosted domain Postfix discards, sent back to back.

Probes, each one message a second: a customer (from its network, to a hosted recipient)
and a stranger writing to postmaster. Each probe message has a unique Subject, so the
test counts each exactly once in the Maildir Postfix delivered it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BIG_DOMAIN = "big.hosted.example"  # Postfix's transport_maps discards it
CUSTOMER_IP = "127.0.0.9"
STRANGER_IP = "127.0.0.5"
# The customer probe's recipients, in turn: one address would meet the customer's rate
# limit for one recipient (20 an hour) within the run.
CUSTOMER_RCPTS = tuple(f"probe{i}@hosted.example" for i in range(20))
POSTMASTER_RCPT = "postmaster@hosted.example"


@dataclass(frozen=True)
class Crowd:
    idle: int
    slowloris: int
    holders: int
    big: int  # concurrent 24 MB messages
    big_size: int = 24 * 1024 * 1024
    per_ip: int = 20  # connections per source address (max_sessions_per_ip)


def postfix_main_cf() -> dict[str, str]:
    """The downstream's settings: 24 MB messages fit, the big domain is discarded."""
    return {
        "message_size_limit": str(64 * 1024 * 1024),
        "transport_maps": f"inline:{{{BIG_DOMAIN}=discard:}}",
    }


def addresses(block: int | str, n: int, per: int) -> list[str]:
    """n source addresses for `per` connections each, in 127.<block>.x.y."""
    out = []
    for i in range(n):
        k = i // per
        out.append(f"127.{block}.{k // 250}.{k % 250 + 1}")
    return out


# --------------------------------------------------------------------------- crowd


async def read_reply(r: asyncio.StreamReader) -> bytes:
    """One (multi-line) SMTP reply."""
    out = b""
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError(f"closed after {out!r}")
        out += line
        if len(line) >= 4 and line[3:4] == b" ":
            return out


async def _until_closed(r: asyncio.StreamReader, stop: asyncio.Event) -> bytes:
    """Read until the server closes (what it said last) or the load ends."""
    seen = b""
    reading = asyncio.ensure_future(r.read())
    stopping = asyncio.ensure_future(stop.wait())
    while True:
        done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading in done:
            try:
                chunk = reading.result()
            except ConnectionError:
                chunk = b""
            if not chunk:
                stopping.cancel()
                return seen
            seen = (seen + chunk)[-300:]
            reading = asyncio.ensure_future(r.read(4096))
        if stopping in done:
            reading.cancel()
            return seen


def _closed_by(seen: bytes) -> str:
    lines = [x for x in seen.split(b"\r\n") if x]
    return lines[-1][:9].decode("ascii", "replace") if lines else "silent"


async def _open(port: int, src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


async def _open_or_wait(
    port: int, src: str, stats: Counter[str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection, or None a second after the connect failed (the caller tries again)."""
    try:
        return await _open(port, src)
    except OSError:
        stats["connect-error"] += 1
        await asyncio.sleep(1)
        return None


async def idle(
    port: int,
    src: str,
    stop: asyncio.Event,
    stats: Counter[str],
    arrived: asyncio.Event | None,
    *,
    mail: bool = False,
    rcpt: bool = False,
    slow: bool = False,
) -> None:
    """One hostile connection, re-opened a second after maild closes it."""
    while not stop.is_set():
        if (conn := await _open_or_wait(port, src, stats)) is None:
            continue
        r, w = conn
        try:
            banner = await read_reply(r)
            if not banner.startswith(b"220"):
                stats["refused " + banner[:9].decode()] += 1
            else:
                if slow:
                    stats["slowloris"] += 1
                else:
                    w.write(b"EHLO crowd.example\r\n")
                    await read_reply(r)
                    if mail:
                        w.write(b"MAIL FROM:<a@outside.example>\r\n")
                        stats["mail " + (await read_reply(r))[:3].decode()] += 1
                    if rcpt:
                        w.write(b"RCPT TO:<held@hosted.example>\r\n")
                        stats["rcpt " + (await read_reply(r))[:9].decode()] += 1
                if arrived is not None:
                    arrived.set()
                    arrived = None
                if slow:
                    seen = await _drip(r, w, stop)
                else:
                    seen = await _until_closed(r, stop)
                if not stop.is_set():
                    stats["closed " + _closed_by(seen)] += 1
        except (ConnectionError, OSError):
            stats["reset"] += 1
        finally:
            w.close()
        if arrived is not None:
            arrived.set()
            arrived = None
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def _drip(r: asyncio.StreamReader, w: asyncio.StreamWriter, stop: asyncio.Event) -> bytes:
    """Slowloris in the command phase: one byte of EHLO every 2 s."""
    reader = asyncio.ensure_future(_until_closed(r, stop))
    for byte in b"EHLO slowly.example\r\n" * 50:
        if reader.done() or stop.is_set():
            break
        w.write(bytes([byte]))
        with contextlib.suppress(ConnectionError):
            await w.drain()
        await asyncio.wait([reader], timeout=2.0)
    return await reader


def big_message(size: int, tag: str) -> bytes:
    head = (
        f"From: bulk@outside.example\r\nTo: x@{BIG_DOMAIN}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@outside.example>\r\nDate: Thu, 3 Dec 2026 07:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    return head + line * ((size - len(head)) // len(line))


async def big(
    port: int, src: str, size: int, stop: asyncio.Event, stats: Counter[str], arrived: asyncio.Event
) -> None:
    """24 MB messages back to back until the load ends."""
    body = big_message(size, "big") + b".\r\n"
    while not stop.is_set():
        if (conn := await _open_or_wait(port, src, stats)) is None:
            continue
        r, w = conn
        try:
            if not (await read_reply(r)).startswith(b"220"):
                stats["big refused at connect"] += 1
                arrived.set()
                continue
            for line in (
                b"EHLO big.example\r\n",
                b"MAIL FROM:<bulk@outside.example>\r\n",
                f"RCPT TO:<x@{BIG_DOMAIN}>\r\n".encode(),
                b"DATA\r\n",
            ):
                w.write(line)
                got = await read_reply(r)
                if got[:1] not in b"23":
                    stats["big " + got[:9].decode()] += 1
                    arrived.set()  # it is in the crowd, refused or not
                    break
            else:
                arrived.set()
                for i in range(0, len(body), 1 << 20):
                    w.write(body[i : i + (1 << 20)])
                    await w.drain()
                final = await read_reply(r)
                stats["big " + final[:9].decode()] += 1
                w.write(b"QUIT\r\n")
        except (ConnectionError, OSError):
            stats["big reset"] += 1
        finally:
            w.close()
        if not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)


async def _crowd(port: int, c: Crowd, ready: Any, stop_flag: Any, result: Any) -> None:
    stop = asyncio.Event()
    stats: Counter[str] = Counter()
    arrived: list[asyncio.Event] = []
    tasks = []

    def start(coro_fn: Any, *args: Any, **kw: Any) -> None:
        ev = asyncio.Event()
        arrived.append(ev)
        tasks.append(asyncio.ensure_future(coro_fn(*args, ev, **kw)))

    for src in addresses(20, c.idle, c.per_ip):
        start(idle, port, src, stop, stats)
    for src in addresses(21, c.slowloris, c.per_ip):
        start(idle, port, src, stop, stats, slow=True)
    for i, src in enumerate(addresses(22, c.holders, c.per_ip)):
        start(idle, port, src, stop, stats, mail=True, rcpt=i % 2 == 1)
    for src in addresses(23, c.big, 1):
        ev = asyncio.Event()
        arrived.append(ev)
        tasks.append(asyncio.ensure_future(big(port, src, c.big_size, stop, stats, ev)))
        await asyncio.sleep(0.05)
    await asyncio.gather(*(e.wait() for e in arrived))
    ready.set()
    while not stop_flag.is_set():
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    result.put(dict(stats))


def _crowd_main(port: int, c: Crowd, ready: Any, stop_flag: Any, result: Any) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_crowd(port, c, ready, stop_flag, result))


@dataclass
class CrowdProcess:
    """The crowd in its own (spawned) process."""

    port: int
    crowd: Crowd
    ctx: Any = field(default_factory=lambda: multiprocessing.get_context("spawn"))

    def __enter__(self) -> CrowdProcess:
        self.ready, self.stop_flag = self.ctx.Event(), self.ctx.Event()
        self.result = self.ctx.Queue()
        self.proc = self.ctx.Process(
            target=_crowd_main,
            args=(self.port, self.crowd, self.ready, self.stop_flag, self.result),
            daemon=True,
        )
        self.proc.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        return bool(self.ready.wait(timeout))

    def stop(self, timeout: float = 120) -> dict[str, int]:
        self.stop_flag.set()
        try:
            stats = self.result.get(timeout=timeout)
        except Exception:  # noqa: BLE001  the crowd died: its stats are lost, not the test's verdict
            stats = {"crowd-failed": 1}
        self.proc.join(10)
        return stats

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------------- probes


@dataclass
class ProbeResult:
    who: str
    subject: str
    code: int
    reply: str
    seconds: float
    rcpt: str = ""
    # When each reply came, seconds from the start of connect: "connect" (the TCP
    # handshake), "220", "EHLO", "MAIL", "RCPT", "DATA" (the 354), "dot" (the final reply).
    steps: dict[str, float] = field(default_factory=dict)


async def probe_one(
    port: int,
    src: str,
    sender: str,
    rcpt: str,
    who: str,
    timeout: float = 120.0,
    *,
    host: str = "127.0.0.1",
) -> ProbeResult:
    """One complete session; the final reply and the time from connect to it (-2 if
    maild did not answer within `timeout`)."""
    steps: dict[str, float] = {}
    try:
        result = await asyncio.wait_for(_probe(host, port, src, sender, rcpt, who, steps), timeout)
    except TimeoutError:
        result = ProbeResult(who, "", -2, f"no answer within {timeout:g}s", timeout)
    result.rcpt = rcpt
    result.steps = steps
    return result


async def _probe(
    host: str, port: int, src: str, sender: str, rcpt: str, who: str, steps: dict[str, float]
) -> ProbeResult:
    subject = f"{who}-{uuid.uuid4().hex[:16]}"
    t0 = time.monotonic()

    def result(code: int, reply: str) -> ProbeResult:
        return ProbeResult(who, subject, code, reply, time.monotonic() - t0)

    try:
        r, w = await asyncio.open_connection(host, port, local_addr=(src, 0))
    except OSError as e:
        return result(-1, repr(e))
    steps["connect"] = time.monotonic() - t0
    try:
        got = await read_reply(r)
        steps["220"] = time.monotonic() - t0
        if not got.startswith(b"220"):
            return result(int(got[:3]), got.decode())
        for step, line in (
            ("EHLO", b"EHLO probe.example\r\n"),
            ("MAIL", f"MAIL FROM:<{sender}>\r\n".encode()),
            ("RCPT", f"RCPT TO:<{rcpt}>\r\n".encode()),
            ("DATA", b"DATA\r\n"),
        ):
            w.write(line)
            got = await read_reply(r)
            steps[step] = time.monotonic() - t0
            if got[:1] not in b"23":
                return result(int(got[:3]), got.decode().strip())
        w.write(
            f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@probe.example>\r\n"
            "Date: Thu, 3 Dec 2026 07:00:00 +0000\r\n\r\n".encode()
            + _prose()
            + b".\r\n"
        )
        final = await read_reply(r)
        steps["dot"] = time.monotonic() - t0
        done = result(int(final[:3]), final.decode().strip())
        w.write(b"QUIT\r\n")
        with contextlib.suppress(ConnectionError):
            await read_reply(r)
        return done
    except (ConnectionError, OSError) as e:
        return result(-1, repr(e))
    finally:
        w.close()


_WORDS = [
    "invoice",
    "meeting",
    "quarter",
    "budget",
    "river",
    "garden",
    "ticket",
    "office",
    "printer",
    "window",
    "project",
    "deadline",
    "summer",
    "harbor",
    "lantern",
    "pencil",
    "orange",
    "violin",
    "castle",
    "market",
    "thunder",
    "basket",
    "mirror",
    "rocket",
    "silver",
    "forest",
    "doctor",
    "bridge",
    "island",
    "canvas",
    "planet",
    "butter",
    "engine",
    "legend",
    "marble",
    "needle",
    "pirate",
    "saddle",
    "temple",
    "velvet",
]


def _prose() -> bytes:
    """A body unlike every other probe's: the bulk detector (rightly) refuses a customer's
    twentieth copy of one text."""
    rnd = random.Random(uuid.uuid4().int)
    lines = [" ".join(rnd.choice(_WORDS) for _ in range(12)) for _ in range(6)]
    return ("\r\n".join(lines) + "\r\n").encode()


async def probes(
    port: int, seconds: float, *, count: int | None = None, direct_port: int | None = None
) -> list[ProbeResult]:
    """The customer and the stranger-to-postmaster probe, each starting a message every
    second (the next at once when one took longer) for `seconds`, or `count` each.

    `direct_port`: a third probe, "postfix", sends the customer's message straight to
    that port (the downstream maild relays to), so what Postfix itself takes under the
    same load can be told from what maild adds."""
    out: list[ProbeResult] = []
    end = time.monotonic() + seconds

    async def every_second(
        port: int, src: str, sender: str, rcpts: tuple[str, ...], who: str, offset: float
    ) -> None:
        await asyncio.sleep(offset)
        i = 0
        while (i < count) if count is not None else (time.monotonic() < end):
            due = time.monotonic() + 1.0
            out.append(await probe_one(port, src, sender, rcpts[i % len(rcpts)], who))
            i += 1
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    lanes = [
        every_second(port, CUSTOMER_IP, "ann@acme.example", CUSTOMER_RCPTS, "customer", 0.0),
        every_second(
            port, STRANGER_IP, "someone@outside.example", (POSTMASTER_RCPT,), "postmaster", 0.5
        ),
    ]
    if direct_port is not None:
        lanes.append(
            every_second(
                direct_port, CUSTOMER_IP, "ann@acme.example", CUSTOMER_RCPTS, "postfix", 0.25
            )
        )
    await asyncio.gather(*lanes)
    return out


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v) + 0.5) - 1))]
