"""The fast normalise() and signature() give exactly what the plain definitions give.

Why: both run for every customer message (the bulk rule), so they were rewritten for
speed (one tokenising pass that folds numbers, URL/address passes skipped when they
cannot match, shingle hashes batched); bulk detection must not change because of it.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from maild import textsig
from maild.textsig import SLOTS, normalise, signature


def reference_normalise(text: str, volatile: set[str] = frozenset()) -> list[str]:
    text = textsig._URL.sub(lambda m: " " + m.group(1) + " ", text)
    text = textsig._EMAIL.sub(" @ ", text).lower()
    text = textsig._NUM.sub("#", text)
    return [w for w in textsig._WORD.findall(text) if w not in volatile]


def reference_signature(words: list[str]) -> tuple[int, ...] | None:
    if len(words) < 3:
        return None
    mins = [0xFFFF] * SLOTS
    for i in range(len(words) - 2):
        sh = " ".join(words[i : i + 3])
        vals = textsig._UNPACK(
            hashlib.blake2b(
                sh.encode("utf-8", "surrogatepass"), digest_size=64, key=textsig._KEY
            ).digest()
        )
        mins = list(map(min, mins, vals))
    return tuple(mins)


PIECES = [
    "a",
    "B",
    "1",
    "42",
    "٣",
    "²",
    "½",
    "İ",
    "é",
    "_",
    "#",
    "@",
    ".",
    "-",
    "+",
    " ",
    "\n",
    "http://",
    "https://x.example/p?q=1",
    "ftp://",
    "://",
    "a@b.example",
    "x.y",
    "\u212a",  # KELVIN SIGN: lower() makes it ASCII "k"
]
VOLATILE = ["1", "42", "#", "a", "b", "٣", "x", "x.y", "ab"]


@settings(max_examples=500)
@given(
    st.lists(st.sampled_from(PIECES), max_size=30), st.sets(st.sampled_from(VOLATILE), max_size=4)
)
def test_normalise_is_the_plain_definition(pieces, volatile):
    text = "".join(pieces)
    assert normalise(text, volatile) == reference_normalise(text, volatile)


@given(st.text(max_size=200))
def test_normalise_any_text(text):
    assert normalise(text) == reference_normalise(text)


@settings(deadline=None)  # a property, not a timing: the machine is shared
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=300))
def test_normalise_ascii_text(text):
    # ASCII text takes the ASCII tokeniser: the same words as the Unicode one
    assert normalise(text) == reference_normalise(text)


HEADER_LINES = [
    b"From: <a@acme.example>\r\n",
    b"To: B <b@example.com>\r\n",
    b"Subject: hi\r\n",
    b"Subject: caf\xc3\xa9\r\n",
    b"From a@b Thu Dec  3 00:00:00 2026\r\n",
    b" folded continuation\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\n",
    b"Content-Type: text/html\r\n",
    b"Content-Type: multipart/alternative; boundary=b\r\n",
    b"content-transfer-encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Type : text/html\r\n",
    b"X-Bare: lf\nX-After: lf\r\n",
    b"X-Cr: a\rb\r\n",
    b"not a header line\r\n",
    b"\n",
    b"\r\n",
    b"X-8bit-\xe9: v\r\n",
]
BODY_PIECES = [
    b"1XXXXXXXXXXXXXXXXXXXX\r\n",
    b"caf\xc3\xa9 \xff\r\n",
    b"=C3=A9 aGVsbG8=\r\n",
    b"<p>html &amp; text</p>\r\n",
    b"--b\r\nContent-Type: text/plain\r\n\r\npart\r\n--b--\r\n",
    b"\r\n",
    b"bare\nlf\rcr",
    b"",
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(HEADER_LINES), max_size=8),
    st.booleans(),
    st.lists(st.sampled_from(BODY_PIECES), max_size=8),
)
def test_body_text_of_a_plain_body_is_what_the_mime_parser_reads(headers, blank, body):
    # policy.context.Message.plain_body says when the parse can be skipped: the text
    # must be exactly what parsing the whole message gives.
    from maild.policy.context import Message

    content = b"".join(headers) + (b"\r\n" if blank else b"") + b"".join(body)
    plain = Message(content).plain_body
    assert textsig.body_text(content, plain_body=plain) == textsig.body_text(content)


def test_plain_body_taken_for_a_plain_message():
    from maild.policy.context import Message

    content = b"From: <a@acme.example>\r\nSubject: hi\r\n\r\n1XXX\r\n2XXX\r\n"
    assert Message(content).plain_body == b"1XXX\r\n2XXX\r\n"
    assert Message(b"Content-Type: text/plain\r\n\r\nx\r\n").plain_body is None
    assert Message(b"From: a\r\nbad line\r\n\r\nx\r\n").plain_body is None


@settings(max_examples=200)
@given(
    st.lists(
        st.sampled_from(["w", "x", "#", "@", "é", "日本", "\udcff"] + [f"w{i}" for i in range(50)]),
        max_size=80,
    )
)
def test_signature_is_the_plain_definition(words):
    assert signature(words) == reference_signature(words)


def test_signature_over_many_batches():
    words = [f"w{i % 1700}" for i in range(3000)]  # more distinct shingles than one batch
    assert signature(words) == reference_signature(words)
