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
