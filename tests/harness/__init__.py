"""Real-Postfix integration test harness for maild.

Everything here drives real programs (Postfix, smtp-sink, swaks, smtp-source,
Dovecot for SASL) on loopback ports; nothing is mocked.  Modules:

* ``ports``   free_port()
* ``postfix`` Postfix (private instance: front / before-queue layouts), DovecotAuth
* ``sink``    SmtpSink (Debian's smtp-sink as a downstream that accepts or refuses)
* ``clients`` swaks(), raw_smtp(), smtp_source()

The prerequisite helpers live here so tests and conftest share one definition.
"""

from __future__ import annotations

import os

import pytest

from .postfix import find_binary


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure (never a silent skip)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: integration prerequisites must be present)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Path of ``name`` (also looked up in /usr/sbin); skip/fail the test when missing."""
    path = find_binary(name)
    if path is None:
        skip_or_fail(f"{name} not installed")
        raise AssertionError("unreachable")  # skip/fail raise
    return path


def require_root() -> None:
    """Private Postfix instances (master, chown, smtp-sink -u) need root."""
    if os.geteuid() != 0:
        skip_or_fail("integration tests need root (private Postfix instances)")
