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
    out["reader"] = _norm(p._stream_reader)
    return out


async def test_fast_init_matches_aiosmtpd(monkeypatch):
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
    fast = MaildSMTP(handler, settings=settings, counter=counter, trusted=(), **gates)
    monkeypatch.setattr(srv, "SUPPORTED", False)
    slow = MaildSMTP(handler, settings=settings, counter=counter, trusted=(), **gates)
    assert srv.SUPPORTED is False and inspect.isclass(SMTP)
    assert _state(fast) == _state(slow)
