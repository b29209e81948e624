"""Hypothesis strategies for hostile SMTP input: paths, parameters, command lines, header
blocks and MIME structures, and policies.toml documents.

They are grammar-shaped on purpose: random bytes rarely get past the first syntax check,
while a path built from source routes, percent hacks, bang paths and quoted local parts
reaches the code that decides where mail goes.
"""

from __future__ import annotations

import datetime as dt

from hypothesis import strategies as st

HOSTED = ("hosted.example", "host.hosted.example")
OUTSIDE = (
    "outside.example",
    "evil.example",
    "[192.0.2.1]",
    "[127.0.0.1]",
    "localhost",
    "hosted.example.evil.example",
    "xn--hosted-example",
    "HOSTED.EXAMPLE.evil.example",
)

_atom_chars = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789!#$&'*+-/=?^_`{|}~."

# --------------------------------------------------------------------------- addresses

atoms = st.text(_atom_chars, min_size=1, max_size=12)
plain_locals = st.text("abcxyzABC0123456789._+-", min_size=1, max_size=12)
hosted_domains = st.sampled_from(HOSTED).flatmap(
    lambda d: st.sampled_from([d, d.upper(), d + ".", d.title()])
)
outside_domains = st.sampled_from(OUTSIDE)
any_domain = st.one_of(hosted_domains, outside_domains)
weird_chars = st.text(
    st.sampled_from(list('"\\<>@%!:,;()[] \t') + ["\x7f", "é", "\udcff"]), max_size=4
)


@st.composite
def hidden_hop_path(draw, hop=outside_domains, final=hosted_domains) -> tuple[str, str]:
    """(path, hidden domain): a path whose final domain is `final` but which also routes
    through `hop` by one of the readings Postfix may apply."""
    local = draw(plain_locals)
    h, f = draw(hop), draw(final)
    form = draw(
        st.sampled_from(
            [
                "route",
                "route2",
                "percent",
                "percent2",
                "bang",
                "bang2",
                "quoted-at",
                "quoted-percent",
                "double-at",
                "quoted-bang",
            ]
        )
    )
    path = {
        "route": f"<@{h}:{local}@{f}>",
        "route2": f"<@{f},@{h}:{local}@{f}>",
        "percent": f"<{local}%{h}@{f}>",
        "percent2": f"<{local}%{f}%{h}@{f}>",
        "bang": f"<{h}!{local}@{f}>",
        "bang2": f"<{f}!{h}!{local}@{f}>",
        "quoted-at": f'<"{local}@{h}"@{f}>',
        "quoted-percent": f'<"{local}%{h}"@{f}>',
        "double-at": f"<{local}@{h}@{f}>",
        "quoted-bang": f'<"{h}!{local}"@{f}>',
    }[form]
    return path, h


@st.composite
def any_path(draw) -> str:
    """Anything a client could put after MAIL FROM: or RCPT TO:, mostly near-valid."""
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        return draw(hidden_hop_path(hop=any_domain, final=any_domain))[0]
    if kind <= 5:
        return f"<{draw(atoms)}@{draw(any_domain)}>"
    if kind == 6:
        return f"<{draw(atoms)}{draw(weird_chars)}{draw(atoms)}@{draw(any_domain)}>"
    if kind == 7:
        return draw(
            st.sampled_from(
                [
                    "<>",
                    "<",
                    ">",
                    "<@>",
                    "<@:>",
                    '<"">',
                    '<"@">',
                    "<postmaster>",
                    "<Postmaster@hosted.example>",
                    "<abuse@HOSTED.example>",
                    '<"\\\\"@hosted.example>',
                    "<@,@:a@b>",
                    "<a@>",
                    "<@a>",
                ]
            )
        )
    if kind == 8:
        return draw(st.text(max_size=40))
    return f"{draw(atoms)}@{draw(any_domain)}"  # no brackets


params = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "SIZE=100",
                "SIZE=99999999999999999999",
                "SIZE=-1",
                "SIZE=",
                "BODY=8BITMIME",
                "BODY=7BIT",
                "BODY=BINARYMIME",
                "SMTPUTF8",
                "SMTPUTF8=yes",
                "RET=FULL",
                "RET=x",
                "ENVID=abc+2Bdef",
                "NOTIFY=NEVER",
                "NOTIFY=SUCCESS,FAILURE",
                "NOTIFY=",
                "ORCPT=rfc822;a@b.example",
                "AUTH=<>",
                "XYZ=1",
                "=",
                "==",
                "SIZE=1 SIZE=2",
            ]
        ),
        st.builds(
            lambda k, v: f"{k}={v}",
            st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1, max_size=8),
            st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00 "), max_size=10),
        ),
    ),
    max_size=4,
).map(" ".join)


def to_bytes(s: str) -> bytes:
    """As a client puts it on the wire: UTF-8, lone surrogates as the raw bytes they stand for."""
    return s.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- SMTP lines

VERBS = [
    b"HELO",
    b"EHLO",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY",
    b"EXPN",
    b"HELP",
    b"XFORWARD",
    b"AUTH",
    b"STARTTLS",
    b"BDAT",
    b"ETRN",
    b"mail from:",
    b"rcpt to:",
    b"Mail From: ",
    b"XCLIENT",
    b"TURN",
    b"\xff\xfe",
]
line_ends = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r\r\n", b"\n\r\n", b" \r\n"])
junk = st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@st.composite
def command_line(draw) -> bytes:
    verb = draw(st.sampled_from(VERBS))
    kind = draw(st.integers(0, 9))
    if verb.upper().startswith((b"MAIL", b"RCPT")) and kind < 7:
        arg = to_bytes(draw(any_path()))
        p = draw(params)
        if p:
            arg += b" " + to_bytes(p)
    elif verb == b"XFORWARD" and kind < 6:
        arg = to_bytes(
            " ".join(
                draw(
                    st.lists(
                        st.sampled_from(
                            [
                                "NAME=a.example",
                                "ADDR=203.0.113.9",
                                "ADDR=IPV6:2001:db8::1",
                                "PORT=25",
                                "HELO=x",
                                "PROTO=ESMTP",
                                "SOURCE=REMOTE",
                                "NAME=+ZZ",
                                "FOO=bar",
                                "ADDR=",
                                "NAME=[UNAVAILABLE]",
                                "ADDR=\udcff",
                                "\udcff=1",
                            ]
                        ),
                        min_size=1,
                        max_size=3,
                    )
                )
            )
        )
    elif kind < 4:
        arg = to_bytes(draw(st.text(max_size=20)))
    elif kind < 6:
        arg = draw(junk)
    elif kind == 6:
        arg = b"a" * draw(st.integers(980, 1100))
    else:
        arg = b""
    sep = b" " if verb[-1:] not in (b":", b" ") and arg else b""
    return verb + sep + arg + draw(line_ends)


# --------------------------------------------------------------------------- messages

FIELDS = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Sender",
    "Reply-To",
    "Received",
    "Return-Path",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "X-Maild-Customer",
    "X-Maild-Verdict",
    "List-Id",
    "List-Unsubscribe",
    "Precedence",
    "Auto-Submitted",
    "References",
    "In-Reply-To",
    "X-Junk",
]

header_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "boss@acme.example",
            "Boss <boss@acme.example>",
            "ceo@bank.example",
            '"security@bank.example" <boss@acme.example>',
            "=?utf-8?q?Caf=C3=A9?= <boss@acme.example>",
            "=?utf-8?b?w6k=?= <a@b.example>",
            "=?x-unknown?q?abc?=",
            "=?utf-8?q?=ZZ?=",
            "=?utf-8?b?***?=",
            "a@b.example, c@d.example",
            "undisclosed-recipients:;",
            "<>",
            "<<<>>>",
            "(((a@b)))",
            "a@b@c",
            '"unterminated <a@b.example>',
            "Mon, 32 Foo 2024 99:99:99 +9999",
            "Tue, 1 Jan 2030 00:00:00 +0000",
            "<id@acme.example>",
            "<>",
            "x" * 1200,
            'multipart/mixed; boundary="B"',
            "multipart/mixed",
            "text/plain; charset=unknown-8bit",
            "base64",
            "quoted-printable",
            "bulk",
            "<mailto:u@acme.example>",
            "from evil (evil [203.0.113.1]) by mx.hosted.example (maild) with ESMTP id AAAA",
        ]
    ),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


