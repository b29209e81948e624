"""1,000 concurrent connections against one `maild serve`, 100 of them slowloris.

The crowd, all at once, from many loopback addresses (per-IP limits are per address):

* slowloris, half in the command phase (one byte of "EHLO ..." every 2 s) and half in
  DATA (a complete MAIL/RCPT/DATA, then one byte of message every 2 s);
* parked connections that greet (EHLO) and then say nothing;
* one flooder address that opens more sessions than max_sessions_per_ip allows;
* legitimate senders, each sending a message a second, one session per message.

The crowd runs in a separate (spawned) process, so the legitimate senders' latency is
maild's, not this test client's event loop's; they send alone first (the baseline), then
while every crowd connection is open.

Asserted behaviour (never timings): every legitimate message is accepted and delivered
exactly once (counted in smtp-sink's dumps by a unique Subject); every slowloris and
parked session is closed with 421 4.4.2; the flooder gets exactly max_sessions_per_ip
sessions and 421 4.7.0 for the rest; maild's peak RSS stays under a generous bound; and
afterwards maild counts zero sessions and serves the flooder's address again. Latency of
the legitimate senders (alone, then in the crowd) and RSS are measured and reported
(record_property, and printed with -s); docs/reliability.md has the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.conftest import front_policy
from tests.reliability.helpers import rss_kb, wait_for
from tests.reliability.hostile import addresses, read_reply


@dataclass(frozen=True)
class Crowd:
    connections: int  # all at once
    slowloris: int  # of them: half in the command phase, half in DATA
    flooder_extra: int  # sessions beyond max_sessions_per_ip from one address
    legit_senders: int  # concurrent senders, one message per `interval` each
    messages_each: int
    interval: float
    per_ip: int  # max_sessions_per_ip
    command_timeout: int
    data_timeout: int
    rss_bound_mb: int


SHORT = Crowd(
    connections=1000,
    slowloris=100,
    flooder_extra=10,
    legit_senders=60,
    messages_each=5,
    interval=1.0,
    per_ip=20,
    command_timeout=12,
    data_timeout=14,
    rss_bound_mb=400,
)
SOAK = Crowd(
    connections=2000,
    slowloris=300,
    flooder_extra=20,
    legit_senders=100,
    messages_each=30,
    interval=1.0,
    per_ip=20,
    command_timeout=30,
    data_timeout=40,
    rss_bound_mb=600,
)


@dataclass
class Seen:
    """What one connection saw from the server."""

    data: bytes = b""
    closed: bool = False

    @property
    def last_reply(self) -> bytes:
        lines = [x for x in self.data.split(b"\r\n") if x]
        return lines[-1] if lines else b""


async def _reader(r: asyncio.StreamReader, seen: Seen, limit: float) -> None:
    try:
        async with asyncio.timeout(limit):
            while True:
                chunk = await r.read(4096)
                if not chunk:
                    seen.closed = True
                    return
                seen.data += chunk
    except TimeoutError:
        pass
    except ConnectionError:  # a reset after the server's close (we were still writing)
        seen.closed = True


async def slowloris(
    port: int, src: str, in_data: bool, c: Crowd, arrived: Callable[[], None] = lambda: None
) -> Seen:
    seen = Seen()
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        if in_data:
            await read_reply(r)
            for line in (
                b"EHLO slow.example\r\n",
                b"MAIL FROM:<slow@outside.example>\r\n",
                b"RCPT TO:<slow@hosted.example>\r\n",
                b"DATA\r\n",
            ):
                w.write(line)
                got = await read_reply(r)
                assert got[:1] in b"23", got
        reader = asyncio.create_task(_reader(r, seen, c.data_timeout + c.command_timeout + 20))
        arrived()
        payload = b"Subject: drip drip drip drip drip\r\n" if in_data else b"EHLO slow.example\r\n"
        for byte in payload * 10:
            if reader.done():
                break
            w.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await w.drain()
            await asyncio.wait([reader], timeout=2.0)
        await reader
    finally:
        w.close()
    return seen


async def parked(
    port: int, src: str, c: Crowd, greet: bool = True, arrived: Callable[[], None] = lambda: None
) -> Seen:
    seen = Seen()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    except OSError as e:
        seen.data = repr(e).encode()
        arrived()
        return seen
    try:
        if greet:
            banner = await read_reply(r)
            seen.data += banner
            if banner.startswith(b"220"):
                w.write(b"EHLO parked.example\r\n")
                seen.data += await read_reply(r)
        arrived()
        await _reader(r, seen, c.command_timeout + 20)
    except ConnectionError:
        seen.closed = True
    finally:
        w.close()
    return seen


async def send_one(port: int, src: str, subject: str) -> tuple[int, float]:
    """One complete transaction; (final code, seconds from connect to the final reply)."""
    t0 = time.monotonic()
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        assert (await read_reply(r)).startswith(b"220")
        for line in (
            b"EHLO legit.example\r\n",
            b"MAIL FROM:<legit@outside.example>\r\n",
            b"RCPT TO:<rcpt@hosted.example>\r\n",
            b"DATA\r\n",
        ):
            w.write(line)
            got = await read_reply(r)
            if got[:1] not in b"23":
                return int(got[:3]), time.monotonic() - t0
        w.write(
            f"From: legit@outside.example\r\nSubject: {subject}\r\n\r\n".encode()
            + b"Quarterly report attached.\r\n" * 20
            + b".\r\n"
        )
        final = await read_reply(r)
        elapsed = time.monotonic() - t0
        w.write(b"QUIT\r\n")
        with contextlib.suppress(ConnectionError):
            await read_reply(r)
        return int(final[:3]), elapsed
    finally:
        w.close()


async def legit_sender(
    port: int, src: str, tag: str, c: Crowd, k: int, n: int, results: list[tuple[str, int, float]]
) -> None:
    """One message per interval; the senders are spread evenly over the interval."""
    await asyncio.sleep(c.interval * k / c.legit_senders)
    for i in range(n):
        start = time.monotonic()
        subject = f"{tag}-{i}-{uuid.uuid4().hex[:12]}"
        try:
            code, took = await send_one(port, src, subject)
        except (ConnectionError, OSError, AssertionError) as e:
            code, took = -1, float("nan")
            subject += f" ({e!r})"
        results.append((subject, code, took))
        await asyncio.sleep(max(0.0, c.interval - (time.monotonic() - start)))


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


@dataclass
class Report:
    numbers: dict = field(default_factory=dict)

    def __setitem__(self, k: str, v: object) -> None:
        self.numbers[k] = v


def plan(c: Crowd) -> tuple[list[str], list[str], int, list[str]]:
    """Source addresses: slowloris, parked, flooder session count, legitimate senders."""
    flooder = c.per_ip + c.flooder_extra
    n_parked = c.connections - c.slowloris - flooder - c.legit_senders
    assert n_parked > 0
    return (
        addresses("1", c.slowloris, c.per_ip // 2),
        addresses("2", n_parked, c.per_ip // 2),
        flooder,
        addresses("3", c.legit_senders, 3),
    )


def crowd_process(port: int, c: Crowd, q: Any, go: Any) -> None:
    """The hostile crowd, in its own process: the legitimate senders' latency is then
    maild's, not this client's event loop's. Starts on `go`, puts "ready" once every crowd
    connection is open, then the results."""

    async def run() -> dict:
        slow_src, parked_src, flooder, _ = plan(c)
        total = len(slow_src) + len(parked_src) + flooder
        count = [0]
        all_in = asyncio.Event()

        def arrived() -> None:
            count[0] += 1
            if count[0] == total:
                all_in.set()

        slow_tasks = [
            asyncio.create_task(slowloris(port, s, i % 2 == 1, c, arrived))
            for i, s in enumerate(slow_src)
        ]
        parked_tasks = [
            asyncio.create_task(parked(port, s, c, arrived=arrived)) for s in parked_src
        ]
        flood_tasks = [
            asyncio.create_task(parked(port, "127.0.4.1", c, arrived=arrived))
            for _ in range(flooder)
        ]
        with contextlib.suppress(TimeoutError):  # the first ones must not have timed out yet
            await asyncio.wait_for(all_in.wait(), c.command_timeout * 2 / 3)
        q.put("ready" if all_in.is_set() else f"only {count[0]} of {total} connected")
        return {
            "slow": await asyncio.gather(*slow_tasks),
            "parked": await asyncio.gather(*parked_tasks),
            "flood": await asyncio.gather(*flood_tasks),
        }

    q.put("started")
    go.wait(120)
    q.put(asyncio.run(run()))


async def legit_traffic(port: int, pid: int, c: Crowd, report: Report, q: Any, go: Any) -> list:
    """Baseline (the senders alone), then the same senders while the crowd is connected."""
    *_, legit_src = plan(c)
    rss: list[int] = []
    lag: list[float] = []

    async def sample() -> None:
        while True:
            with contextlib.suppress(OSError, KeyError):
                rss.append(rss_kb(pid)[0])
            t = time.monotonic()
            await asyncio.sleep(0.2)
            lag.append(time.monotonic() - t - 0.2)

    base_results: list[tuple[str, int, float]] = []
    await asyncio.gather(
        *(
            legit_sender(port, s, f"alone{k}", c, k, 2, base_results)
            for k, s in enumerate(legit_src)
        )
    )
    assert all(code == 250 for _s, code, _t in base_results), base_results
    loop = asyncio.get_running_loop()
    go.set()
    assert await loop.run_in_executor(None, q.get, True, 60) == "ready"
    sampler = asyncio.create_task(sample())
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    results: list[tuple[str, int, float]] = []
    await asyncio.gather(
        *(
            legit_sender(port, s, f"legit{k}", c, k, c.messages_each, results)
            for k, s in enumerate(legit_src)
        )
    )
    sampler.cancel()
    report["legit_seconds"] = round(time.monotonic() - t0, 1)
    report["maild_cpu_seconds"] = round(cpu_seconds(pid) - cpu0, 1)
    report["rss_peak_sampled_mb"] = round(max(rss) / 1024, 1)
    report["client_loop_lag_ms_max"] = round(max(lag) * 1000, 1)
    report["legit_messages"] = len(base_results) + len(results)
    base = [t for _s, _c, t in base_results]
    lat = [t for _s, code, t in results if code == 250]
    for name, xs in (("latency_alone_ms", base), ("latency_in_crowd_ms", lat)):
        report[name] = {
            "p50": round(pct(xs, 0.5) * 1000, 1),
            "p95": round(pct(xs, 0.95) * 1000, 1),
            "max": round(max(xs, default=float("nan")) * 1000, 1),
        }
    return base_results + results


def run_crowd(maild_factory: Any, smtp_sink_factory: Any, c: Crowd, record_property: Any) -> None:
    sink = smtp_sink_factory(backlog=512)
    m = maild_factory(
        front_policy(
            sink.port,
            limits={
                "command_timeout": f"{c.command_timeout}s",
                "data_timeout": f"{c.data_timeout}s",
                "max_sessions": c.connections + 200,
                "max_sessions_per_ip": c.per_ip,
                # every stranger fits in the strangers' share of the session slots and of the
                # downstream connections (smtp-sink has no process limit): this test is about
                # timeouts at scale; test_hostile_load.py is about a crowd larger than the shares
                "reserved_sessions": 100,
                "downstream_connections": 300,
            },
        )
    )
    pid = m.proc.pid
    report = Report()
    report["rss_idle_mb"] = round(rss_kb(pid)[0] / 1024, 1)
    ctx = multiprocessing.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=crowd_process, args=(m.port, c, q, go), daemon=True)
    child.start()
    try:
        assert q.get(timeout=60) == "started"
        legit = asyncio.run(legit_traffic(m.port, pid, c, report, q, go))
        out = q.get(timeout=c.data_timeout + c.command_timeout + 120)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    out["results"] = legit
    rss_now, hwm = rss_kb(pid)
    report["rss_peak_mb"] = round(hwm / 1024, 1)
    report["rss_after_mb"] = round(rss_now / 1024, 1)
    record_property("load", report.numbers)
    print(f"\nload numbers: {json.dumps(report.numbers)}")

    # every legitimate message: accepted, and in the sink exactly once
    bad = [(s, code) for s, code, _t in out["results"] if code != 250]
    assert not bad, f"{len(bad)} legitimate messages not accepted: {bad[:10]}"
    subjects = [s for s, _c, _t in out["results"]]
    wait_for(
        lambda: len(sink.dump_files()) >= len(subjects), "the sink to dump everything", timeout=60
    )
    dumps = b"\n".join(sink.messages())
    dup = {s: dumps.count(f"Subject: {s}\n".encode()) for s in subjects}
    assert all(n == 1 for n in dup.values()), {s: n for s, n in dup.items() if n != 1}
    # slowloris and parked sessions end with 421 4.4.2 and a close
    for kind in ("slow", "parked"):
        wrong = [s for s in out[kind] if not (s.closed and s.last_reply.startswith(b"421 4.4.2"))]
        assert not wrong, (
            f"{len(wrong)} {kind} sessions not closed with 421 4.4.2: "
            f"{[w.data[-200:] for w in wrong[:5]]}"
        )
    # the flooder: exactly per_ip sessions, 421 4.7.0 for the rest
    banners = [s.data[:9] for s in out["flood"]]
    assert sum(b.startswith(b"220") for b in banners) == c.per_ip, banners
    assert sum(b.startswith(b"421 4.7.0") for b in banners) == c.flooder_extra, banners
    # bounded memory, no leaked session, the flooder's address usable again
    assert hwm < c.rss_bound_mb * 1024, report.numbers
    assert m.proc.poll() is None
    status = m.root / "maild.status.json"
    wait_for(
        lambda: json.loads(status.read_text())["sessions"] == 0,
        "maild to count 0 sessions",
        timeout=15,
        interval=0.5,
    )
    again = asyncio.run(_banners(m.port, "127.0.4.1", c.per_ip))
    assert all(b.startswith(b"220") for b in again), again


async def _banners(port: int, src: str, n: int) -> list[bytes]:
    conns = [
        await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)) for _ in range(n)
    ]
    out = [await read_reply(r) for r, _w in conns]
    for _r, w in conns:
        w.write(b"QUIT\r\n")
        w.close()
    return out


@pytest.fixture(autouse=True)
def _fds() -> None:
    """The client side holds ~1,000 sockets too."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4096:
        pytest.skip("needs 4096 file descriptors")
    assert os.cpu_count()


