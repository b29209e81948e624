"""Every file README.md and docs/*.md point to is part of the repository.

A reader follows a link, a path in backticks (`docs/headers.md`, `tests/policy/`) or a
page named in the text (optin.md) and must find the file in the checkout: never a path
outside it (`../shared/...`) that happens to exist on the authors' machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
_CODE = re.compile(r"`([^`]+)`")  # may wrap onto the next line
_PAGE = re.compile(r"(?<![\w./-])((?:\.\./)?[\w./-]*\w\.md)\b")  # a page named in the text
_URL = re.compile(r"[a-z][a-z0-9+.-]*:")
_REPO_PATH = re.compile(r"(?:\.\./)*(?:maild|tests|docs|systemd|bench|examples)/|[\w./-]+\.md$")


def _inside(doc: Path, target: str, *, from_root: bool) -> bool:
    """Does target name an existing file or folder of the repository, read from the
    document's folder (or, for a path in the text, from the top of the checkout)?"""
    path = target.split("#", 1)[0].split("::", 1)[0]
    bases = [doc.parent, ROOT] if from_root else [doc.parent]
    for base in bases:
        p = (base / path).resolve()
        if p.is_relative_to(ROOT) and p.exists():
            return True
    return False


def references(doc: Path, text: str | None = None) -> list[tuple[str, bool]]:
    """(target, may be read from the top of the checkout) for each file doc points to."""
    text = doc.read_text(encoding="utf-8") if text is None else text
    out = [(t, False) for t in _LINK.findall(text) if not _URL.match(t) and not t.startswith("#")]
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    for span in _CODE.findall(text):
        s = " ".join(span.split()).rstrip(":,.")
        if " " in s or s.startswith(("/", "~")) or any(c in s for c in "*%<>$"):
            continue  # a command, a path on the target host, a pattern
        if _REPO_PATH.match(s):
            out.append((s, True))
    prose = _LINK.sub("] ", _CODE.sub(" ", text))
    prose = re.sub(r"[a-z][a-z0-9+.-]*://\S+", " ", prose)
    out += [(t, True) for t in _PAGE.findall(prose)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_document_points_to_is_in_the_repository(doc):
    missing = sorted(
        {t for t, from_root in references(doc) if not _inside(doc, t, from_root=from_root)}
    )
    assert not missing, f"{doc.relative_to(ROOT)} points to files not in the repository: {missing}"


def test_the_checker_sees_links_code_spans_and_pages():
    doc = ROOT / "docs" / "x.md"
    text = (
        "See [a](optin.md#x), `docs/headers.md`, `../shared/SOURCES.md`, `maild serve -c F`, "
        "`/etc/maild/policies.toml` and antispam.md; [w](https://example.org/a.md), "
        "https://example.org/b.md, `maild optin\nrevoke`.\n"
        "```\ncat `notes.md`\n```\n"
    )
    assert {t for t, _ in references(doc, text)} == {
        "optin.md#x",
        "docs/headers.md",
        "../shared/SOURCES.md",
        "antispam.md",
    }
    assert not _inside(doc, "../shared/SOURCES.md", from_root=True)
    assert not _inside(doc, "../../shared/POLICY-SOURCES.md", from_root=False)
    assert _inside(doc, "../SECURITY.md", from_root=False)
    assert _inside(doc, "docs/headers.md", from_root=True)
