"""The consent pages: subscribe, confirm, one-click unsubscribe.

Rules every handler keeps:

* a GET changes nothing (link scanners such as Office 365 Safe Links fetch every URL in
  a message); state changes only on POST, after the subscriber pressed a button;
* every POST that changes consent is recorded with the raw HTTP request (request line,
  headers as received, body; tokens replaced by their hash) through the same ledger
  append the CLI uses (maild.optin.actions, Ledger.append): one chain, never a fork;
* nothing of the ledger is readable: a subscribe POST answers alike whether the address
  was new, pending or subscribed already; pages show only what the link itself names;
* redirects: none (every answer is a page of its own), so none can be open.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from maild.log import clean
from maild.optin import actions
from maild.optin.model import GONE, iso
from maild.web import keys, pages
from maild.web.guard import client_of

if TYPE_CHECKING:
    from maild.web.app import WebService

log = logging.getLogger("maild.web")

ONE_CLICK_FIELD, ONE_CLICK_VALUE = "List-Unsubscribe", "One-Click"


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def problem(title: str, message: str, status: int) -> web.Response:
    return html(pages.problem(title, message), status)


async def raw_request(request: web.Request, secrets: dict[str, str] | None = None) -> bytes:
    """The request as received: request line, headers, body; secrets replaced by markers."""
    v = request.version
    head = [f"{request.method} {request.raw_path} HTTP/{v.major}.{v.minor}"]
    head += [f"{k.decode('latin-1')}: {val.decode('latin-1')}" for k, val in request.raw_headers]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + await request.read()
    for secret, marker in (secrets or {}).items():
        data = data.replace(secret.encode("utf-8"), marker.encode("ascii"))
    return data


def http_detail(request: web.Request, client: str, path: str) -> dict[str, Any]:
    """What the event's detail says about the request (the raw bytes hold the rest)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {"http": {"method": request.method, "path": path, "host": request.host[:255],
                     "client_ip": client, "peer": peer[0] if peer else "",
                     "forwarded_for": ", ".join(request.headers.getall("X-Forwarded-For", []))[:500],
                     "received": iso(time.time())}}


class Consent:
    """The handlers, bound to the daemon's web service (its config, ledger, keys)."""

    def __init__(self, svc: WebService):
        self.web = svc

    @property
    def optin(self) -> Any:
        return self.web.daemon.optin

    def _list(self, list_id: str) -> Any:
        lst = self.optin.registry().get(list_id) if self.optin is not None else None
        return lst

    # ------------------------------------------------------------- one-click

    async def _unsubscribe_target(self, request: web.Request) -> tuple[Any, str] | None:
        m = request.match_info
        lst = self._list(m["list"])
        address = keys.decode_address(m["address"])
        if lst is None or address is None:
            return None
        key = await self.web.list_key(lst.id)
        if not keys.valid(key, lst.id, address, m["mac"]):
            return None
        return lst, address

    def _bad_link(self, page: str) -> web.Response:
        self.web.count(page, "bad-link")
        return problem("Link not valid", "This unsubscribe link is not valid. Use the link "
                       "in the most recent message from the list, or write to its owner.", 404)

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        """GET: a page with a button; never revokes."""
        target = await self._unsubscribe_target(request)
        if target is None:
            return self._bad_link("unsubscribe-page")
        lst, address = target
        self.web.count("unsubscribe-page", "shown")
        return html(pages.render(pages.UNSUBSCRIBE_FORM, f"Unsubscribe from {lst.cfg.name}",
                                 address=address, name=lst.cfg.name, list_id=lst.id,
                                 action=request.path))

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """POST with List-Unsubscribe=One-Click (RFC 8058): revoke at once."""
        target = await self._unsubscribe_target(request)
        if target is None:
            return self._bad_link("unsubscribe")
        lst, address = target
        form = await request.post()
        if form.get(ONE_CLICK_FIELD) != ONE_CLICK_VALUE:
            self.web.count("unsubscribe", "no-one-click")
            return problem("Nothing changed", "This request did not say "
                           f"{ONE_CLICK_FIELD}={ONE_CLICK_VALUE} (RFC 8058), so nothing was "
                           "changed. Use the button on the unsubscribe page.", 400)
        client = client_of(request, self.web.settings)
        before = self.optin.standing(lst.id, address)
        if before.state in GONE:
            outcome = "already-gone"
        else:
            evidence = await raw_request(request)
            res = await actions.revoke(  # the CLI's own path: one chain
                self.optin.ledger, self.web.daemon.config, self.optin.downstream, lst.cfg,
                address, channel="one-click", actor="maild-web", ip=client,
                user_agent=request.headers.get("User-Agent", ""), evidence=evidence,
                detail=http_detail(request, client, request.path))
            await self.optin.refresh()  # the very next message to the address is refused
            outcome = f"revoked (was {res.before.state})"
        self.web.count("unsubscribe", outcome.split(" ")[0])
        log.info("web: one-click list=%s address=%s result=%s client=%s", lst.id,
                 clean(address), outcome, clean(client))
        return html(pages.render(pages.UNSUBSCRIBED, f"Unsubscribed from {lst.cfg.name}",
                                 address=address, name=lst.cfg.name))

    def routes(self, app: web.Application, base: str) -> None:
        path = f"{base}/unsubscribe/{{list}}/{{address}}/{{mac}}"
        app.router.add_get(path, self.unsubscribe_page)
        app.router.add_post(path, self.unsubscribe)
