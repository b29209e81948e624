"""`maild serve`: the SMTP proxy and the scheduled jobs in one event loop.

Signals: SIGHUP reloads policies.toml (sessions in flight finish under the policy they
started with; a broken file is logged and the running policy kept); SIGTERM/SIGINT stop
accepting, let sessions in flight finish for up to `shutdown_grace` seconds, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

from maild import config as cfg
from maild import privs
from maild.sdnotify import notify
from maild.smtp.downstream import Downstream
from maild.smtp.proxy import Proxy
from maild.smtp.server import MaildSMTP, SessionCounter
from maild.store import open_store
from maild.store.base import resolve_state_path
from maild.store.core import DecisionLog

log = logging.getLogger("maild")


class Daemon:
    def __init__(self, config: cfg.Config, *, shutdown_grace: float = 30.0,
                 allow_root: bool = False, init_state: bool = False):
        self.config = config
        self.allow_root = allow_root
        self.init_state = init_state
        self.shutdown_grace = shutdown_grace
        self._status_failing = False
        self.stop_event = asyncio.Event()
        self.counter = SessionCounter()
        self.server: asyncio.AbstractServer | None = None
        self.retention = None
        self.report_job = None
        self.scheduler = None

    def _protocol(self) -> MaildSMTP:
        c = self.proxy.config
        return MaildSMTP(self.proxy, settings=c.server, counter=self.counter,
                         trusted=c.server.trusted_upstreams)

    def _configure_services(self, c: cfg.Config) -> None:
        """Module-level services rules use (DNS resolver, ...), set from the config."""
        try:
            from maild import dns
        except ImportError:
            return
        dns.configure(c)

    async def start(self) -> None:
        c = self.config
        self._configure_services(c)
        state_path = resolve_state_path(c.server.state, c.path)
        privs.check_files(c.path, state_path)
        # Bind first (port 25 may need root), then drop root before touching any state.
        lhost, lport = c.server.listen
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host=lhost or None, port=lport,
                                               reuse_address=True, backlog=1024,
                                               start_serving=False)
        if os.geteuid() == 0:
            if c.server.user:
                uid, gid = privs.drop(c.server.user, state_path)
                log.info("privileges: running as user=%s uid=%d gid=%d", c.server.user, uid, gid)
            elif not self.allow_root:
                raise privs.PrivilegeError(
                    'refusing to run as root: set [server] user = "maild" (an unprivileged user), '
                    "or pass --allow-root")
        self.store = await open_store(c.server.state, c.path, check=True, init=self.init_state)
        self.decisions = DecisionLog(self.store)
        self.decisions.start()
        host, port = c.server.downstream
        self.downstream = Downstream(host, port, local_hostname=c.server.hostname,
                                     timeout=c.server.downstream_timeout,
                                     pool_size=c.server.downstream_pool)
        self.proxy = Proxy(c, self.downstream, self.decisions, health=self.store.health)
        await self._start_antispam()
        await self.server.start_serving()
        await self._start_retention()
        self._start_report()
        self.write_status()
        if c.server.pid_file:
            Path(c.server.pid_file).write_text(f"{os.getpid()}\n")
        log.info("daemon started: version=%s mode=%s listen=%s:%d downstream=%s:%d state=%s",
                 _version(), c.server.mode, lhost, lport, host, port, self.store.path)

    async def _start_antispam(self) -> None:
        """Rate-limit counters (loaded from the store), campaigns, sanctions."""
        from maild import services
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
        services.limiter, services.campaigns, services.sanctions = (
            self.limiter, self.campaigns, self.sanctions)
        services.sessions = self.counter
        from maild.optin.service import OptinService

        self.optin = OptinService(self.config, self.store, self.downstream)
        await self.optin.start()
        services.optin = self.optin
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        log.info("antispam: counters=%d blocked=%d", n, len(self.sanctions.blocked))

    @property
    def status_path(self) -> Path:
        return Path(resolve_state_path(self.config.server.state, self.config.path)
                    ).with_name("maild.status.json")

    def status(self) -> dict:
        """What `maild status` shows: a snapshot written every 2 seconds."""
        jobs = []
        sched = getattr(self.retention, "scheduler", None)
        for j in (sched.get_jobs() if sched is not None else []):
            nxt = getattr(j, "next_run_time", None)
            jobs.append({"id": j.id, "next_run": nxt.isoformat() if nxt else None})
        if self.report_job is not None and self.report_job.next_run_time:
            jobs.append({"id": "report", "next_run": self.report_job.next_run_time.isoformat()})
        return {
            "pid": os.getpid(), "version": _version(), "started": self.proxy.started,
            "written": time.time(), "mode": self.config.server.mode,
            "listen": "{}:{}".format(*self.config.server.listen),
            "downstream": "{}:{}".format(*self.config.server.downstream),
            "sessions": self.counter.total, "downstream_in_use": self.downstream.in_use,
            "downstream_idle": len(self.downstream._idle),
            "decisions_pending": len(self.decisions.pending),
            "relayed": self.proxy.stats["relayed"], "rejected": self.proxy.stats["rejected"],
            "tempfailed": self.proxy.stats["tempfailed"],
            "blocked_customers": sorted(self.sanctions.blocked), "jobs": jobs,
            "config": self.config.path,
        }

    def write_status(self) -> None:
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status(), indent=1))
            os.replace(tmp, self.status_path)
        except OSError as e:
            if not self._status_failing:  # once per outage, not every 2 s
                log.error("error: cannot write %s: %s", self.status_path, e)
            self._status_failing = True
        else:
            if self._status_failing:
                log.info("status file %s written again", self.status_path)
            self._status_failing = False

    def _configure_campaigns(self, c: cfg.Config) -> None:
        from maild.policy.bulk import BulkConfig

        b = c.sections.get("bulk") or BulkConfig()
        self.campaigns.window, self.campaigns.match = b.window, b.match
        self.campaigns.max_campaigns, self.campaigns.max_customers = b.max_campaigns, b.max_customers

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
            try:
                if not health.ok or time.monotonic() - health.last_write >= 2:
                    await heartbeat(self.store)
                await self.sanctions.poll()
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
        self.report_job = self.scheduler.add_job(
            mail_report, CronTrigger(hour=hour, minute=minute), args=[self], id="report",
            misfire_grace_time=3600, coalesce=True)

    async def _start_retention(self) -> None:
        try:
            from maild.retention.scheduler import RetentionService
        except ImportError:
            return
        self.retention = RetentionService(self.config, self.store)
        await self.retention.start()

    async def reload(self) -> None:
        """SIGHUP: apply a new policy, or keep the running one and say why; READY=1 either way."""
        notify("RELOADING=1")
        try:
            await self._reload()
        except Exception as e:  # never a dead reload task and a unit stuck in "reloading"
            log.error("reload failed, keeping the running policy: %s: %s", type(e).__name__, e)
        finally:
            notify("READY=1")

    async def _reload(self) -> None:
        try:
            new = cfg.load(self.config.path)
        except cfg.ConfigError as e:
            for p in e.problems:
                log.error("reload refused, keeping the running policy: %s: %s", e.path, p)
            return
        if new.server.listen != self.config.server.listen or \
                new.server.downstream != self.config.server.downstream or \
                new.server.state != self.config.server.state:
            log.warning("warning: reload: listen, downstream and state changes take effect "
                        "only after a restart")
        self._configure_services(new)
        self._configure_campaigns(new)
        self._schedule_report(new)
        self.config = new
        self.proxy.config = new
        if self.retention is not None:
            await self.retention.reload(new)
        log.info("reload: policy reloaded from %s: customers=%d", new.path, len(new.customers))

    async def stop(self) -> None:
        notify("STOPPING=1")
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace
        while self.counter.total > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.retention is not None:
            await self.retention.stop()
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
        with contextlib.suppress(OSError):
            self.status_path.unlink()
        if self.config.server.pid_file:
            with contextlib.suppress(OSError):
                os.unlink(self.config.server.pid_file)
        log.info("daemon stopped")

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        notify(f"READY=1\nMAINPID={os.getpid()}")
        await self.stop_event.wait()
        await self.stop()


def _version() -> str:
    from maild import __version__

    return __version__


def serve(config: cfg.Config, *, allow_root: bool = False, init_state: bool = False) -> None:
    daemon = Daemon(config, allow_root=allow_root, init_state=init_state)
    try:
        import uvloop  # optional: faster event loop when installed
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(daemon.run())
    else:
        asyncio.run(daemon.run())
