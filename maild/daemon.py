"""`maild serve`: the SMTP proxy and the scheduled jobs in one event loop.

Signals: SIGHUP reloads policies.toml (sessions in flight finish under the policy they
started with; a broken file is logged and the running policy kept). A reload also applies
[server] listen (the new socket is bound before the old listener closes) and the
downstream settings (a new pool; connections in use finish their session's transaction on
the old one); `state` and `user` need a restart, and the status file says so. SIGUSR1
applies the state store's control rows (blocks, unblocks, counter resets) at once instead
of at the next 2-second poll. The status file records when each was done, for the CLI
(maild.daemonctl). SIGTERM/SIGINT stop accepting, let sessions in flight finish for up to
`shutdown_grace` seconds, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from maild import config as cfg
from maild import gcpolicy, privs
from maild.customers.directory import Refresher
from maild.daemonctl import SIG_CONTROL, monotonic
from maild.doctor import downstream_verdict
from maild.netaddr import parse_ip
from maild.policy.customer import index as customer_index
from maild.policy.services import Services
from maild.sdnotify import notify
from maild.smtp.admission import Admission
from maild.smtp.budget import Budget
from maild.smtp.downstream import Downstream, DownstreamError, DownstreamRefused
from maild.smtp.front import Front, bind, bind_listeners, listeners_changed
from maild.smtp.gate import Door, Gate
from maild.smtp.proxy import Proxy
from maild.smtp.server import MaildSMTP
from maild.smtp.sessions import SessionCounter
from maild.smtp.tls import TLSConfigError
from maild.store.base import StoreError, is_postgres, resolve_state_path
from maild.store.core import DecisionLog
from maild.web.settings import restart_needed as web_restart_needed
from maild.wiring import Wiring

if TYPE_CHECKING:  # imported where each starts (aiohttp only when [web] is on)
    from apscheduler.job import Job
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from maild.retention.scheduler import RetentionService
    from maild.web.app import WebService

log = logging.getLogger("maild")


class Daemon:
    def __init__(
        self,
        config: cfg.Config,
        wiring: Wiring,
        *,
        shutdown_grace: float = 30.0,
        allow_root: bool = False,
        init_state: bool = False,
    ):
        self.config = config
        self.started_config = config  # what the listeners were built from
        self.wiring = wiring  # the components: their sections, schemas, preloads
        self.allow_root = allow_root
        self.init_state = init_state
        self.shutdown_grace = shutdown_grace
        self._status_failing = False
        self.stop_event = asyncio.Event()
        self.counter = SessionCounter()
        # Session slots (anvil-like limits, reserved share, stress) and the RAM budget
        # for mail in flight; a reload gives both the new [server.limits].
        self.admission = Admission(config.server.limits)
        self.admission.is_customer = self._is_customer
        self.budget = _budget(config)
        self.server: asyncio.AbstractServer | None = None
        self.retention: RetentionService | None = None
        self.report_job: Job | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.web: WebService | None = None
        self.last_reload: dict | None = None
        self.control_synced = 0.0  # CLOCK_MONOTONIC time at which the last control poll began
        self._control_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._listen_error = ""
        self._probe: asyncio.Task | None = None

    def _protocol(self, listener: str = "smtp") -> Gate | MaildSMTP:
        """Admission control first (maild.smtp.gate); a session only for a connection
        that has a slot. On an implicit-TLS listener, and from a trusted proxy, the
        client is known only after the handshake or the PROXY header: the session asks
        admission control itself then."""
        c = self.proxy.config
        if listener == "implicit":
            return self._session(listener)
        door = Door(
            lambda: self._session(listener),
            self.admission,
            c.server.trusted_upstreams,
            c.server.hostname,
            self.proxy.session_refused,
            c.server.trusted_proxies,
        )
        return Gate(door)

    def _session(self, listener: str = "smtp") -> MaildSMTP:
        c = self.proxy.config
        return MaildSMTP(
            self.proxy,
            settings=c.server,
            counter=self.counter,
            trusted=c.server.trusted_upstreams,
            admission=self.admission,
            budget=self.budget,
            front=self.front,
            listener=listener,
        )

    def _is_customer(self, addr: str) -> bool:
        """A customer network's address: it may use the reserved session slots."""
        return customer_index(self.proxy.config).by_ip(parse_ip(addr)) is not None

    def _configure_services(self, c: cfg.Config) -> None:
        """Module-level services rules use (DNS resolver, ...), set from the config."""
        from maild import dns

        dns.configure(c)

    async def start(self) -> None:
        c = self.config
        self._configure_services(c)
        state_path = resolve_state_path(c.server.state, c.path)
        privs.check_files(c.path, state_path)
        # Bind first (port 25 may need root), then drop root before touching any state.
        lhost, lport = c.server.listen
        loop = asyncio.get_running_loop()
        self.front = Front(c.server)  # the certificate is read while still root
        self.server = await bind("[server] listen", c.server.listen, self._protocol)
        self.tls_servers = await bind_listeners(c.server.tls, self._protocol)
        # What is in effect: a reload may change listen, never state or user.
        self.listening = c.server.listen
        self.started_with = c.server
        self.pid_file = c.server.pid_file
        self._status_paths = {self.status_path}
        self._drop_root(state_path)
        self.store = await self.wiring.open_store(
            c.server.state, c.path, check=True, init=self.init_state
        )
        await self._start_pipeline(c)
        host, port = c.server.downstream
        await self._start_antispam()
        await self._start_web()
        await self.server.start_serving()
        for server in self.tls_servers:
            await server.start_serving()
        await self._start_retention()
        self._start_report()
        self.write_status()
        if c.server.pid_file:
            Path(c.server.pid_file).write_text(f"{os.getpid()}\n")
        log.info(
            "daemon started: version=%s mode=%s listen=%s:%d downstream=%s:%d state=%s "
            "workers=1 (one process)",
            _version(),
            c.server.mode,
            lhost,
            lport,
            host,
            port,
            self.store.path,
        )
        # A missing downstream would otherwise show only as the first message's 451.
        self._probe = loop.create_task(self.check_downstream("start"))

    async def _start_pipeline(self, c: cfg.Config) -> None:
        """What every process that decides on mail has, on its open store: the decision
        log, the downstream pool, the proxy, and its own customer index."""
        self.decisions = DecisionLog(self.store)
        self.decisions.start()
        self.downstream = _downstream(c)
        self.services = Services(sessions=self.counter)
        self.proxy = Proxy(
            c, self.downstream, self.decisions, self.services, health=self.store.health
        )
        # Before serving: each process reads [customer_source] and keeps its own index.
        self.customers = Refresher(c)
        await self.customers.start()

    def _drop_root(self, state_path: str) -> None:
        """After binding, before touching any state: become [server] user."""
        c = self.config
        if os.geteuid() == 0:
            if c.server.user:
                uid, gid = privs.drop(c.server.user, state_path, self.wiring.preloads)
                log.info("privileges: running as user=%s uid=%d gid=%d", c.server.user, uid, gid)
            elif not self.allow_root:
                raise privs.PrivilegeError(
                    'refusing to run as root: set [server] user = "maild" (an unprivileged user), '
                    "or pass --allow-root"
                )

    async def _start_antispam(self) -> None:
        """Rate-limit counters (loaded from the store), campaigns, sanctions."""
        from maild.antispam import notify
        from maild.antispam.campaigns import Campaigns
        from maild.antispam.limiter import Limiter
        from maild.antispam.sanctions import Sanctions

        self.limiter = Limiter()
        n = await self.limiter.load(self.store)
        if getattr(self.store, "dialect", "sqlite") == "postgresql":
            self.limiter.share(self.store)  # one counter per customer across the nodes
        self.campaigns = Campaigns()
        self._configure_campaigns(self.config)

        async def send_notice(customer: str, action: str, reason: str, strikes: int) -> None:
            await notify.send(self.downstream, self.config, customer, action, reason, strikes)

        self.sanctions = Sanctions(self.store, lambda: self.config, send_notice)
        await self.sanctions.load()
        self.sanctions.on_control.append(self._control)
        self.services.limiter, self.services.campaigns, self.services.sanctions = (
            self.limiter,
            self.campaigns,
            self.sanctions,
        )
        from maild.optin.service import OptinService

        self.optin = OptinService(
            self.config, self.store, self.downstream, sanctions=self.sanctions
        )
        await self.optin.start()
        self.services.optin = self.optin
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        log.info("antispam: counters=%d blocked=%d", n, len(self.sanctions.blocked))

    async def _start_web(self) -> None:
        """[web]: the consent pages, one-click unsubscribe and /metrics (maild.web)."""
        from maild.web.settings import section

        if section(self.config).enabled:
            from maild.web.app import WebService  # aiohttp: only where [web] is on

            self.web = WebService(self)
            await self.web.start()
            self.services.web = self.web

    @property
    def status_path(self) -> Path:
        """Where the CLI reading the current policies.toml looks for this daemon's status."""
        return Path(resolve_state_path(self.config.server.state, self.config.path)).with_name(
            "maild.status.json"
        )

    async def check_downstream(self, when: str) -> str:
        """Connect and EHLO to the downstream with a short timeout; a problem is logged as
        a warning with doctor's words and fix, and returned. Mail is not held back.
        (3 s per step: the three steps end well within the time `maild reload` waits.)"""
        ds = self.downstream
        probe = Downstream(
            ds.host,
            ds.port,
            local_hostname=ds.local_hostname,
            timeout=min(ds.timeout, 3.0),
            pool_size=0,
        )
        where = f"cannot connect to {ds.host}:{ds.port}: "
        try:
            xforward = await probe.probe()
        except DownstreamRefused as e:
            check = downstream_verdict(ds.host, ds.port, error=str(e).removeprefix(where))
        except DownstreamError as e:
            check = downstream_verdict(
                ds.host, ds.port, error=str(e).removeprefix(where), answered=False
            )
        else:
            check = downstream_verdict(ds.host, ds.port, xforward=bool(xforward))
        if check.level == "OK":
            log.info("downstream: %s", check.message)
            return ""
        text = check.message + (
            ": mail is tempfailed (451 4.4.1) until it answers" if check.level == "FAIL" else ""
        )
        log.warning("warning: downstream at %s: %s; fix: %s", when, text, check.fix)
        return f"{text}; fix: {check.fix}"

    def restart_needed(self) -> list[dict]:
        """[server] settings in the file that are not in effect, each with the reason."""
        file, run = self.config.server, self.started_with
        out = []
        if file.listen != self.listening:
            out.append(
                {
                    "key": "listen",
                    "file": _hostport(file.listen),
                    "running": _hostport(self.listening),
                    "why": self._listen_error,
                }
            )
        if _state_shown(file.state, self.config.path) != self.store.path:
            out.append(
                {
                    "key": "state",
                    "file": _state_shown(file.state, self.config.path),
                    "running": self.store.path,
                    "why": "the state store is opened once, at start",
                }
            )
        if file.user != run.user:
            out.append(
                {
                    "key": "user",
                    "file": file.user,
                    "running": run.user,
                    "why": "root is given up once, at start",
                }
            )
        out += listeners_changed(file.tls, run.tls)
        out += web_restart_needed(self.started_config, self.config)
        if file.workers != run.workers:
            out.append(
                {
                    "key": "workers",
                    "file": str(file.workers),
                    "running": str(run.workers),
                    "why": "the worker processes are started once, at start",
                }
            )
        if file.pid_file != self.pid_file:
            out.append(
                {
                    "key": "pid_file",
                    "file": file.pid_file,
                    "running": self.pid_file,
                    "why": "cannot write it",
                }
            )
        return out

    def status(self) -> dict:
        """What `maild status` shows: a snapshot written every 2 seconds."""
        jobs = []
        sched = getattr(self.retention, "scheduler", None)
        for j in sched.get_jobs() if sched is not None else []:
            nxt = getattr(j, "next_run_time", None)
            jobs.append({"id": j.id, "next_run": nxt.isoformat() if nxt else None})
        if self.report_job is not None and self.report_job.next_run_time:
            jobs.append({"id": "report", "next_run": self.report_job.next_run_time.isoformat()})
        return {
            "pid": os.getpid(),
            "version": _version(),
            "started": self.proxy.started,
            "written": time.time(),
            "mode": self.config.server.mode,
            "listen": _hostport(self.listening),
            "downstream": f"{self.downstream.host}:{self.downstream.port}",
            "state": self.store.path,
            "restart_needed": self.restart_needed(),
            "reload": self.last_reload,
            "control_synced": self.control_synced,
            "sessions": self.counter.total,
            "downstream_in_use": self.downstream.in_use,
            "downstream_idle": len(self.downstream._idle),
            "limits": self.limits_status(),
            "front": self.front.status(),
            "decisions_pending": len(self.decisions.pending),
            "relayed": self.proxy.stats["relayed"],
            "rejected": self.proxy.stats["rejected"],
            "tempfailed": self.proxy.stats["tempfailed"],
            "blocked_customers": sorted(self.sanctions.blocked),
            "jobs": jobs,
            "config": self.config.path,
        }

    def limits_status(self) -> dict:
        """Admission, the RAM budget and the downstream caps, for `maild status`."""
        ds = self.downstream
        return {
            "admission": self.admission.status(),
            "budget": self.budget.status(),
            "downstream": {
                "in_use": ds.in_use,
                "idle": len(ds._idle),
                "max": ds.max_connections,
                "reserved": ds.reserved,
                "strangers_in_use": ds.strangers_in_use,
                "per_client_max": ds.max_per_client,
                "busiest_client": max(ds.per_client.values(), default=0),
                "busy": ds.busy,
            },
        }

    def write_status(self) -> None:
        # Also where the edited file's state would put it: `maild reload` and `maild status`
        # after a change of [server] state still find the daemon that has to be restarted.
        self._status_paths.add(self.status_path)
        text = json.dumps(self.status(), indent=1)
        failed = []
        for path in sorted(self._status_paths):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError as e:
                failed.append(f"{path}: {e}")
        if failed:
            if not self._status_failing:  # once per outage, not every 2 s
                log.error("error: cannot write %s", "; ".join(failed))
            self._status_failing = True
        else:
            if self._status_failing:
                log.info("status file %s written again", self.status_path)
            self._status_failing = False

    def _configure_campaigns(self, c: cfg.Config) -> None:
        from maild.policy.bulk import BulkConfig

        b = c.sections.get("bulk") or BulkConfig()
        self.campaigns.window, self.campaigns.match = b.window, b.match
        self.campaigns.max_campaigns, self.campaigns.max_customers = (
            b.max_campaigns,
            b.max_customers,
        )

    async def poll_control(self) -> None:
        """Apply the control rows the CLI (or another node) wrote; the status file then
        says when this poll began, which is what `maild customer block` waits for."""
        async with self._control_lock:
            began = monotonic()
            await self.sanctions.poll()
            self.control_synced = began
        self.write_status()

    async def _control_now(self) -> None:
        """SIGUSR1: the CLI changed something; do not wait for the next poll."""
        try:
            await self.poll_control()
        except StoreError as e:
            log.error("error: state store: %s", e)

    def _control(self, kind: str, arg: str) -> None:
        if kind == "ratelimit-reset":
            n = self.limiter.reset(arg)
            log.warning("ratelimit: reset key=%s counters=%d", arg, n)

    async def _housekeep(self) -> None:
        """Every 2 s: a heartbeat write unless something else wrote (the store's health
        is judged by writes), apply CLI changes (and other nodes' blocks); every 6 s
        persist counters (shared counters: sync every 2 s); every 60 s: expire."""
        from maild.store.base import StoreError
        from maild.store.core import heartbeat

        tick = 0
        health = self.store.health
        while True:
            await asyncio.sleep(2)
            tick += 1
            self.write_status()
            self.budget.settle()
            try:
                if not health.ok or time.monotonic() - health.last_write >= 2:
                    await heartbeat(self.store)
                await self.poll_control()
                if tick % 3 == 0 or self.limiter.shared is not None:
                    await self.limiter.flush(self.store)
                if tick % 30 == 0:
                    self.limiter.expire()
            except StoreError as e:
                # Void the local rate-limit allowances: until the store answers again,
                # mail that needs a counter is tempfailed, never admitted unchecked.
                self.limiter.healthy = False
                if health.ok:  # a store failure was logged once by health.failed()
                    log.error("error: state store: %s", e)

    def _start_report(self) -> None:
        """The daily report (`[report]`), scheduled with APScheduler in this event loop."""
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.scheduler = AsyncIOScheduler()
        self.scheduler.start()
        self._schedule_report(self.config)

    def _schedule_report(self, c: cfg.Config) -> None:
        from apscheduler.triggers.cron import CronTrigger

        from maild.report import ReportConfig, mail_report

        rc = c.sections.get("report") or ReportConfig()
        if self.report_job is not None:
            self.report_job.remove()
            self.report_job = None
        if not rc.mail:
            return
        hour, minute = rc.at
        assert self.scheduler is not None  # _start_report creates it before its first call
        self.report_job = self.scheduler.add_job(
            mail_report,
            CronTrigger(hour=hour, minute=minute),
            args=[self],
            id="report",
            misfire_grace_time=3600,
            coalesce=True,
        )

    async def _start_retention(self) -> None:
        from maild.retention.scheduler import RetentionService

        self.retention = RetentionService(self.config, self.store)
        await self.retention.start()

    async def reload(self) -> None:
        """SIGHUP: apply a new policy, or keep the running one and say why; READY=1 either
        way. What was done is recorded in the status file for `maild reload`."""
        async with self._reload_lock:
            notify("RELOADING=1")
            result: dict = {"began": monotonic(), "refused": [], "applied": [], "warnings": []}
            try:
                await self._reload(result)
            except Exception as e:  # never a dead reload task and a unit stuck in "reloading"
                log.error("reload failed, keeping the running policy: %s: %s", type(e).__name__, e)
                result["refused"].append(f"{type(e).__name__}: {e}")
            finally:
                self.last_reload = result
                self.write_status()
                gcpolicy.settle()
                notify("READY=1")

    async def _reload(self, result: dict) -> None:
        try:
            new = self.wiring.load(self.config.path)
        except cfg.ConfigError as e:
            for p in e.problems:
                log.error("reload refused, keeping the running policy: %s: %s", e.path, p)
                result["refused"].append(f"{e.path}: {p}")
            return
        await self._apply(new, result)

    async def _apply(self, new: cfg.Config, result: dict) -> None:
        """A new policy that parsed and validated: put it in effect."""
        old = self.config
        await self._switch(new)
        self._configure_campaigns(new)
        self._schedule_report(new)
        if self.retention is not None:
            await self.retention.reload(new)
        log.info(
            "reload: policy reloaded from %s: customers=%d", new.path, len(new.all_customers())
        )
        try:
            self.front.reload(new.server)  # the certificate, for the next handshake
        except TLSConfigError as e:
            log.error("error: reload: %s; the running certificate stays in use", e)
            result["warnings"].append(str(e))
        if new.server.listen != self.listening and await self._listen(new.server.listen):
            result["applied"].append("listen")
        if _downstream_settings(new) != _downstream_settings(old):
            await self._replace_downstream(new)
            result["applied"].append("downstream")
            if warning := await self.check_downstream("reload"):
                result["warnings"].append(warning)
        if new.server.pid_file != self.pid_file:
            self._move_pid_file(new.server.pid_file)
        for r in self.restart_needed():
            log.warning(
                "warning: reload: [%s] %s = %s is not in effect (running: %s): %s; "
                "restart maild to apply it",
                r.get("section", "server"),
                r["key"],
                r["file"] or '""',
                r["running"] or '""',
                r["why"],
            )

    async def _switch(self, new: cfg.Config) -> None:
        """What every process serving SMTP does with a new policy (one process, or each
        worker): the customer index published first, then the services the rules use and
        the config the proxy, admission control and the memory budget read."""
        await self.customers.adopt(new)
        self._configure_services(new)
        self.config = new
        self.proxy.config = new
        lim = new.server.limits
        self.admission.limits = lim
        self.budget.total, self.budget.threshold = lim.memory_in_flight, lim.spool_threshold

    async def _listen(self, addr: tuple[str, int]) -> bool:
        """Bind the new address before closing the old listener: no moment without one,
        and sessions accepted on the old socket go on."""
        host, port = addr
        try:
            server = await asyncio.get_running_loop().create_server(
                self._protocol, host=host or None, port=port, reuse_address=True, backlog=1024
            )
        except OSError as e:
            why = f"cannot bind {host}:{port}: {e.strerror or e}"
            if port < 1024 and os.geteuid() != 0:
                why += " (a port below 1024 needs root, which maild gave up after binding at start)"
            elif port == self.listening[1]:
                why += " (the running listener holds the port)"
            self._listen_error = why
            log.error("error: reload: %s; still listening on %s", why, _hostport(self.listening))
            return False
        old, self.server = self.server, server
        assert old is not None
        old.close()  # stops accepting; the connections it accepted stay open
        log.info(
            "reload: listening on %s instead of %s; sessions in flight continue",
            _hostport(addr),
            _hostport(self.listening),
        )
        self.listening, self._listen_error = addr, ""
        return True

    async def _replace_downstream(self, c: cfg.Config) -> None:
        """A new pool for new mail; the old one's connections end with their sessions."""
        old, self.downstream = self.downstream, _downstream(c)
        self.proxy.downstream = self.optin.downstream = self.downstream
        await old.retire()
        log.info(
            "reload: downstream %s:%d instead of %s:%d; transactions in flight finish on "
            "the old one",
            self.downstream.host,
            self.downstream.port,
            old.host,
            old.port,
        )

    def _move_pid_file(self, path: str) -> None:
        try:
            if path:
                Path(path).write_text(f"{os.getpid()}\n")
        except OSError as e:
            log.error("error: reload: cannot write pid_file %s: %s", path, e.strerror)
            return
        if self.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)
        self.pid_file = path

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self.server is not None:
            self.server.close()
        for server in getattr(self, "tls_servers", ()):
            server.close()
        if self.web is not None:
            await self.web.stop()
        if self._probe is not None:
            self._probe.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace
        while self.counter.total > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.retention is not None:
            await self.retention.stop()
        await self.customers.stop()
        self._housekeeping.cancel()
        await self.sanctions.drain()
        try:
            await self.limiter.flush(self.store)
        except Exception as e:  # noqa: BLE001  a failed final flush loses at most 5 s of counts
            log.error("error: cannot persist rate-limit counters at stop: %s", e)
        await self.optin.stop()
        await self.downstream.close()
        await self.decisions.stop()
        await self.store.close()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        for path in self._status_paths | {self.status_path}:
            with contextlib.suppress(OSError):
                path.unlink()
        if self.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.pid_file)
        log.info("daemon stopped")

    def ready_status(self) -> str:
        """systemd's STATUS= line at READY."""
        return "one process (workers = 1)"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Before start: the CLI may find the daemon (pid_file, process table) before it is
        # ready, and the default action of SIGHUP and SIGUSR1 is to terminate.
        ready = asyncio.Event()

        def when_ready(job: Callable[[], Awaitable[None]]) -> None:
            async def go() -> None:
                await ready.wait()
                await job()

            loop.create_task(go())

        loop.add_signal_handler(signal.SIGHUP, when_ready, self.reload)
        loop.add_signal_handler(SIG_CONTROL, when_ready, self._control_now)
        try:
            await self.start()
        except BaseException:
            # The store's worker thread would keep a process that failed to start alive,
            # listening on nothing, instead of exiting for systemd to see and restart.
            store = getattr(self, "store", None)
            if store is not None:
                with contextlib.suppress(Exception):
                    await store.close()
            raise
        ready.set()
        gcpolicy.settle()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self.ready_status()}")
        await self.stop_event.wait()
        await self.stop()


