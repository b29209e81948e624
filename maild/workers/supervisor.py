"""`maild serve` with `[server] workers = N` (N > 1): the supervisor and its workers.

The supervisor binds the listening socket, gives up root, forks the fork server
(maild.workers.forkserver) and through it N workers that accept on that one socket
(maild.workers.worker). It owns what there is one of per host: the state that must be
exact for all workers (rate-limit counters, campaigns, sanctions; maild.workers.shared),
the scheduled jobs (retention, the daily report), the web face, the status file,
signals and systemd's notifications.

- READY=1 only once every worker listens; STATUS= says how many.
- SIGHUP: the supervisor reads and checks policies.toml once; a broken file leaves every
  worker on the running policy; a good one goes to every worker, each acknowledging.
- SIGUSR1 (the CLI wrote control rows): applied, then the blocked customers pushed to
  every worker and acknowledged, before the status file says it was done, which is
  what `maild customer block` waits for.
- SIGTERM/SIGINT: every worker stops accepting and lets its sessions finish within
  `shutdown_grace`; one still there 10 s later is killed; then the supervisor stops.
- A worker that dies is logged (one line: pid, exit status or signal, when it restarts)
  and forked again; one that dies within 10 s of its start waits twice as long as the
  last time before the next (0.5 s up to 30 s), so a crash loop does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from maild import config as cfg
from maild import privs
from maild.daemon import Daemon, _hostport
from maild.daemonctl import monotonic
from maild.sdnotify import notify
from maild.smtp.front import BindError, Front, tls_listeners
from maild.store.base import resolve_state_path
from maild.wiring import Wiring
from maild.workers import forkserver, worker
from maild.workers.forkserver import ForkServer, describe
from maild.workers.ipc import Channel, ChannelClosed, RemoteError
from maild.workers.shared import StateHost, push_blocked, push_control
from maild.workers.worker import stop_listening

log = logging.getLogger("maild")

QUICK_DEATH = 10.0  # a worker that dies sooner than this after its start backs off
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
KILL_AFTER = 10.0  # seconds past shutdown_grace before a worker still there is killed
START_TIMEOUT = 60.0


@dataclass(eq=False)
class Slot:
    """One worker place: its current process and its history."""

    index: int
    pid: int = 0
    started: float = 0.0  # time.time() of the current process's fork
    state: str = "starting"  # starting, running, restarting, stopped
    restarts: int = 0
    backoff: float = 0.0
    last_exit: str = ""
    channel: Channel | None = None
    host: StateHost | None = None
    # The policy the worker was given (at "hello", or sent since): a worker that was
    # starting during a reload is sent the new one when it listens.
    config: cfg.Config | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # Counts of the processes that ended (the status shows totals since the start).
    retired: dict[str, int] = field(default_factory=dict)

    def live_channel(self) -> Channel | None:
        ch = self.channel
        return ch if ch is not None and not ch.closed else None


def bind(key: str, addr: tuple[str, int]) -> socket.socket:
    """A listening socket the workers share (bound before root is dropped)."""
    try:
        return _bind(addr)
    except OSError as e:
        raise BindError(key, addr, e) from None


def _bind(addr: tuple[str, int]) -> socket.socket:
    host, port = addr
    if not host:
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        return socket.create_server(
            ("", port), family=family, backlog=1024, dualstack_ipv6=family == socket.AF_INET6
        )
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


class Supervisor(Daemon):
    def __init__(
        self,
        config: cfg.Config,
        wiring: Wiring,
        *,
        allow_root: bool = False,
        init_state: bool = False,
        shutdown_grace: float = 30.0,
    ) -> None:
        super().__init__(
            config,
            wiring,
            allow_root=allow_root,
            init_state=init_state,
            shutdown_grace=shutdown_grace,
        )
        self.n = config.server.workers
        self.slots = [Slot(i) for i in range(self.n)]
        self.stopping = False
        self.booting = True
        self._boot_failure = ""
        self._changed: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._forwarded: list[tuple[str, str]] = []
        self._fatal = ""  # why maild stops by itself (exit 1, for systemd to restart it)

    # ------------------------------------------------------------------ start

    def prepare(self) -> None:
        """Before the event loop: bind, give up root, load every module, fork the fork
        server (single-threaded from here on, whatever the supervisor starts later)."""
        c = self.config
        state_path = resolve_state_path(c.server.state, c.path)
        privs.check_files(c.path, state_path)
        self.listen_sock = bind("[server] listen", c.server.listen)
        self.tls_socks = [
            (kind, bind(key, addr)) for kind, key, addr in tls_listeners(c.server.tls)
        ]
        self.front = Front(c.server)  # the key is read while still root; the workers inherit it
        self._drop_root(state_path)
        privs.preload(self.wiring.preloads)
        self.fork_pid, self.fork_sock = forkserver.start(
            self.listen_sock,
            partial(worker.main, self.wiring, front=self.front, tls_socks=self.tls_socks),
        )

    async def start(self) -> None:
        c = self.config
        self._changed = asyncio.Event()
        self._configure_services(c)
        self.listening = c.server.listen
        self.started_with = c.server
        self.pid_file = c.server.pid_file
        self._status_paths = {self.status_path}
        self.store = await self.wiring.open_store(
            c.server.state, c.path, check=True, init=self.init_state
        )
        # its downstream carries the supervisor's own mail: notices, confirmations
        await self._start_pipeline(c)
        await self._start_antispam()
        self.sanctions.on_change.append(self._blocked_changed)
        self.sanctions.on_control.append(self._forward_control)
        await self._start_web()
        self.forks = ForkServer(self.fork_pid, self.fork_sock, self._exited, self._forks_gone)
        self.forks.start()
        for slot in self.slots:
            await self._spawn(slot)
        await self._wait_listening()
        self.booting = False
        await self._start_retention()
        self._start_report()
        self.write_status()
        if c.server.pid_file:
            Path(c.server.pid_file).write_text(f"{os.getpid()}\n")
        host, port = c.server.downstream
        log.info(
            "daemon started: version=%s mode=%s listen=%s downstream=%s:%d state=%s "
            "workers=%d (pids %s)",
            _version(),
            c.server.mode,
            _hostport(c.server.listen),
            host,
            port,
            self.store.path,
            self.n,
            " ".join(str(s.pid) for s in self.slots),
        )
        self._probe = asyncio.get_running_loop().create_task(self.check_downstream("start"))

    async def _wait_listening(self) -> None:
        assert self._changed is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not all(s.state == "running" for s in self.slots):
            if self._boot_failure:
                raise WorkerStartError(self._boot_failure)
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartError(
                    f"workers did not listen within {START_TIMEOUT:g}s: "
                    + ", ".join(f"worker {s.index} {s.state}" for s in self.slots)
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def ready_status(self) -> str:
        pids = ", ".join(str(s.pid) for s in self.slots)
        return f"{self.n} workers listening on {_hostport(self.listening)} (pids {pids})"

    # ------------------------------------------------------------------ the workers

    async def _spawn(self, slot: Slot) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = await self.forks.spawn(slot.index, theirs)
        finally:
            theirs.close()
        slot.pid, slot.started, slot.state, slot.stats = pid, time.time(), "starting", {}
        host = StateHost(
            self.limiter,
            self.campaigns,
            self.sanctions,
            self.optin,
            self.web,
            partial(self._channels, but=slot),
        )
        ch = Channel(mine, partial(self._handle, slot, host), name=f"worker {slot.index}")
        ch.on_close.append(host.release_all)
        ch.on_close.append(partial(self._channel_closed, slot, ch))
        slot.channel, slot.host = ch, host
        await ch.start()

    def _channels(self, but: Slot | None = None) -> list[Channel]:
        """The workers' channels (a starting worker's too: it keeps what it is sent)."""
        return [ch for s in self.slots if s is not but and (ch := s.live_channel()) is not None]

    def _handle(self, slot: Slot, host: StateHost, kind: str, args: tuple) -> Any:
        if kind == "hello":
            slot.config = self.config
            return self.config, self.n, self.shutdown_grace
        if kind == "ready":
            return dict(self.sanctions.blocked)
        if kind == "listening":
            slot.state = "running"
            self._wake()
            if slot.config is not self.config:  # a reload while it was starting
                self._later(self._send_config(slot, self.config, {"applied": [], "warnings": []}))
            return None
        if kind == "auth_failed":  # every other worker counts it too: the host's limit
            for ch in self._channels(but=slot):
                with contextlib.suppress(ChannelClosed):
                    ch.send("auth_failed", *args)
            return None
        if kind == "stats":
            if slot.state in ("starting", "running"):  # not a dead process's last word
                slot.stats = args[0]
                self._aggregate()
            return None
        return host.handle(kind, args)

    def _forks_gone(self) -> None:
        """The fork server died: no worker can be restarted, and no worker's end would be
        heard. Stop (the workers finish their sessions) and exit 1: systemd's Restart=
        starts maild again, whole, rather than a host that loses a worker at every crash."""
        if not self.stopping:
            self._later(self._forks_lost())

    async def _forks_lost(self) -> None:
        why = f"the fork server (pid {self.fork_pid}) {await self.forks.exit_status()}"
        if self.stopping:
            return
        if self.booting:
            self._boot_failure = why
            self._wake()
            return
        self._fatal = f"{why}: workers cannot be restarted; stopping, for a restart"
        log.error("error: %s", self._fatal)
        self.stop_event.set()

    def _channel_closed(self, slot: Slot, ch: Channel) -> None:
        """Without the fork server, a worker's channel closing is all we hear of its end."""
        if self.forks.gone and slot.channel is ch and slot.state != "stopped":
            slot.state, slot.last_exit = "stopped", "its channel closed"
            self._wake()

    async def run(self) -> None:
        await super().run()
        if self._fatal:
            raise WorkerStartError(self._fatal)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _exited(self, pid: int, status: int) -> None:
        slot = next((s for s in self.slots if s.pid == pid), None)
        if slot is None:
            return
        how = describe(status)
        slot.last_exit = how
        for k, v in slot.stats.get("stats", {}).items():
            slot.retired[k] = slot.retired.get(k, 0) + v
        slot.stats = {}
        self._aggregate()
        if self.stopping:
            slot.state = "stopped"
            log.info("worker %d (pid %d) stopped: %s", slot.index, pid, how)
            self._wake()
            return
        if self.booting:
            slot.state = "stopped"
            self._boot_failure = f"worker {slot.index} (pid {pid}) {how} before it listened"
            log.error("error: %s", self._boot_failure)
            self._wake()
            return
        lived = time.time() - slot.started
        slot.backoff = (
            0.0 if lived >= QUICK_DEATH else min(max(slot.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        )
        slot.restarts += 1
        slot.state = "restarting"
        log.warning(
            "warning: worker %d (pid %d) died: %s after %ds; restarting it in %gs (restart %d)",
            slot.index,
            pid,
            how,
            lived,
            slot.backoff,
            slot.restarts,
        )
        self._later(self._restart(slot))

    async def _restart(self, slot: Slot) -> None:
        await asyncio.sleep(slot.backoff)
        if self.stopping:
            slot.state = "stopped"
            return
        try:
            await self._spawn(slot)
            ch = slot.live_channel()
            if self.stopping and ch is not None:  # forked as the stop began: it missed it
                with contextlib.suppress(ChannelClosed):
                    ch.send("stop")
        except (OSError, TimeoutError) as e:
            log.error("error: worker %d: cannot fork: %s; trying again", slot.index, e)
            slot.backoff = min(max(slot.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
            self._later(self._restart(slot))

    def _later(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ sanctions, control

    def _blocked_changed(self) -> None:
        """A strike blocked someone, or the store said so: every worker, now."""
        self._later(push_blocked(self._channels(), self.sanctions.blocked))

    def _forward_control(self, kind: str, arg: str) -> None:
        self._forwarded.append((kind, arg))

    async def poll_control(self) -> None:
        """As in one process, and the workers have what changed (acknowledged) before
        the status file says the poll was done."""
        async with self._control_lock:
            began = monotonic()
            await self.sanctions.poll()
            rows, self._forwarded = self._forwarded, []
            if rows:
                for ch in self._channels():
                    push_control(ch, rows)
                if any(kind == "sanctions" for kind, _ in rows):
                    await push_blocked(self._channels(), self.sanctions.blocked)
            self.control_synced = began
        self.write_status()

    # ------------------------------------------------------------------ reload

    async def _apply(self, new: cfg.Config, result: dict) -> None:
        await super()._apply(new, result)
        # A worker still starting is not ready for it: it is sent the policy when it
        # listens (_handle "listening"); one restarting asks for it at its "hello".
        live = [s for s in self.slots if s.state == "running" and s.live_channel() is not None]
        await asyncio.gather(*(self._send_config(s, new, result) for s in live))
        log.info("reload: applied in %d of %d workers", len(live), self.n)

    async def _send_config(self, slot: Slot, new: cfg.Config, result: dict) -> None:
        ch = slot.live_channel()
        if slot.config is new or ch is None:
            return  # sent already (it listened during the reload), or it is gone
        slot.config = new
        try:
            for what in await ch.call("config", new, timeout=30.0):
                if what not in result["applied"]:
                    result["applied"].append(what)
        except (ChannelClosed, RemoteError, TimeoutError) as e:
            why = f"worker {slot.index} (pid {slot.pid}) did not apply it: {e}"
            log.error("error: reload: %s", why)
            result["warnings"].append(why)

    async def _listen(self, addr: tuple[str, int]) -> bool:
        self._listen_error = (
            "the workers share the socket bound at start (workers = "
            f"{self.n}): restart maild to listen elsewhere"
        )
        return False

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        notify("STOPPING=1")
        self.stopping = True
        for s in self.slots:
            ch = s.live_channel()
            if ch is not None:
                with contextlib.suppress(ChannelClosed):
                    ch.send("stop")
        # new connections refused at once, as one process's closed listener does
        stop_listening(self.listen_sock, self.tls_socks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace + KILL_AFTER
        while any(s.state not in ("stopped", "restarting") for s in self.slots):
            if loop.time() > deadline:
                for s in self.slots:
                    if s.state not in ("stopped", "restarting"):
                        log.error("error: worker %d (pid %d) did not stop: killed", s.index, s.pid)
                        with contextlib.suppress(OSError):
                            os.kill(s.pid, signal.SIGKILL)
                deadline = loop.time() + 5.0
            assert self._changed is not None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        for t in list(self._tasks):
            t.cancel()
        await self.forks.close()
        self.listen_sock.close()
        for _kind, sock in self.tls_socks:
            sock.close()
        await super().stop()

    # ------------------------------------------------------------------ status

    def _aggregate(self) -> None:
        """The workers' counts, summed where the web face and /metrics read them."""
        live = [s.stats for s in self.slots if s.stats]
        for k in self.proxy.stats:
            self.proxy.stats[k] = sum(st["stats"].get(k, 0) for st in live) + sum(
                s.retired.get(k, 0) for s in self.slots
            )
        decided: dict = {}
        for st in live:
            for key, n in st["decided"].items():
                decided[key] = decided.get(key, 0) + n
        self.proxy.decided.clear()
        self.proxy.decided.update(decided)
        self.counter.total = sum(st["sessions"] for st in live)

    def workers_status(self) -> list[dict[str, Any]]:
        out = []
        for s in self.slots:
            st = s.stats
            out.append(
                {
                    "index": s.index,
                    "pid": s.pid,
                    "state": s.state,
                    "started": s.started,
                    "sessions": st.get("sessions", 0),
                    "relayed": st.get("stats", {}).get("relayed", 0),
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
                }
            )
        return out

    def status(self) -> dict:
        st = super().status()
        live = [s.stats for s in self.slots if s.stats]
        st["workers"] = self.workers_status()
        st["workers_setting"] = "auto" if self.config.server.workers_auto else self.n
        st["decisions_pending"] += sum(w["decisions_pending"] for w in live)
        if live:
            st["limits"] = merge([w["limits"] for w in live])
            st["downstream_in_use"] = st["limits"]["downstream"]["in_use"]
            st["downstream_idle"] = st["limits"]["downstream"]["idle"]
        return st


class WorkerStartError(OSError):
    """A worker did not come up, or the fork server died: `maild serve` exits (1, one
    line), for systemd to restart it."""


_MAX_KEYS = frozenset({"busiest_client"})


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' limits_status() as one: counts and shares summed (the shares add up
    to the host's limit), flags true if any worker's is, the busiest client the max."""
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        values = [p.get(key) for p in parts]
        if isinstance(first, dict):
            out[key] = merge([v for v in values if isinstance(v, dict)])
        elif isinstance(first, bool):
            out[key] = any(values)
        elif isinstance(first, int | float):
            nums = [v for v in values if isinstance(v, int | float)]
            out[key] = max(nums) if key in _MAX_KEYS else sum(nums)
        else:
            out[key] = first
    return out


def _version() -> str:
    from maild import __version__

    return __version__
