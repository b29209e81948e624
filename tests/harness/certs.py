"""Throw-away TLS certificates for tests, made with the openssl CLI (never a shared key)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import require_binary


def make_cert(directory: Path, cn: str = "mx.hosted.example") -> tuple[Path, Path]:
    """A self-signed RSA certificate for `cn` and its key: (certificate, key) PEM paths."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName=DNS:{cn}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
