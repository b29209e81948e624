"""Coverage-guided fuzz target for atheris (libFuzzer), also driven by hypothesis.

Run by tests/fuzz/test_atheris.py as a subprocess (a finding ends the process, and
libFuzzer's -timeout/-rss_limit_mb turn hangs and memory blow-ups into findings):

    python tests/fuzz/atheris_target.py -runs=N -seed=1 -max_total_time=S CORPUS_DIR

The first input byte picks the target; the rest is its input:

0  MAIL/RCPT argument parsing as MaildSMTP does it (path, parameters, the reply on refusal)
1  policies.toml: UTF-8 -> TOML -> config.parse
2  message content: header parsing, address fields, X-Maild-* stripping, header folding
3  XFORWARD xtext encoding and decoding

Each target states what must hold; anything else raised is a finding.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

try:
    import atheris
except ImportError:  # the hypothesis fallback imports this module too
    atheris = None


def _imports() -> None:
    global PathError, canonical, eight_bit, parse_params, parse_path, split_arg, cfg, Message
    global strip_own_headers, header_line, xtext, _xtext_decode, SMTP, MaildSMTP, components
    from aiosmtpd.smtp import SMTP

    from maild import components
    from maild import config as cfg
    from maild.address import (
        PathError,
        canonical,
        eight_bit,
        parse_params,
        parse_path,
        split_arg,
    )
    from maild.policy.context import Message
    from maild.smtp.own_headers import header_line, strip_own_headers
    from maild.smtp.server import MaildSMTP
    from maild.smtp.xforward import xtext
    from maild.smtp.xforward import xtext_decode as _xtext_decode

    # Parse the shipped policy once, with every component's section, instrumented.
    shipped = Path(__file__).resolve().parents[2] / "policies.toml"
    components.parse(tomllib.loads(shipped.read_text()), str(shipped))


if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["maild"]):
        _imports()
else:
    _imports()

BAD_BYTES = re.compile(rb"\x00|\r(?!\n)|(?<!\r)\n")
REFUSAL = re.compile(r"^5\d\d 5\.\d{1,3}\.\d{1,3} \S")


class _Parser:
    """Just enough of a MaildSMTP session for MaildSMTP._parse."""

    data_size_limit = 10_000_000
    session = SimpleNamespace(extended_smtp=True)
    _strip_command_keyword = SMTP._strip_command_keyword
    _parse = MaildSMTP._parse


_PARSER = _Parser()


def smtp_argument(data: bytes) -> None:
    arg = data.decode("utf-8", "surrogateescape")
    # as aiosmtpd decodes an argument: eight_bit() must agree with a strict decoder
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert eight_bit(arg) == (None if data.isascii() else "utf-8" if valid else "malformed")
    for keyword, allowed in (
        ("FROM:", {"BODY", "SIZE", "SMTPUTF8", "RET", "ENVID"}),
        ("TO:", {"NOTIFY", "ORCPT"}),
    ):
        out = _PARSER._parse(keyword, arg, allowed)
        if isinstance(out, str):
            assert REFUSAL.match(out), out
            assert "\r" not in out and "\n" not in out, out
            out.encode("utf-8")  # what aiosmtpd's push() does with it
        else:
            address, params = out
            # `MAIL FROM:` with nothing after it parses as the null path (raw ""); Postfix
            # refuses it downstream (501 5.5.4), and that reply is passed back.
            assert (address.raw or address.is_null) and all(" " not in p for p in params)
    try:
        a = parse_path(split_arg(arg)[0])
    except PathError:
        return
    assert a.is_local_to(frozenset({"hosted.example"})) == (a.destinations() <= {"hosted.example"})
    if a.domain and "@" not in a.local:  # a deliverable mailbox (see test_address_fuzz)
        assert canonical(canonical(a.addr)) == canonical(a.addr)


def policies(data: bytes) -> None:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return
    except RecursionError:
        return  # tomllib's own limit; config.load reports it (test_deeply_nested_file_...)
    try:
        c = components.parse(doc, "fuzz.toml")
    except cfg.ConfigError as e:
        assert e.problems
        return
    assert 0 < c.server.listen[1] < 65536 and 0 < c.server.downstream[1] < 65536


def content(data: bytes) -> None:
    m = Message(data)
    parsed = (m.headers, m.field_counts, m.mailboxes, m.decoded_headers)
    assert all(x is not None for x in parsed)
    if not BAD_BYTES.search(data):  # what maild's DATA reader lets through
        out = strip_own_headers(data)
        head = out.split(b"\r\n\r\n", 1)[0]
        assert not re.search(rb"(?im)^x-maild-[!-9;-~]*[ \t]*:", head), out
    value = data.decode("utf-8", "surrogateescape")
    line = header_line("X-Maild-Verdict", value)
    assert line.endswith(b"\r\n") and b"\r\n" not in line[:-2].replace(b"\r\n\t", b""), line


def xforward(data: bytes) -> None:
    value = data.decode("utf-8", "surrogateescape")
    enc = xtext(value)
    assert enc.isascii() and " " not in enc and "=" not in enc
    assert _xtext_decode(enc) == value.encode("utf-8", "surrogateescape").decode("latin-1")
    _xtext_decode(value)


TARGETS = (smtp_argument, policies, content, xforward)


def one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


SEEDS = [
    b"\x00FROM:<a@outside.example> SIZE=100 BODY=8BITMIME",
    b"\x00TO:<@hosted.example:u%evil.example@hosted.example> NOTIFY=NEVER",
    b'\x00FROM:<"a b"@x.example> RET=HDRS ENVID=x+2By',
    b"\x01" + (Path(__file__).resolve().parents[2] / "policies.toml").read_bytes(),
    b"\x02From: =?utf-8?q?B=C3=B6ss?= <boss@acme.example>\r\nX-Maild-Customer: x\r\n\tmore\r\n"
    b"Subject: hi\r\n\r\nbody\r\n",
    b"\x03NAME=mail.example ADDR=IPV6:2001:db8::1 HELO=\xff",
]


if __name__ == "__main__":
    if atheris is None:
        sys.exit("atheris is not installed")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
