"""Logging: syslog facility mail, ident maild, one Postfix-like line per decision.

A decision line reads, for example:

    maild[812]: 4F2A9C01B7: reject: RCPT from host[192.0.2.7]: 554 5.7.1 <x@y>: Relay
    access denied; customer=- from=<a@b> to=<x@y> rule=relay

so that operators grep it as they grep Postfix's. Values are stripped of control
characters and never include message bodies or secrets.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
from typing import TextIO

_CTRL = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: str) -> str:
    """Bytes that are not UTF-8 (kept as lone surrogates by surrogateescape) as \\xNN.

    An 8-bit address is legal on the wire; as a lone surrogate it cannot be written to
    syslog, a file or the state store (each encodes UTF-8 strictly).
    """
    if value.isascii():
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def clean(value: object, limit: int = 200) -> str:
    """A log-safe rendering: no control characters (no forged log lines), bounded length."""
    s = _CTRL.sub("?", printable(str(value)))
    return s if len(s) <= limit else s[: limit - 3] + "..."


class _Formatter(logging.Formatter):
    """Every line UTF-8-encodable, whatever a message's arguments held."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _Syslog(logging.handlers.SysLogHandler):
    """SysLogHandler that writes 'maild[PID]: message', as syslog(3) would; the PID of
    the process that logs (a worker forked from the supervisor has its own)."""

    def __init__(self, address: str):
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)

    @property
    def ident(self) -> str:
        return f"maild[{os.getpid()}]: "

    @ident.setter
    def ident(self, value: str) -> None:
        pass


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by tests)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def setup(
    target: str = "syslog", level: int = logging.INFO, *, quiet: bool = False
) -> logging.Logger:
    """Send the 'maild' logger to syslog (/dev/log), stderr, or a file path.

    'syslog' falls back to stderr (with a warning) where there is no /dev/log, as in a
    container without a syslog daemon, so that nothing is lost silently.
    """
    logger = logging.getLogger("maild")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(level)
    logger.propagate = False
    handler: logging.Handler
    fallback = None
    if target == "syslog":
        # SysLogHandler connects lazily and swallows the error (Python 3.11), so look first.
        if not _is_socket("/dev/log"):
            handler = _Stderr()
            fallback = "syslog unavailable (no /dev/log); logging to stderr"
        else:
            handler = _Syslog("/dev/log")
            handler.setFormatter(_Formatter("%(message)s"))
    elif target == "stderr":
        handler = _Stderr()
    else:
        handler = logging.FileHandler(target)
    if not isinstance(handler, _Syslog):
        handler.setFormatter(
            _Formatter(
                f"%(asctime)s {socket.gethostname()} maild[%(process)d]: %(message)s",
                datefmt="%b %d %H:%M:%S",
            )
        )
    logger.addHandler(handler)
    if fallback and not quiet:
        logger.warning("warning: %s", fallback)
    return logger


decisions = logging.getLogger("maild.smtp")


def decision_line(
    session: str, action: str, stage: str, client_label: str, reply: str, fields: dict[str, str]
) -> str:
    """'SESSION: ACTION: STAGE from CLIENT: REPLY; k=v k=v' (Postfix's reject line form)."""
    kv = " ".join(f"{k}={clean(v)}" for k, v in fields.items())
    return f"{session}: {action}: {stage} from {clean(client_label)}: {clean(reply, 400)}; {kv}"