def _downstream(c: cfg.Config) -> Downstream:
    host, port = c.server.downstream
    lim = c.server.limits
    return Downstream(
        host,
        port,
        local_hostname=c.server.hostname,
        timeout=c.server.downstream_timeout,
        pool_size=c.server.downstream_pool,
        max_connections=lim.downstream_connections,
        max_per_client=lim.downstream_connections_per_client,
        reserved=lim.downstream_reserved,
        greeting_timeout=lim.downstream_greeting_timeout,
    )


def _downstream_settings(c: cfg.Config) -> tuple:
    s, lim = c.server, c.server.limits
    return (
        s.downstream,
        s.hostname,
        s.downstream_timeout,
        s.downstream_pool,
        lim.downstream_connections,
        lim.downstream_connections_per_client,
        lim.downstream_reserved,
        lim.downstream_greeting_timeout,
    )


def _budget(c: cfg.Config) -> Budget:
    """The spool files go to the state directory (maild's own, 0700 in the packaging);
    with PostgreSQL state, to the system's temporary directory."""
    import tempfile

    state = c.server.state
    spool = (
        tempfile.gettempdir()
        if is_postgres(state)
        else os.path.dirname(resolve_state_path(state, c.path))
    )
    lim = c.server.limits
    return Budget(lim.memory_in_flight, lim.spool_threshold, spool)


def _hostport(addr: tuple[str, int]) -> str:
    return "{}:{}".format(*addr)


def _state_shown(state: str, config_path: str) -> str:
    """As the store names itself (store.path): a file's full path, a URL without password."""
    if is_postgres(state):
        from maild.store.postgres import _redact

        return _redact(state)
    return resolve_state_path(state, config_path)


def _version() -> str:
    from maild import __version__

    return __version__
