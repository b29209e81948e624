"""Front mode's TLS: the server context from [server.tls], reloaded in place, and how a
session's TLS is named in the Received line.

One SSLContext serves every listener for the daemon's life: a SIGHUP loads the new
certificate into it (after checking it in a scratch context), so sessions in flight keep
the certificate they began with and the next handshake gets the new one; no listener is
closed. Defaults are Python's ssl.create_default_context(SERVER_AUTH) (its cipher list,
server cipher order, no compression) with TLS 1.2 at least.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maild.config import TLS

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """A certificate or key that cannot serve: the message names the file."""


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise TLSConfigError(
            f"[server.tls] {what} = {path!r}: cannot read it: {e.strerror or e}"
        ) from None
    if b"-----BEGIN " not in head:
        raise TLSConfigError(f"[server.tls] {what} = {path!r}: not a PEM file")


def _load(ctx: ssl.SSLContext, tls: TLS) -> None:
    _check_readable("certificate", tls.certificate)
    _check_readable("key", tls.key)
    try:
        ctx.load_cert_chain(tls.certificate, tls.key)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            why = f"does not match the certificate {tls.certificate!r}"
        else:
            why = f"certificate or key not usable: {e.reason or e}"
        raise TLSConfigError(f"[server.tls] key = {tls.key!r}: {why}") from None


def _configure(ctx: ssl.SSLContext, tls: TLS) -> None:
    ctx.minimum_version = _VERSIONS[tls.min_protocol]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION


def build_context(tls: TLS) -> ssl.SSLContext:
    """A server context for [server.tls]; TLSConfigError names the file that is wrong."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_NONE  # no client certificates are asked for
    _configure(ctx, tls)
    _load(ctx, tls)
    return ctx


def reload_context(ctx: ssl.SSLContext, tls: TLS) -> None:
    """Put tls's certificate and settings into the live context, or raise TLSConfigError
    and leave it as it was."""
    build_context(tls)  # the whole check first, on a scratch context
    _configure(ctx, tls)
    ctx.load_cert_chain(tls.certificate, tls.key)


def describe(ssl_object: Any) -> str:
    """Postfix's Received-line text: 'TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)'."""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    if not cipher:
        return ""
    name, _, bits = cipher
    return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"


def certificate_summary(tls: TLS) -> dict[str, str]:
    """Subject and expiry of the configured certificate, for `maild status`."""
    try:
        info = ssl._ssl._test_decode_cert(tls.certificate)  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError, AttributeError):
        return {"certificate": tls.certificate}
    subject = dict(x[0] for x in info.get("subject", ()))
    return {
        "certificate": tls.certificate,
        "subject": subject.get("commonName", ""),
        "not_after": info.get("notAfter", ""),
    }
