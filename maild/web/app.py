"""maild's HTTP listener ([web]): aiohttp in the daemon's own event loop.

aiohttp because it is asyncio-native (the pages call the same ledger, downstream and
store objects the SMTP side uses, in the same loop, with no thread or second process),
well kept, and its web server and test client are one package. TLS is the reverse
proxy's job (docs/operations.md). aiohttp's access log is off: URLs here carry
confirmation tokens and one-click capabilities, which never go to a log; each request
that decides something logs one line of its own instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from maild.store.base import StoreError
from maild.web import guard, keys, metrics
from maild.web.consent import Consent, problem
from maild.web.listener import CappedSite
from maild.web.settings import WebConfig, section

log = logging.getLogger("maild.web")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


@web.middleware
async def _headers(request: web.Request, handler: Any) -> web.StreamResponse:
    """Security headers on every answer; a store failure is a 503 (try again), a bug a 500
    page, never a traceback; either way nothing was recorded half."""
    try:
        resp = await handler(request)
    except web.HTTPException as e:  # 404, 405, 408, 413: aiohttp wants them raised
        for k, v in SECURITY_HEADERS.items():
            e.headers.setdefault(k, v)
        raise
    except StoreError as e:
        log.error("web: %s %s: state store: %s", request.method, _where(request), e)
        resp = problem(
            "Try again later",
            "A temporary problem kept us from doing this; "
            "nothing was changed. Please try again in a few minutes.",
            503,
        )
        resp.headers["Retry-After"] = "300"
    except Exception:
        log.exception("web: %s %s failed", request.method, _where(request))
        resp = problem("Error", "Something went wrong on our side; nothing was changed.", 500)
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    return resp


def _where(request: web.Request) -> str:
    """The route, not the path: paths carry tokens and one-click MACs."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "-"


class WebService:
    """The [web] listener (and the optional separate /metrics listener) of one daemon."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.runners: list[web.AppRunner] = []
        self.keys: dict[str, bytes] = {}  # web_keys rows, by name; never logged
        self.limiter = guard.Limiter()

    @property
    def settings(self) -> WebConfig:
        return section(self.daemon.config)

    @property
    def base_path(self) -> str:
        """base_url's path: where the reverse proxy sends maild's pages, unchanged."""
        return urlsplit(self.settings.base_url).path.rstrip("/")

    def count(self, page: str, outcome: str) -> None:
        self.outcomes[(page, outcome)] += 1

    async def key(self, name: str) -> bytes:
        k = self.keys.get(name)
        if k is None:
            k = self.keys[name] = await keys.key(self.daemon.store, name)
        return k

    async def list_key(self, list_id: str) -> bytes:
        return await self.key(keys.list_key_name(list_id))

    def app(self, *, pages: bool, with_metrics: bool) -> web.Application:
        app = web.Application(middlewares=[_headers], client_max_size=64 * 1024)
        if with_metrics:
            app.router.add_get("/metrics", self.metrics)
        if pages:
            Consent(self).routes(app, self.base_path)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        body = await metrics.exposition(self.daemon, self)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def _serve(self, app: web.Application, where: tuple[str, int], what: str) -> None:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=guard.CLIENT_SECONDS
        )
        await runner.setup()
        host, port = where
        try:
            w = self.settings
            await CappedSite(
                runner,
                host or None,
                port,
                max_connections=w.max_connections,
                max_per_ip=w.max_connections_per_ip,
                trusted=w.trusted_proxies,
            ).start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(
                e.errno,
                f"{e.strerror or e} ([web] {what} = {host}:{port}; maild "
                "binds it after dropping root: a port above 1023)",
            ) from None
        self.runners.append(runner)

    async def start(self) -> None:
        w = self.settings
        # Keys before the first message: the require_one_click rule then reads memory only
        # (a list registered later gets its key at its first message, from the store).
        await self.key("csrf")
        optin = getattr(self.daemon, "optin", None)
        for list_id in optin.registry().lists if optin is not None else ():
            await self.list_key(list_id)
        separate = w.metrics_listen if w.metrics else None  # metrics on a listener of their own
        await self._serve(
            self.app(pages=True, with_metrics=w.metrics and separate is None), w.listen, "listen"
        )
        if separate is not None:
            await self._serve(self.app(pages=False, with_metrics=True), separate, "metrics_listen")
        log.info(
            "web: listening on %s:%d base_url=%s metrics=%s",
            *w.listen,
            w.base_url,
            "off"
            if not w.metrics
            else ("{}:{}".format(*separate) if separate is not None else "on the web listener"),
        )

    async def stop(self) -> None:
        for r in self.runners:
            await r.cleanup()
        self.runners = []
