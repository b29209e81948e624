"""aiosmtpd's per-command log calls: credentials still masked, no work when dropped.

Why: aiosmtpd's _handle_client calls sanitized_log twice per command line, and it ran
its AUTH-masking regular expression even when the logger then dropped the record.
"""

from __future__ import annotations

import logging

import aiosmtpd.smtp as aiosmtpd_smtp
import pytest

import maild.smtp.server  # noqa: F401  (installs maild.smtp.compat)


def test_an_auth_line_is_masked_when_it_is_logged(caplog):
    caplog.set_level(logging.DEBUG, "mail.log")
    aiosmtpd_smtp.sanitized_log(
        aiosmtpd_smtp.log.info, "%r >> %r", ("192.0.2.1", 25), b"AUTH PLAIN c2VjcmV0\r\n"
    )
    (record,) = [r for r in caplog.records if r.name == "mail.log"]
    assert "c2VjcmV0" not in record.getMessage()
    assert "********" in record.getMessage()


@pytest.mark.parametrize(("level", "sanitized"), [(logging.WARNING, 0), (logging.DEBUG, 1)])
def test_arguments_are_sanitized_only_for_a_record_the_logger_writes(monkeypatch, level, sanitized):
    calls = []

    def spy(text: bytes) -> bytes:
        calls.append(text)
        return text

    monkeypatch.setattr(aiosmtpd_smtp, "sanitize", spy)
    logger = logging.getLogger("mail.log")
    monkeypatch.setattr(logger, "level", level)
    logger.manager._clear_cache()
    try:
        aiosmtpd_smtp.sanitized_log(aiosmtpd_smtp.log.debug, "readline: %r", b"NOOP\r\n")
    finally:
        logger.manager._clear_cache()
    assert len(calls) == sanitized
