"""aiosmtpd's SMTP.__init__ without its per-connection introspection.

aiosmtpd's SMTP.__init__ finds the command methods, handler hooks and AUTH mechanisms
with inspect.getmembers() and dir() on every connection (330 us, more than the whole
policy pipeline once the rules are fast). They depend only on the classes, so
FastInit._fast_init looks them up once per (protocol class, handler class) and otherwise
sets exactly what SMTP.__init__ sets for maild's arguments (no TLS, no AUTH, no PROXY
protocol; the junk-command call limits). tests/smtp/test_server_init.py compares the
result with aiosmtpd's own constructor, so an aiosmtpd upgrade that changes __init__
fails a test instead of a connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar

import aiosmtpd.smtp as _aiosmtpd
from aiosmtpd.smtp import SMTP

if TYPE_CHECKING:
    from maild.config import Limits as ServerLimits

# aiosmtpd versions whose SMTP.__init__ FastInit mirrors (tests/smtp/test_server_init.py)
SUPPORTED = _aiosmtpd.__version__.startswith("1.4.")

# Postfix's smtpd_junk_command_limit: a client may not hold a session for ever with NOOPs
# (or RSETs, VRFYs, HELPs) sent just before each idle timeout.
JUNK_COMMAND_LIMITS = {
    "NOOP": 100,
    "RSET": 100,
    "VRFY": 20,
    "EXPN": 20,
    "HELP": 20,
    "EHLO": 20,
    "HELO": 20,
    "XFORWARD": 100,
    "*": 100_000,
}


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_sanitized_log = _aiosmtpd.sanitized_log


def sanitized_log(func: Callable[..., None], msg: AnyStr, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, called with its logger's debug or info twice for every
    command line, masks AUTH credentials in its arguments (a regular expression, 4 us)
    before the logger drops the record: here only when the logger would write it."""
    logger = getattr(func, "__self__", None)
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


if SUPPORTED:
    _aiosmtpd.sanitized_log = sanitized_log  # the name _handle_client looks up


class FastInit(SMTP):
    """Mixed into maild's SMTP subclass; _fast_init replaces SMTP.__init__ when SUPPORTED."""

    line_length_limit: int

    _names: ClassVar[dict[tuple[type, type], tuple[Any, ...]]] = {}

    def _introspect(self, handler: Any) -> tuple[Any, ...]:
        key = (type(self), type(handler))
        names = self._names.get(key)
        if names is None:
            import inspect

            auth = tuple(
                (
                    getattr(
                        mfunc,
                        "__auth_mechanism_name__",
                        mname.replace("auth_", "").replace("__", "-"),
                    ),
                    mname,
                    obj is self,
                )
                for obj in (self, handler)
                for mname, mfunc in inspect.getmembers(obj)
                if mname.startswith("auth_")
            )
            hooks = tuple(
                (m.replace("handle_", ""), m) for m in dir(handler) if m.startswith("handle_")
            )
            ehlo = getattr(handler, "handle_EHLO", None)
            ver = (
                None
                if ehlo is None
                else {4: "old", 5: "new"}.get(len(inspect.signature(ehlo).parameters))
            )
            if ehlo is not None and ver != "new":
                raise RuntimeError("maild's fast SMTP init needs the 5-argument handle_EHLO")
            methods = tuple((m.replace("smtp_", ""), m) for m in dir(self) if m.startswith("smtp_"))
            names = self._names[key] = (auth, hooks, ver, methods)
        return names

    def _fast_init(self, handler: Any, limits: ServerLimits, hostname: str) -> None:
        """SMTP.__init__(handler, data_size_limit=..., enable_SMTPUTF8=True,
        decode_data=False, hostname=..., ident="ESMTP maild", timeout=...,
        command_call_limit=JUNK_COMMAND_LIMITS) without the per-connection introspection."""
        self.__ident__ = "ESMTP maild"
        # make_loop() finds the running loop too, under warnings.catch_warnings (4 us)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = _aiosmtpd.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = limits.message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits.clear()
        self.hostname = hostname or socket.getfqdn()
        self.tls_context = None
        self.require_starttls = None
        self._timeout_duration = limits.command_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = _aiosmtpd.login_always_fail
        self._authenticator = None
        self._auth_required = False
        auth, hooks, ver, methods = self._introspect(handler)
        self._auth_methods = {
            mech: _aiosmtpd._AuthMechAttr(getattr(self if is_self else handler, mname), is_self)
            for mech, mname, is_self in auth
        }
        self._handle_hooks = {k: getattr(handler, m) for k, m in hooks}
        self._ehlo_hook_ver = ver
        self._smtp_methods = {k: getattr(self, m) for k, m in methods}
        # command_call_limit=JUNK_COMMAND_LIMITS, as SMTP.__init__ sets it up for a dict
        self._enforce_call_limit = True
        self._call_limit_base = JUNK_COMMAND_LIMITS
        self._call_limit_default = JUNK_COMMAND_LIMITS.get("*", _aiosmtpd.CALL_LIMIT_DEFAULT)
