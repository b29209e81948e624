"""MaildSMTP's fast constructor must build exactly what aiosmtpd's SMTP.__init__ builds.

Why: _fast_init skips aiosmtpd's per-connection introspection (inspect.getmembers, dir)
by mirroring SMTP.__init__; if an aiosmtpd upgrade changes that constructor, this test
fails instead of a connection.
"""

from __future__ import annotations

import asyncio
import inspect
import tempfile
import types
from collections.abc import Callable

from aiosmtpd.smtp import SMTP

from maild.config import Limits, Server
from maild.smtp import server as srv
from maild.smtp.admission import Admission
from maild.smtp.budget import Budget
from maild.smtp.proxy import Proxy
from maild.smtp.server import MaildSMTP
from maild.smtp.sessions import SessionCounter


def _norm(v: object) -> object:
    if isinstance(v, types.MethodType):
        return ("method", v.__func__, type(v.__self__))
    if isinstance(v, asyncio.StreamReader):
        return ("reader", v._limit, v._loop)
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return tuple(_norm(x) for x in v)
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _state(p: MaildSMTP) -> dict[str, object]:
    skip = {"_stream_reader_wr", "_strong_reader", "_closed", "_over_ssl"}
    out = {k: _norm(v) for k, v in vars(p).items() if k not in skip}
    for table in ("_auth_methods", "_handle_hooks", "_smtp_methods"):  # FastInit's _Tables
        out[table] = _norm(dict(getattr(p, table)))
    out["reader"] = _norm(p._stream_reader)
    return out


def _make() -> Callable[[], MaildSMTP]:
    settings = Server(
        hostname="mx.example",
        limits=Limits(message_size=1234, line_length=500, command_timeout=42.0),
    )
    handler = Proxy.__new__(Proxy)
    counter = SessionCounter()
    gates = {
        "admission": Admission(settings.limits),
        "budget": Budget(1 << 20, 1 << 10, tempfile.gettempdir()),
    }
    return lambda: MaildSMTP(handler, settings=settings, counter=counter, trusted=(), **gates)


async def test_fast_init_matches_aiosmtpd(monkeypatch):
    make = _make()
    fast = make()
    monkeypatch.setattr(srv, "SUPPORTED", False)
    slow = make()
    assert srv.SUPPORTED is False and inspect.isclass(SMTP)
    assert _state(fast) == _state(slow)


async def test_a_session_stores_no_bound_methods_of_its_own():
    """aiosmtpd's command, hook and AUTH tables cost some 30 bound methods per connection,
    each a reference from the session to itself (a cycle only the garbage collector
    frees); the fast session looks them up per command instead."""
    make = _make()
    a, b = make(), make()
    assert a._smtp_methods["EHLO"] == a.smtp_EHLO and b._smtp_methods["EHLO"] == b.smtp_EHLO
    assert a._auth_methods["PLAIN"].method == a.auth_PLAIN and "EHLO" in a._handle_hooks
    held = [v for x in vars(a).values() for v in (x.values() if isinstance(x, dict) else (x,))]
    own = [v for v in held if isinstance(v, types.MethodType) and v.__self__ is a]
    # StreamReaderProtocol keeps one: the client-connected callback
    assert own == [a._cb_client_connected]
