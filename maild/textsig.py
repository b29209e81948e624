"""Near-duplicate signatures of message text: normalisation and MinHash over word shingles.

Personalised copies of one campaign differ in names, addresses, numbers and tracking
URLs; normalisation folds those away so the copies hash alike: HTML reduced to text, URLs
cut to scheme://host/path, numbers folded to '#', email addresses to '@', and tokens
taken from the recipients' addresses and display names removed. The signature is 32
minima of keyed hashes over 3-word shingles (as rspamd's shingles): two texts match
when more than 16 of the 32 agree. One blake2b call per shingle gives all 32 hashes (its
64-byte digest read as 32 independent 16-bit values), so a signature costs one hash per
shingle, not 32.
"""

from __future__ import annotations

import email.policy
import hashlib
import operator
import re
import struct
from collections.abc import Set
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser

SLOTS = 32
_KEY = b"maild-minhash-v1"
_URL = re.compile(r"\b((?:https?|ftp)://[^\s/?#<>\"']+[^\s?#<>\"']*)[^\s<>\"']*", re.I)
# Starts only where a run of address characters starts, and takes the run whole
# (possessive): an unanchored pattern retries every position of a long word without an
# "@" and backtracks each time, quadratic in the word length (1 ms per 2 KB body of
# 78-character lines, 26 ms per 100 KB).
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]++@[\w-]+(?:\.[\w-]+)+")
_NUM = re.compile(r"\d+")
_WORD = re.compile(r"[^\W_]+|[#@]", re.UNICODE)
# _WORD after _NUM.sub("#"): a digit run is a token (folded to "#" by normalise); other
# word characters form words; "#" and "@" stand alone.
_TOKEN = re.compile(r"\d+|[^\W\d_]+|[#@]", re.UNICODE)
# The same tokens of lower-case ASCII text: there \d is [0-9] and [^\W\d_] is [a-z], and
# the engine tests a set of characters ~3x faster than Unicode categories.
_TOKEN_ASCII = re.compile(r"[0-9]+|[a-z]+|[#@]")
_MAX_TEXT = 64 * 1024
_UNPACK = struct.Struct(f"<{SLOTS}H").unpack
_BATCH = 512  # shingles hashed per batch in signature()


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    try:
        p.feed(html)
        p.close()
    except Exception:  # malformed HTML still yields what was parsed
        pass
    return " ".join(p.parts)


MAX_PARTS = 100  # MIME boundary lines; more (or deep nesting) and the raw body is used
MAX_PARSE = 512 * 1024  # bytes handed to the MIME parser at most


def body_text(content: bytes, *, plain_body: bytes | None = None) -> str:
    """The message's readable text: text/plain parts, and text/html parts as text.

    The work is bounded, because this runs on the event loop for every customer message:
    a message with many MIME parts (or parts nested deep: the stdlib recurses per level)
    is not parsed part by part; its raw body, reduced to text, is signed instead, which
    is as good for recognising copies of one campaign.

    `plain_body` is the body of a message whose header section ends at its first blank
    line and has neither Content-Type nor Content-Transfer-Encoding (the caller parsed
    the header, see policy.context.Message.plain_body): one text/plain part in US-ASCII,
    which the MIME parser reads as the bytes themselves, so it is not parsed again.
    """
    if content.count(b"\n--", 0, MAX_PARSE) > MAX_PARTS or len(content) > MAX_PARSE:
        return _raw_text(content)
    if plain_body is not None:  # get_content() of that part: its bytes, ASCII, replaced
        return plain_body.decode("ascii", "replace")[:_MAX_TEXT]
    try:
        return _parsed_text(content)
    except RecursionError:  # nesting the boundary count did not catch
        return _raw_text(content)


def _raw_text(content: bytes) -> str:
    end = content.find(b"\r\n\r\n")
    body = content[end + 4 if end >= 0 else 0 :][:_MAX_TEXT]
    text = body.decode("utf-8", "replace")
    return html_to_text(text) if "<" in text else text


def _parsed_text(content: bytes) -> str:
    msg = BytesParser(policy=email.policy.default).parsebytes(content)
    out: list[str] = []
    size = 0
    parts = msg.walk() if msg.is_multipart() else [msg]
    for part in parts:
        if size >= _MAX_TEXT or part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        try:
            text = part.get_content() if isinstance(part, EmailMessage) else ""
        except (LookupError, ValueError, AssertionError):
            payload = part.get_payload(decode=True) or b""
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        if ctype == "text/html":
            text = html_to_text(text)
        out.append(text[: _MAX_TEXT - size])
        size += len(out[-1])
    return "\n".join(out)


def volatile_tokens(addresses: list[str], names: list[str]) -> set[str]:
    """Words that personalise a copy: pieces of recipient addresses and display names."""
    toks: set[str] = set()
    for a in addresses:
        local = a.split("@", 1)[0].lower()
        toks.update(t for t in re.split(r"[._+\-]", local) if len(t) > 1)
    for n in names:
        toks.update(w.lower() for w in _WORD.findall(n) if len(w) > 1)
    return toks


def normalise(text: str, volatile: Set[str] = frozenset()) -> list[str]:
    # Each step is skipped when it cannot match (every URL has "://", every address an
    # "@"), and numbers are folded while splitting into words: _TOKEN takes a run of
    # digits as a token of its own, which is what _NUM.sub("#") followed by _WORD made
    # of it. One pass over the text instead of two (the bulk rule runs this for every
    # customer message; bench/profile.py).
    if "://" in text:
        text = _URL.sub(lambda m: " " + m.group(1) + " ", text)
    if "@" in text:
        text = _EMAIL.sub(" @ ", text)
    text = text.lower()
    return [
        w
        for t in (_TOKEN_ASCII if text.isascii() else _TOKEN).findall(text)
        if (w := "#" if t.isdecimal() else t) not in volatile
    ]


def signature(words: list[str]) -> tuple[int, ...] | None:
    """MinHash of 3-word shingles; None for texts too short to judge (< 3 words)."""
    if len(words) < 3:
        return None
    # Distinct shingles, hashed in batches; the minima are taken slot by slot over each
    # batch (zip/map/min run in C), then folded into the running minima. Every hash value
    # is at most 0xFFFF, so this equals starting from 0xFFFF and taking the minimum one
    # shingle at a time, at less than half the cost; batches bound the memory a 64 KB
    # text needs.
    shingles = list(set(map(" ".join, zip(words, words[1:], words[2:], strict=False))))
    b2, key, unpack = hashlib.blake2b, _KEY, _UNPACK
    mins: list[int] | None = None
    for i in range(0, len(shingles), _BATCH):
        batch = map(
            min,
            zip(
                *[
                    unpack(
                        b2(sh.encode("utf-8", "surrogatepass"), digest_size=64, key=key).digest()
                    )
                    for sh in shingles[i : i + _BATCH]
                ],
                strict=True,
            ),
        )
        mins = list(batch) if mins is None else list(map(min, mins, batch))
    assert mins is not None
    return tuple(mins)


def similarity(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many of the 32 minima agree."""
    if len(a) != len(b):
        raise ValueError("signatures of different lengths")
    return sum(map(operator.eq, a, b))
