"""SMTP on a raw socket for the TLS, AUTH and PROXY tests: whole replies, a session from a
chosen loopback address, and one upgraded with STARTTLS."""

from __future__ import annotations

import socket
import ssl
from typing import BinaryIO

from tests.integration.conftest import STRANGER


def reply(f: BinaryIO) -> bytes:
    """One whole (possibly multi-line) reply; what is left when the server closes."""
    out = b""
    while True:
        line = f.readline()
        out += line
        if not line or line[3:4] != b"-":
            return out


def session(port: int, source: str = STRANGER) -> tuple[socket.socket, BinaryIO]:
    """A connection from `source` with the banner read: (socket, its reader)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    f = s.makefile("rb")
    assert reply(f).startswith(b"220 ")
    return s, f


def client_context() -> ssl.SSLContext:
    """A client that takes the tests' self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def starttls(port: int, source: str = STRANGER) -> tuple[ssl.SSLSocket, BinaryIO, bytes]:
    """EHLO, STARTTLS, EHLO again: (TLS socket, its reader, the EHLO reply inside TLS)."""
    s, f = session(port, source)
    s.sendall(b"EHLO client.example\r\n")
    assert b"STARTTLS" in reply(f)
    s.sendall(b"STARTTLS\r\n")
    assert reply(f).startswith(b"220 ")
    t = client_context().wrap_socket(s, server_hostname="mx.hosted.example")
    tf = t.makefile("rb")
    t.sendall(b"EHLO client.example\r\n")
    ehlo = reply(tf)
    assert ehlo.startswith(b"250-")
    return t, tf, ehlo
