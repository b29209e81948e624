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

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from maild.address import mailbox
from maild.antispam.sanctions import control
from maild.log import clean
from maild.optin import actions
from maild.optin.actions import ActionError, log_event
from maild.optin.model import GONE, Kind, iso
from maild.optin.settings import section as optin_section
from maild.optin.tokens import short, token_hash
from maild.store.base import StoreError
from maild.web import guard, keys, pages
from maild.web.guard import client_of

if TYPE_CHECKING:
    from maild.web.app import WebService

log = logging.getLogger("maild.web")

ONE_CLICK_FIELD, ONE_CLICK_VALUE = "List-Unsubscribe", "One-Click"


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def problem(title: str, message: str, status: int) -> web.Response:
    return html(pages.problem(title, message), status)


def _redacted(name: str, value: str) -> str:
    """A header's value as evidence keeps it: cookies keep their names and HTTP
    credentials their scheme, never a value (the browser sends the host's other cookies,
    a webmail session among them, and the ledger and its bundles outlive them all)."""
    n = name.lower()
    if n == "cookie":
        return "; ".join(
            f"{c.split('=', 1)[0].strip()}=REDACTED" for c in value.split(";") if c.strip()
        )
    if n in ("authorization", "proxy-authorization"):
        return f"{value.strip().split(' ', 1)[0]} REDACTED"
    return value


async def raw_request(request: web.Request, secrets: dict[str, str] | None = None) -> bytes:
    """The request as received: request line, headers, body; credentials and secrets
    replaced by markers."""
    v = request.version
    head = [f"{request.method} {request.raw_path} HTTP/{v.major}.{v.minor}"]
    for k, val in request.raw_headers:
        name = k.decode("latin-1")
        head.append(f"{name}: {_redacted(name, val.decode('latin-1'))}")
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + await request.read()
    for secret, marker in (secrets or {}).items():
        data = data.replace(secret.encode("utf-8"), marker.encode("ascii"))
    return data


def hidden_capability(request: web.Request, marker: str) -> tuple[dict[str, str], str]:
    """The path's last segment is a capability (a confirmation token, a one-click MAC) that
    evidence must not hand on: the secrets for raw_request (the segment as routed and as
    the client sent it, %-escapes and all) and the path to record, both with `marker`."""
    head, routed = request.path.rsplit("/", 1)
    sent = request.raw_path.split("?", 1)[0].rsplit("/", 1)[-1]
    return {sent: marker, routed: marker}, f"{head}/{marker}"