def test_thousand_connections_hundred_slowloris(maild_factory, smtp_sink_factory, record_property):
    run_crowd(maild_factory, smtp_sink_factory, SHORT, record_property)


@pytest.mark.slow
def test_soak_two_thousand_connections(maild_factory, smtp_sink_factory, record_property):
    run_crowd(maild_factory, smtp_sink_factory, SOAK, record_property)


async def _open_many(port: int, sources: list[str]) -> list[tuple[bytes, asyncio.StreamWriter]]:
    out = []
    for src in sources:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        out.append((await read_reply(r), w))
    return out


def test_global_session_limit_refuses_with_421_and_frees_slots(maild_factory, smtp_sink_factory):
    """max_sessions = 50: from 60 different addresses, 50 sessions and ten 421 4.7.0; once
    they are gone, new sessions are served (no slot leaks)."""
    sink = smtp_sink_factory(dump=False)
    m = maild_factory(front_policy(sink.port, limits={"max_sessions": 50, "reserved_sessions": 0}))

    async def run() -> tuple[list[bytes], list[bytes]]:
        first = await _open_many(m.port, addresses("5", 60, 1))
        for _b, w in first:
            w.close()
        await asyncio.sleep(0.5)
        second = await _open_many(m.port, addresses("6", 50, 1))
        for _b, w in second:
            w.close()
        return [b for b, _w in first], [b for b, _w in second]

    first, second = asyncio.run(run())
    assert sum(b.startswith(b"220") for b in first) == 50
    assert sum(b.startswith(b"421 4.7.0") for b in first) == 10, first
    assert all(b.startswith(b"220") for b in second), second


def test_noop_drip_cannot_hold_a_session_for_ever(maild_factory, smtp_sink_factory):
    """A client sending NOOPs just before each idle timeout must not hold its session for
    ever: after a junk-command limit (Postfix: smtpd_junk_command_limit) the session ends
    with 421 (HARD-13: there was no limit)."""
    sink = smtp_sink_factory(dump=False)
    m = maild_factory(front_policy(sink.port))

    async def run() -> list[bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", m.port, local_addr=("127.0.7.1", 0))
        got = [await read_reply(r)]
        w.write(b"EHLO drip.example\r\n")
        got.append(await read_reply(r))
        for _ in range(300):
            w.write(b"NOOP\r\n")
            try:
                got.append(await read_reply(r))
            except ConnectionError:
                break
        w.close()
        return got

    got = asyncio.run(run())
    assert any(x.startswith(b"421") for x in got), got[-3:]
