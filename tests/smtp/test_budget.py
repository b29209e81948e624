"""The memory budget for mail in flight, as pure logic with real spool files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from maild.smtp.budget import REPLY_BUDGET, REPLY_STORAGE, Budget

HEADER = b"From: a@example.org\r\nSubject: x\r\n\r\n"


def feed(sink, data: bytes, block: int = 1000) -> None:
    for i in range(0, len(data), block):
        sink.extend(memoryview(data)[i : i + block])


def test_a_small_message_stays_in_ram_and_is_charged_until_closed(tmp_path: Path):
    b = Budget(10_000, 4_000, str(tmp_path))
    s = b.sink()
    feed(s, HEADER + b"body\r\n")
    c = s.finish()
    assert not c.spooled and c.head == HEADER + b"body\r\n" and b.in_use == c.size
    assert b"".join(c.blocks(len(HEADER))) == b"body\r\n"
    c.close()
    assert b.in_use == 0 and b.spooled == 0


def test_past_the_threshold_the_message_goes_to_a_private_unnamed_file(tmp_path: Path):
    b = Budget(1_000_000, 4_000, str(tmp_path))
    s = b.sink()
    body = b"".join(b"line %06d\r\n" % i for i in range(5_000))
    feed(s, HEADER + body, block=1024)
    assert s.file is not None
    st = os.fstat(s.file.fileno())
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 0
    assert list(tmp_path.iterdir()) == []  # never a name in the directory
    c = s.finish()
    assert c.spooled and c.size == len(HEADER + body)
    assert len(c.head) == 4_000 and c.head.startswith(HEADER)
    assert b.in_use == 4_000 and b.spooling == 1
    assert b"".join(c.blocks()) == HEADER + body
    assert b"".join(c.blocks(len(HEADER), block=7)) == body
    c.close()
    assert b.in_use == 0 and b.spooling == 0


def test_a_header_longer_than_the_threshold_is_kept_whole(tmp_path: Path):
    b = Budget(1_000_000, 1_000, str(tmp_path))
    s = b.sink()
    head = b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    feed(s, head + b"x" * 50_000 + b"\r\n", block=333)
    c = s.finish()
    assert c.head == head  # the header block, even past the threshold; no body beyond it
    c.close()
    assert b.in_use == 0


def test_when_the_budget_is_spent_small_messages_spool_early(tmp_path: Path):
    b = Budget(5_000, 4_000, str(tmp_path))
    first = b.sink()
    feed(first, HEADER + b"a" * 3_000)
    second = b.sink()
    feed(second, HEADER + b"b" * 3_000)  # only 2,000 bytes of budget left
    assert second.file is not None and b.in_use <= 5_000
    c = second.finish()
    assert b"".join(c.blocks()) == HEADER + b"b" * 3_000
    c.close()
    first.close()
    assert b.in_use == 0


def test_a_header_that_cannot_be_held_is_452(tmp_path: Path):
    b = Budget(2_000, 1_000, str(tmp_path))
    hog = b.sink()
    feed(hog, b"y" * 900)
    s = b.sink()
    feed(s, b"".join(b"X-H%d: v\r\n" % i for i in range(500)))
    assert s.error == REPLY_BUDGET and REPLY_BUDGET.startswith("452 4.3.1 ")
    s.extend(b"more")  # dropped: the reader goes on to the end of data
    assert b.refused == 1 and s.file is None and len(s.buf) == 0
    hog.close()
    assert b.in_use == 0 and b.spooling == 0


def test_no_spool_directory_is_452_with_a_reason(tmp_path: Path):
    b = Budget(1_000_000, 100, str(tmp_path / "missing"))
    s = b.sink()
    feed(s, HEADER + b"z" * 1000)
    assert s.error == REPLY_STORAGE
    assert b.in_use == 0


def test_a_content_never_closed_gives_its_budget_back_when_collected(tmp_path: Path):
    b = Budget(1_000_000, 100, str(tmp_path))
    s = b.sink()
    feed(s, HEADER + b"z" * 1000)
    c = s.finish()
    assert b.spooling == 1
    del c
    assert b.spooling == 0 and b.in_use == 0
