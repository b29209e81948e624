"""maild.log: lines that syslog, a file and the state store can always take."""

from __future__ import annotations

import logging

from maild import log as mlog


def test_printable_shows_non_utf8_bytes_as_escapes() -> None:
    eight_bit = b"\xff@outside.example".decode("utf-8", "surrogateescape")
    assert mlog.printable(eight_bit) == "\\xff@outside.example"
    assert mlog.printable("jörg@example.de") == "jörg@example.de"  # real UTF-8 is kept
    assert mlog.printable("\ud800x") == "\\ud800x"  # a surrogate no decoder made
    assert mlog.printable("plain") == "plain"


def test_clean_strips_controls_and_surrogates_and_bounds_length() -> None:
    out = mlog.clean(b"a\r\nb\xfe".decode("utf-8", "surrogateescape") + "x" * 300, 50)
    assert out.startswith("a??b\\xfe") and len(out) == 50 and out.endswith("...")
    out.encode("utf-8")  # never raises


def test_a_log_line_with_an_8bit_argument_is_written(tmp_path) -> None:
    target = tmp_path / "maild.log"
    logger = mlog.setup(str(target))
    try:
        logging.getLogger("maild.smtp").warning(
            "refused %s", b"<\xff@outside.example>".decode("utf-8", "surrogateescape")
        )
        for h in logger.handlers:
            h.flush()
        assert "refused <\\xff@outside.example>" in target.read_text("utf-8")
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
