"""One worker: SMTP sessions on the shared listening socket, policy state asked of the
supervisor (maild.workers.shared).

A worker is forked by the fork server, already unprivileged, with the listening socket
and its end of its channel. It asks the supervisor for the running policy ("hello"),
opens its own connection to the state store (decision rows, consent ledger writes,
opt-in standings) and its own downstream pool, and serves. It has no status file, no
signals of its own to answer (the supervisor forwards reloads and stops over the
channel; a SIGTERM sent to it directly is a graceful stop too), no scheduled jobs and
no web face. When the channel closes (the supervisor died) it stops accepting, lets its
sessions finish and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from maild import config as cfg
from maild import gcpolicy
from maild.daemon import Daemon, _downstream_settings
from maild.daemonctl import SIG_CONTROL
from maild.smtp.front import Front
from maild.smtp.tls import TLSConfigError
from maild.store.base import StoreError
from maild.store.core import heartbeat
from maild.wiring import Wiring
from maild.workers.ipc import Channel
from maild.workers.shared import (
    RemoteCampaigns,
    RemoteLimiter,
    RemoteListKeys,
    WorkerOptin,
    WorkerSanctions,
    ask,
    tell,
)
from maild.workers.shares import limits_share, pool_share

log = logging.getLogger("maild")

STATS_EVERY = 1.0  # seconds between the reports `maild status` reads
ACCEPT_BATCH = 16  # connections a worker accepts per wake-up of a listening socket
ACCEPT_RETRY = 1.0  # seconds without accepting after EMFILE and the like (asyncio's delay)


class Acceptor:
    """Accepts up to ACCEPT_BATCH connections per wake-up of the shared listening socket.

    asyncio's own server accepts up to its backlog (1,024 here) at each wake-up, so with
    several processes on one socket the first to wake would take a whole burst. One at a
    time was too few: under a stranger's connection flood the queue in the kernel filled
    with the crowd's reconnections faster than one a loop iteration drained it, and a
    customer's connection waited seconds in it for its 220 (bench.hostile, workers = 2).
    A small batch drains the queue while the other workers, woken as well, take their
    share of it.
    """

    def __init__(self, sock: socket.socket, factory: Any) -> None:
        self.sock = sock
        self.factory = factory
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task] = set()
        self.loop.add_reader(sock.fileno(), self._accept)
        self.open = True

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # the queue is empty (another worker took the rest)
            except OSError as e:
                if e.errno == errno.EINVAL:  # shut down (stop_listening): the host stops
                    self.close()
                    return
                # EMFILE and the like: the connection stays queued, so the socket stays
                # readable; pause as asyncio's own server does, not a busy loop of errors
                log.error(
                    "error: accept: %s; accepting again in %g s", e.strerror or e, ACCEPT_RETRY
                )
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_RETRY, self._resume)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._connect(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _resume(self) -> None:
        if self.open:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()  # the client left before it was set up

    def close(self) -> None:
        """Stop accepting; the sessions accepted go on (the socket stays the host's)."""
        if self.open:
            self.open = False
            self.loop.remove_reader(self.sock.fileno())


def stop_listening(listen: socket.socket, tls_socks: Sequence[tuple[str, socket.socket]]) -> None:
    """Shut the shared listening sockets down in every process that holds them: the
    kernel refuses new connections (the client tries the next MX) and resets those
    queued, rather than queueing them for workers that will not accept again, and a
    maild started again can bind the port while the sessions in flight finish."""
    for sock in (listen, *(sock for _kind, sock in tls_socks)):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)


def view(c: cfg.Config, index: int, workers: int) -> cfg.Config:
    """The policy as worker index runs it: the host's limits replaced by its share."""
    s = c.server
    return replace(
        c,
        server=replace(
            s,
            limits=limits_share(s.limits, index, workers),
            downstream_pool=pool_share(s.downstream_pool, index, workers),
        ),
    )