ascii_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    header_values.filter(
        lambda v: v.isascii() and "\r" not in v and "\n" not in v and len(v) < 900
    ),
)
FROM_VALUES = [
    "boss@acme.example",
    "Boss <boss@acme.example>",
    "boss@ACME.example",
    "=?utf-8?q?Boss?= <boss@acme.example>",
    '"Boss, The" <boss@acme.example>',
    "ceo@bank.example",
    "Boss <boss@sub.acme.example>",
    "boss@nxdomain.acme.example",
    "boss@acme.example, other@acme.example",
    "<boss@acme.example>",
]


@st.composite
def header_block(draw) -> bytes:
    """Header fields: mostly well-formed (so every check is reached), sometimes hostile
    (8-bit, NUL, bare LF, junk lines, bad field names, folding, duplicates)."""
    hostile = draw(st.integers(0, 9)) < 3
    out = []
    if not hostile:
        out.append(f"From: {draw(st.one_of(st.sampled_from(FROM_VALUES), ascii_values))}")
        out.append(
            "Date: "
            + draw(
                st.sampled_from(
                    [
                        "Tue, 1 Jan 2030 00:00:00 +0000",
                        "Mon, 01 Jan 2024 10:00:00 +0100",
                        "yesterday",
                        "Thu, 1 Jan 1970 00:00:00 +0000",
                    ]
                )
            )
        )
        out.append(f"Message-ID: <{draw(st.integers(0, 10**9))}@acme.example>")
    for _ in range(draw(st.integers(0, 8))):
        name = (
            draw(st.sampled_from(FIELDS))
            if not hostile or draw(st.booleans())
            else draw(st.text(min_size=1, max_size=10))
        )
        value = draw(header_values if hostile else ascii_values)
        out.append(f"{name}: {value}")
        if draw(st.integers(0, 9)) == 0:
            out[-1] += "\r\n\t" + draw(
                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
            )
    draw(st.randoms()).shuffle(out)
    block = b"\r\n".join(to_bytes(x) for x in out) + b"\r\n"
    if hostile and draw(st.booleans()):
        block += draw(st.binary(max_size=20)) + b"\r\n"
    return block


@st.composite
def mime_body(draw, depth: int = 0) -> bytes:
    if depth < 3 and draw(st.integers(0, 3)) == 0:
        b = draw(st.sampled_from(["B", "b", "=_x", "", "a" * 80]))
        parts = [draw(mime_body(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
        inner = b"".join(
            b"--" + b.encode() + b"\r\nContent-Type: text/plain\r\n\r\n" + p + b"\r\n"
            for p in parts
        )
        return inner + (b"--" + b.encode() + b"--\r\n" if draw(st.booleans()) else b"")
    return draw(
        st.one_of(
            st.text(max_size=80).map(to_bytes),
            st.sampled_from(
                [
                    b"=C3=A9=\r\n",
                    b"w6k=\r\n",
                    b"<html><script>x</script>hi</html>",
                    b"..\r\n.\r\n..x\r\n",
                    b"\xff\xfe\x00",
                    b"line\rbare\ncr\r\n",
                ]
            ),
        )
    )


@st.composite
def message(draw) -> bytes:
    body = draw(mime_body())
    return draw(header_block()) + b"\r\n" + body


def data_payload(msg: bytes) -> bytes:
    """A message as sent after 354: dot-stuffed, CRLF-terminated, then the end marker."""
    stuffed = msg.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


# --------------------------------------------------------------------------- policies.toml

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "60s",
            "5m",
            "0s",
            "-1s",
            "1e9d",
            "25MB",
            "0",
            "1.5h",
            "10ms",
            "200/1h",
            "127.0.0.1:25",
            "[::1]:10025",
            ":0",
            "nan",
            "inf",
            "a@b",
            "192.0.2.0/24",
            "before-queue",
            "front",
            "enforce",
            "tag",
            "reject",
            "off",
            "x" * 300,
        ]
    ),
    st.dates(),
    st.times(),
    st.datetimes(timezones=st.just(dt.UTC)),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)
