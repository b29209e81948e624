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
from collections.abc import Callable, Iterator, Mapping
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


class _Bound(Mapping[str, Any]):
    """One of aiosmtpd's per-connection tables (command name -> what to call), made from
    names when it is looked at rather than as a dict of bound methods per connection."""

    __slots__ = ("_obj", "_names", "_value")

    def __init__(self, obj: Any, names: dict[str, Any], value: Callable[[Any, Any], Any]):
        self._obj, self._names, self._value = obj, names, value

    def __getitem__(self, key: str) -> Any:
        return self._value(self._obj, self._names[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _auth(obj: Any, entry: tuple[str, bool]) -> Any:
    mname, is_self = entry
    return _aiosmtpd._AuthMechAttr(getattr(obj if is_self else obj.event_handler, mname), is_self)


class _Table:
    """aiosmtpd's _smtp_methods, _handle_hooks or _auth_methods for a FastInit session.

    SMTP.__init__ stores them on every connection: some 30 bound methods of the session
    and of the handler, and three dicts, per session; the session's own bound methods
    make each closed session a reference cycle that waits for a full collection of the
    garbage collector (bench.hostile: hundreds of dead sessions at a time under a crowd,
    the memory peak that CPython's allocator then keeps). A non-data descriptor: where
    SMTP.__init__ ran (an unsupported aiosmtpd), its instance dicts take precedence."""

    def __init__(self, which: int):
        self.which = which

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        names = obj._tables(obj.event_handler)[self.which]
        if self.which == 0:
            return _Bound(obj, names, _auth)
        target = obj if self.which == 2 else obj.event_handler
        return _Bound(target, names, getattr)


def _members(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """inspect.getmembers(obj) for the names starting with prefix (all of them would
    read the _Tables, which ask for these)."""
    for name in dir(obj):
        if name.startswith(prefix):
            try:
                yield name, getattr(obj, name)
            except AttributeError:  # as getmembers skips it
                continue


class FastInit(SMTP):
    """Mixed into maild's SMTP subclass; _fast_init replaces SMTP.__init__ when SUPPORTED."""

    line_length_limit: int

    _names: ClassVar[dict[tuple[type, type], tuple[Any, ...]]] = {}
    _auth_methods = _Table(0)
    _handle_hooks = _Table(1)
    _smtp_methods = _Table(2)

    def _tables(self, handler: Any) -> tuple[Any, ...]:
        """Once per (session class, handler class): the names behind the _Tables (AUTH
        mechanism -> (method name, of the session), hook -> handler method name,
        command -> session method name) and the EHLO hook's version."""
        key = (type(self), type(handler))
        names = self._names.get(key)
        if names is None:
            import inspect

            auth = {
                getattr(
                    mfunc,
                    "__auth_mechanism_name__",
                    mname.replace("auth_", "").replace("__", "-"),
                ): (mname, obj is self)
                for obj in (self, handler)
                for mname, mfunc in _members(obj, "auth_")
            }
            hooks = {m.replace("handle_", ""): m for m in dir(handler) if m.startswith("handle_")}
            ehlo = getattr(handler, "handle_EHLO", None)
            ver = (
                None
                if ehlo is None
                else {4: "old", 5: "new"}.get(len(inspect.signature(ehlo).parameters))
            )
            if ehlo is not None and ver != "new":
                raise RuntimeError("maild's fast SMTP init needs the 5-argument handle_EHLO")
            methods = {m.replace("smtp_", ""): m for m in dir(self) if m.startswith("smtp_")}
            names = self._names[key] = (auth, hooks, methods, ver)
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
        # _auth_methods, _handle_hooks and _smtp_methods: the class's _Tables
        self._ehlo_hook_ver = self._tables(handler)[3]
        # command_call_limit=JUNK_COMMAND_LIMITS, as SMTP.__init__ sets it up for a dict
        self._enforce_call_limit = True
        self._call_limit_base = JUNK_COMMAND_LIMITS
        self._call_limit_default = JUNK_COMMAND_LIMITS.get("*", _aiosmtpd.CALL_LIMIT_DEFAULT)