class Worker(Daemon):
    def __init__(
        self,
        wiring: Wiring,
        channel_sock: socket.socket,
        listen: socket.socket,
        index: int,
        *,
        front: Front,
        tls_socks: Sequence[tuple[str, socket.socket]] = (),
    ) -> None:
        self.index = index
        self.listen_sock = listen
        self.tls_socks = tls_socks
        # The supervisor's, read while it was root: the TLS context and the Dovecot
        # client; a failed login another worker saw is counted even before "hello".
        self.front = front
        self._stop_asked = False  # "stop" may come before the Daemon state exists
        self.channel = Channel(channel_sock, self._handle, name=f"worker {index}")
        self._wiring = wiring
        self.sanctions: WorkerSanctions | None = None  # type: ignore[assignment]
        self._pending_blocked: dict | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, SIG_CONTROL):  # the supervisor's to answer
            loop.add_signal_handler(sig, lambda: None)
        await self.channel.start()
        hello = await self.channel.call("hello", self.index, os.getpid())
        config, self.workers, grace = hello
        Daemon.__init__(
            self, view(config, self.index, self.workers), self._wiring, shutdown_grace=grace
        )
        if self._stop_asked:
            self.stop_event.set()
        # a failed login here is told to the others
        self.front.failures.on_failure = partial(tell, self.channel, "auth_failed")
        self.channel.on_close.append(self._supervisor_gone)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.start()
        await self.stop_event.wait()
        await self.stop()

    async def start(self) -> None:
        c = self.config
        self._configure_services(c)
        # The supervisor ran the migrations and checked the file at its start.
        self.store = await self.wiring.open_store(c.server.state, c.path, migrate=False)
        await self._start_pipeline(c)
        await self._start_antispam()
        from maild.web.settings import section

        if section(c).enabled:
            self.services.web = RemoteListKeys(self.channel)
        self._set_blocked(await ask(self.channel, "ready"))
        self.listening, self.started_with = c.server.listen, c.server
        self.server = Acceptor(self.listen_sock, self._protocol)  # type: ignore[assignment]
        tls = [Acceptor(sock, partial(self._protocol, kind)) for kind, sock in self.tls_socks]
        self.tls_servers = tls  # type: ignore[assignment]
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        gcpolicy.settle()
        tell(self.channel, "listening", os.getpid())
        log.info("worker %d started: pid=%d", self.index, os.getpid())

    async def _start_antispam(self) -> None:
        self.limiter = RemoteLimiter(self.channel)  # type: ignore[assignment]
        self.campaigns = RemoteCampaigns(self.channel)  # type: ignore[assignment]
        sanctions = WorkerSanctions(self.store, lambda: self.config)
        sanctions.channel = self.channel
        await sanctions.load()
        self.sanctions = sanctions
        if self._pending_blocked is not None:
            self._set_blocked(self._pending_blocked)
        optin = WorkerOptin(self.config, self.store, self.downstream, sanctions=sanctions)
        optin.channel = self.channel
        self.optin = optin
        await optin.start()
        self.services.limiter = self.limiter
        self.services.campaigns = self.campaigns
        self.services.sanctions, self.services.optin = sanctions, optin

    def _set_blocked(self, blocked: dict) -> None:
        if self.sanctions is None:
            self._pending_blocked = blocked
        else:
            self.sanctions.blocked = dict(blocked)

    def _supervisor_gone(self) -> None:
        """The channel closed. If the supervisor went away (killed), nobody stops the
        host's listeners for us: shut them down, finish the sessions, exit."""
        if self.channel.peer_closed:
            stop_listening(self.listen_sock, self.tls_socks)
            log.error(
                "error: worker %d (pid %d): the supervisor is gone; listeners shut down, "
                "sessions in flight %d finish (their mail tempfailed), then the worker exits",
                self.index,
                os.getpid(),
                self.counter.total,
            )
        self.stop_event.set()

    # ------------------------------------------------------------------ the channel

    def _handle(self, kind: str, args: tuple) -> Any:
        if kind == "blocked":
            self._set_blocked(args[0])
            return True
        if kind == "control":
            if self.sanctions is not None:
                for k, arg in args[0]:
                    for fn in self.sanctions.on_control:
                        fn(k, arg)
            return True
        if kind == "config":
            return self._apply_from_supervisor(args[0])
        if kind == "stop":
            self._stop_asked = True
            if hasattr(self, "stop_event"):
                self.stop_event.set()
            return True
        if kind == "auth_failed":  # in another worker: counted here too
            self.front.failures.record(*args)
            return True
        raise ValueError(f"unknown request {kind!r}")

    async def _apply_from_supervisor(self, new: cfg.Config) -> list[str]:
        """The supervisor read and checked the file once; apply its result here."""
        new = view(new, self.index, self.workers)
        old = self.config
        await self._switch(new)
        with contextlib.suppress(TLSConfigError):  # the supervisor logged it
            self.front.reload(new.server)
        self.optin.config = new
        applied = []
        if _downstream_settings(new) != _downstream_settings(old):
            await self._replace_downstream(new)
            applied.append("downstream")
        gcpolicy.settle()
        return applied

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "started": self.proxy.started,
            "written": time.time(),
            "sessions": self.counter.total,
            "stats": dict(self.proxy.stats),
            "decided": dict(self.proxy.decided),
            "decisions_pending": len(self.decisions.pending),
            "limits": self.limits_status(),
            "accepting": getattr(self.server, "open", False),
        }

    async def _housekeep(self) -> None:
        """Every second: a report for the supervisor's status file; the memory budget
        settled; a heartbeat write when nothing else wrote (the store's health)."""
        health = self.store.health
        tick = 0
        while True:
            await asyncio.sleep(STATS_EVERY)
            tick += 1
            tell(self.channel, "stats", self.stats())  # none once the supervisor is gone
            if tick % 2:
                continue
            self.budget.settle()
            try:
                if not health.ok or time.monotonic() - health.last_write >= 2:
                    await heartbeat(self.store)
            except StoreError as e:
                if health.ok:
                    log.error("error: state store: %s", e)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for server in self.tls_servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace
        while self.counter.total > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        self._housekeeping.cancel()
        await self.customers.stop()
        await self.optin.stop()
        await self.downstream.close()
        await self.decisions.stop()
        await self.store.close()
        if not self.channel.closed:  # the last counts, for the supervisor's totals
            tell(self.channel, "stats", self.stats())
        await self.channel.close()
        log.info("worker %d stopped: pid=%d", self.index, os.getpid())


def main(
    wiring: Wiring,
    index: int,
    channel_sock: socket.socket,
    listen: socket.socket,
    *,
    front: Front,
    tls_socks: Sequence[tuple[str, socket.socket]] = (),
) -> int:
    """The forked worker's life; its exit status for the supervisor's log."""
    try:
        worker = Worker(wiring, channel_sock, listen, index, front=front, tls_socks=tls_socks)
        asyncio.run(worker.run())
    except StoreError as e:
        log.error("error: worker %d: %s", index, e)
        return 1
    except Exception:
        log.exception("worker %d failed", index)
        return 70
    return 0