def http_detail(request: web.Request, client: str, path: str) -> dict[str, Any]:
    """What the event's detail says about the request (the raw bytes hold the rest)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {
        "http": {
            "method": request.method,
            "path": path,
            "host": request.host[:255],
            "client_ip": client,
            "peer": peer[0] if peer else "",
            "forwarded_for": ", ".join(request.headers.getall("X-Forwarded-For", []))[:500],
            "received": iso(time.time()),
        }
    }


class Consent:
    """The handlers, bound to the daemon's web service (its config, ledger, keys)."""

    def __init__(self, svc: WebService):
        self.web = svc

    @property
    def optin(self) -> Any:
        return self.web.daemon.optin

    def _list(self, list_id: str) -> Any:
        """A registered list, while [optin] is enabled (else nothing may be recorded)."""
        if self.optin is None or not optin_section(self.web.daemon.config).enabled:
            return None
        return self.optin.registry().get(list_id)

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
        return problem(
            "Link not valid",
            "This unsubscribe link is not valid. Use the link "
            "in the most recent message from the list, or write to its owner.",
            404,
        )

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        """GET: a page with a button; never revokes."""
        target = await self._unsubscribe_target(request)
        if target is None:
            return self._bad_link("unsubscribe-page")
        lst, address = target
        self.web.count("unsubscribe-page", "shown")
        return html(
            pages.render(
                pages.UNSUBSCRIBE_FORM,
                f"Unsubscribe from {lst.cfg.name}",
                address=address,
                name=lst.cfg.name,
                list_id=lst.id,
                action=request.path,
            )
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """POST with List-Unsubscribe=One-Click (RFC 8058): revoke at once."""
        target = await self._unsubscribe_target(request)
        if target is None:
            return self._bad_link("unsubscribe")
        lst, address = target
        form = await guard.read_form(request)
        if form.get(ONE_CLICK_FIELD) != ONE_CLICK_VALUE:
            self.web.count("unsubscribe", "no-one-click")
            return problem(
                "Nothing changed",
                "This request did not say "
                f"{ONE_CLICK_FIELD}={ONE_CLICK_VALUE} (RFC 8058), so nothing was "
                "changed. Use the button on the unsubscribe page.",
                400,
            )
        client = client_of(request, self.web.settings)
        before = self.optin.standing(lst.id, address)
        if before.state in GONE:
            outcome = "already-gone"
        else:
            hide, path = hidden_capability(request, "MAC-REDACTED")
            res = await actions.revoke(  # the CLI's own path: one chain
                self.optin.ledger,
                self.web.daemon.config,
                self.optin.downstream,
                lst.cfg,
                address,
                channel="one-click",
                actor="maild-web",
                ip=client,
                user_agent=request.headers.get("User-Agent", ""),
                evidence=await raw_request(request, hide),
                detail=http_detail(request, client, path),
            )
            await self.optin.refresh()  # the very next message to the address is refused
            outcome = f"revoked (was {res.before.state})"
        self.web.count("unsubscribe", outcome.split(" ")[0])
        log.info(
            "web: one-click list=%s address=%s result=%s client=%s",
            lst.id,
            clean(address),
            outcome,
            clean(client),
        )
        return html(
            pages.render(
                pages.UNSUBSCRIBED,
                f"Unsubscribed from {lst.cfg.name}",
                address=address,
                name=lst.cfg.name,
            )
        )

    # ------------------------------------------------------------- forms

    async def _form(
        self, request: web.Request, template: str, title: str, **values: object
    ) -> web.Response:
        """A form page with its CSRF pair: the cookie (kept if the browser has one) and the
        field signed for this path."""
        nonce = request.cookies.get(guard.CSRF_COOKIE, "")
        if not (16 <= len(nonce) <= 64 and nonce.replace("-", "").replace("_", "").isalnum()):
            nonce = guard.new_nonce()
        token = guard.csrf_token(await self.web.key("csrf"), nonce, request.path)
        resp = html(pages.render(template, title, action=request.path, csrf=token, **values))
        resp.set_cookie(
            guard.CSRF_COOKIE,
            nonce,
            httponly=True,
            samesite="Strict",
            secure=self.web.settings.base_url.startswith("https:"),
            path=self.web.base_path or "/",
        )
        return resp

    async def _guarded(self, request: web.Request, page: str) -> tuple[Any, str] | web.Response:
        """A form POST's (fields, client), or the refusal: bad CSRF pair, over the limit."""
        form = await guard.read_form(request)
        csrf = form.get("csrf")
        if not guard.csrf_ok(
            await self.web.key("csrf"),
            request.cookies.get(guard.CSRF_COOKIE),
            request.path,
            csrf if isinstance(csrf, str) else None,
        ):
            self.web.count(page, "csrf")
            return problem(
                "Form expired",
                "This form has expired or did not come from this "
                "site. Go back, reload the page and try again.",
                403,
            )
        w = self.web.settings
        client = client_of(request, w)
        if not self.web.limiter.allow(
            f"client:{guard.client_key(client)}", w.client_limit, w.limit_window
        ):
            return self._busy(page, client)
        return form, client

    def _busy(self, page: str, client: str) -> web.Response:
        self.web.count(page, "rate-limited")
        log.warning("web: %s refused: rate limit client=%s", page, clean(client))
        resp = problem("Too many requests", "Too many requests; please try again later.", 429)
        resp.headers["Retry-After"] = str(int(self.web.settings.limit_window))
        return resp

    # ------------------------------------------------------------- subscribe

    async def subscribe_page(self, request: web.Request) -> web.Response:
        lst = self._list(request.match_info["list"])
        if lst is None:
            return self._no_list("subscribe-page")
        self.web.count("subscribe-page", "shown")
        c = lst.cfg
        return await self._form(
            request,
            pages.SUBSCRIBE_FORM,
            f"Subscribe to {c.name}",
            name=c.name,
            list_id=c.id,
            owner=c.owner,
            consent=c.consent_text,
        )

    def _no_list(self, page: str) -> web.Response:
        self.web.count(page, "no-list")
        return problem("No such list", "There is no mailing list at this address.", 404)

    async def subscribe(self, request: web.Request) -> web.Response:
        """POST: a `request` event with the raw request, and the confirmation mail."""
        lst = self._list(request.match_info["list"])
        if lst is None:
            return self._no_list("subscribe")
        got = await self._guarded(request, "subscribe")
        if isinstance(got, web.Response):
            return got
        form, client = got
        raw_address = form.get("address")
        try:
            address = actions.check_address(raw_address if isinstance(raw_address, str) else "")
        except ActionError:
            self.web.count("subscribe", "bad-address")
            return problem(
                "Not an email address",
                f"{str(raw_address or '')[:200]!s} is not "
                "an email address such as bob@example.org. Go back and correct it.",
                400,
            )
        w = self.web.settings
        if not self.web.limiter.allow(
            f"address:{mailbox(address)}", w.address_limit, w.limit_window
        ):
            return self._busy("subscribe", client)
        # Recorded and sent after the answer: how long that takes (a ledger write and a
        # mail, or neither for an address subscribed already) must not tell who is.
        self.optin.spawn(
            self._request(
                lst.cfg,
                address,
                client,
                request.headers.get("User-Agent", ""),
                await raw_request(request),
                http_detail(request, client, request.path),
            )
        )
        return html(
            pages.render(
                pages.SUBSCRIBE_SENT,
                f"Subscribe to {lst.cfg.name}",
                address=address,
                name=lst.cfg.name,
            )
        )

    async def _request(
        self,
        lst: Any,
        address: str,
        client: str,
        user_agent: str,
        evidence: bytes,
        detail: dict[str, Any],
    ) -> None:
        """The subscribe POST's work, after its answer; each outcome is one log line."""

        def logged(level: int, result: str, reason: str) -> str:
            log.log(
                level,
                'web: subscribe list=%s address=%s result=%s client=%s reason="%s"',
                lst.id,
                clean(address),
                result,
                clean(client),
                clean(reason),
            )
            return result

        try:
            res = await actions.request(  # the CLI's own path: one chain
                self.optin.ledger,
                self.web.daemon.config,
                self.optin.downstream,
                lst,
                address,
                channel="web",
                actor="maild-web",
                ip=client,
                user_agent=user_agent,
                evidence=evidence,
                detail=detail,
            )
            await self.optin.refresh()
            outcome = "requested" if res.sent or self.optin.downstream is None else "not-sent"
        except ActionError as e:
            outcome = logged(logging.WARNING, "refused", str(e))
        except StoreError as e:
            outcome = logged(logging.ERROR, "not-recorded", f"state store: {e}")
        except asyncio.CancelledError:
            logged(logging.ERROR, "not-recorded", "maild stopped")
            raise
        except Exception as e:
            log.exception("web: subscribe list=%s failed", lst.id)
            outcome = logged(logging.ERROR, "not-recorded", f"internal error: {e}")
        self.web.count("subscribe", outcome)

    # ------------------------------------------------------------- confirm

    async def _token(self, request: web.Request) -> tuple[Any, Any, str] | web.Response:
        """(token, list, token hash) of a confirmation link still good, else the page."""
        token = request.match_info["token"].strip().lower()
        th = token_hash(token)
        t = await self.optin.find_token(th) if 20 <= len(token) <= 64 else None
        lst = self._list(t.list_id) if t is not None else None
        if t is None or lst is None:
            return problem(
                "Link not valid",
                "This confirmation link is not valid. Ask the "
                "list again for a new confirmation message.",
                404,
            )
        if t.used:
            return html(
                pages.render(
                    pages.CONFIRMED,
                    f"Subscribed to {lst.cfg.name}",
                    address=t.address,
                    name=lst.cfg.name,
                )
            )
        if t.expires < self.optin.clock():
            return problem(
                "Link expired",
                f"This confirmation link expired on "
                f"{iso(t.expires)[:16].replace('T', ' ')} UTC. Ask the list again "
                "for a new confirmation message.",
                410,
            )
        return t, lst, th

    async def confirm_page(self, request: web.Request) -> web.Response:
        """GET: the button only; a link scanner's fetch confirms nobody."""
        got = await self._token(request)
        if isinstance(got, web.Response):
            self.web.count("confirm-page", f"status-{got.status}")
            return got
        t, lst, _ = got
        self.web.count("confirm-page", "shown")
        consent = await self.optin.ledger.consent_text(t.consent_hash) or lst.cfg.consent_text
        return await self._form(
            request,
            pages.CONFIRM_FORM,
            f"Confirm: {lst.cfg.name}",
            address=t.address,
            name=lst.cfg.name,
            list_id=lst.id,
            consent=consent,
        )

    async def confirm(self, request: web.Request) -> web.Response:
        """POST: the subscriber's confirmation, with the raw request (token redacted)."""
        guarded = await self._guarded(request, "confirm")
        if isinstance(guarded, web.Response):
            return guarded
        _, client = guarded
        got = await self._token(request)
        if isinstance(got, web.Response):
            self.web.count("confirm", f"status-{got.status}")
            return got
        t, lst, th = got
        t.used = True  # before any await: a reply arriving meanwhile adds nothing
        hide, path = hidden_capability(request, f"TOKEN-SHA256-{th[:32]}")
        try:
            ev = await self.optin.ledger.append(
                list_id=t.list_id,
                address=t.address,
                kind=Kind.CONFIRM,
                channel="web",
                actor="maild-web",
                ip=client,
                user_agent=request.headers.get("User-Agent", ""),
                consent_hash=t.consent_hash or lst.cfg.consent_hash,
                token_hash=th,
                raw=await raw_request(request, hide),
                detail={
                    **http_detail(request, client, path),
                    "request_seq": t.request_seq,
                    "confirmation_message_id": t.message_id,
                },
            )
        except StoreError:
            t.used = False
            raise
        await control(self.optin.store, "optin", t.list_id)
        log_event(ev)
        await self.optin.refresh()
        self.web.count("confirm", "confirmed")
        log.info(
            "web: confirm list=%s address=%s token_hash=%s client=%s",
            t.list_id,
            clean(t.address),
            short(th),
            clean(client),
        )
        return html(
            pages.render(
                pages.CONFIRMED,
                f"Subscribed to {lst.cfg.name}",
                address=t.address,
                name=lst.cfg.name,
            )
        )

    def routes(self, app: web.Application, base: str) -> None:
        path = f"{base}/unsubscribe/{{list}}/{{address}}/{{mac}}"
        app.router.add_get(path, self.unsubscribe_page)
        app.router.add_post(path, self.unsubscribe)
        app.router.add_get(f"{base}/subscribe/{{list}}", self.subscribe_page)
        app.router.add_post(f"{base}/subscribe/{{list}}", self.subscribe)
        app.router.add_get(f"{base}/confirm/{{token}}", self.confirm_page)
        app.router.add_post(f"{base}/confirm/{{token}}", self.confirm)
