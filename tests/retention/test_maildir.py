"""Folders, scanning and unlinking: only messages in cur/ and new/, never through symlinks."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maild.retention import mutf7
from maild.retention.maildir import (
    NO_TIME,
    list_folders,
    message_size,
    open_dir,
    open_folder,
    open_root,
    scan_dir,
    unlink_message,
)

from .helpers import DAY, add_msg, make_maildir


@pytest.mark.parametrize(
    "decoded, encoded",
    [
        ("INBOX", "INBOX"),
        ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
        ("Tom & Jerry", "Tom &- Jerry"),
        ("台北", "&U,BTFw-"),
        ("~peter/mail/日本語", "~peter/mail/&ZeVnLIqe-"),
    ],
)
def test_modified_utf7_vectors(decoded, encoded):
    assert mutf7.encode(decoded) == encoded
    assert mutf7.decode(encoded) == decoded


@given(st.text(min_size=0, max_size=30))
def test_modified_utf7_round_trip(name):
    assert mutf7.decode(mutf7.encode(name)) == name


@pytest.mark.parametrize("bad", ["&Jjo", "&A-", "&!!-"])
def test_invalid_modified_utf7_is_kept_as_is(bad):
    assert mutf7.decode(bad) == bad


def _names(path, layout):
    fd = open_root(str(path))
    try:
        return {(f.name, f.rel) for f in list_folders(fd, layout)}
    finally:
        os.close(fd)


def test_maildirpp_folders(tmp_path):
    mb = make_maildir(tmp_path / "m", ("Trash", "Deleted Items", "Archive/2024", "Gelöschte"))
    (mb / ".NotAFolder").mkdir()  # no cur/ or new/: not a folder
    (mb / "dovecot.index").write_bytes(b"")
    assert _names(mb, "maildir++") == {
        ("INBOX", ()),
        ("Trash", (".Trash",)),
        ("Deleted Items", (".Deleted Items",)),
        ("Archive/2024", (".Archive.2024",)),
        ("Gelöschte", (".Gel&APY-schte",)),
    }


def test_folders_filtered_by_want(tmp_path):
    """A rule lists only the folders it reads (the others are not even opened)."""
    mb = make_maildir(tmp_path / "m", ("Trash", "Sent", "Gelöschte"))
    (mb / ".Junk").mkdir()  # wanted, but no cur/ or new/: not a folder
    fd = open_root(str(mb))
    try:
        got = list_folders(fd, "maildir++", want=lambda n: n in ("Trash", "Gelöschte", "Junk"))
        assert {(f.name, f.rel) for f in got} == {
            ("Trash", (".Trash",)),
            ("Gelöschte", (".Gel&APY-schte",)),
        }
        assert [f.name for f in list_folders(fd, "maildir++", want=lambda n: n == "INBOX")] == [
            "INBOX"
        ]
    finally:
        os.close(fd)
    fs = make_maildir(tmp_path / "f", ("Trash", "Archive/2024"), layout="fs")
    fd = open_root(str(fs))
    try:
        assert [f.name for f in list_folders(fd, "fs", want=lambda n: n != "INBOX")] == [
            "Archive/2024",
            "Trash",
        ]
    finally:
        os.close(fd)


def test_fs_layout_folders(tmp_path):
    mb = make_maildir(tmp_path / "m", ("Trash", "Archive/2024", "Archive/2024/Q1"), layout="fs")
    assert _names(mb, "fs") == {
        ("INBOX", ()),
        ("Trash", ("Trash",)),
        ("Archive/2024", ("Archive", "2024")),
        ("Archive/2024/Q1", ("Archive", "2024", "Q1")),
    }


def test_symlinked_folder_is_not_a_folder(tmp_path):
    outside = make_maildir(tmp_path / "outside")
    mb = make_maildir(tmp_path / "m")
    os.symlink(outside, mb / ".Trash")
    os.symlink(outside, mb / "Sneaky")
    assert _names(mb, "maildir++") == {("INBOX", ())}
    assert _names(mb, "fs") == {("INBOX", ())}


def _scan(mb, sub="cur"):
    fd = open_root(str(mb))
    try:
        return scan_dir(fd, sub, "INBOX")
    finally:
        os.close(fd)


def test_scan_sees_only_regular_message_files(tmp_path):
    mb = make_maildir(tmp_path / "m")
    keep = add_msg(mb, size=10)
    (mb / "cur" / ".hidden").write_bytes(b"x")
    (mb / "cur" / "subdir").mkdir()
    target = tmp_path / "precious"
    target.write_bytes(b"y" * 50)
    os.symlink(target, mb / "cur" / "123.link:2,S")
    add_msg(mb, sub="tmp", size=10)
    summary, files = _scan(mb)
    assert [f.name for f in files] == [keep.name]
    assert summary.messages == 1 and summary.bytes == 10


def test_scan_summary_holds_oldest_times(tmp_path):
    mb = make_maildir(tmp_path / "m")
    add_msg(mb, mtime=1_000_000)
    add_msg(mb, mtime=2_000_000)
    summary, files = _scan(mb)
    assert summary.min_mtime == 1_000_000
    assert summary.min_ctime == min(f.ctime for f in files)
    empty, none = _scan(mb, "new")
    assert none == [] and empty.min_mtime == NO_TIME


def test_symlinked_cur_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1.msg").write_bytes(b"z")
    mb = tmp_path / "m"
    mb.mkdir()
    os.symlink(outside, mb / "cur")
    assert _scan(mb) is None


@pytest.mark.parametrize(
    "name, st_size, expected",
    [
        ("1.M1P1.host,S=1234:2,S", 9, 1234),
        ("1.M1P1.host,S=1234,W=1260:2,S", 9, 1234),
        ("1.M1P1.host,S=1234", 9, 1234),
        ("1.M1P1.host:2,S", 9, 9),
        ("1.M1P1.host,S=12x4:2,", 9, 9),
        ("1.M1P1.host,S=:2,", 9, 9),
    ],
)
def test_message_size_as_the_quota_counts_it(name, st_size, expected):
    assert message_size(name, st_size) == expected


@pytest.mark.parametrize(
    "name, st_size, expected",
    [
        ("1.M1P1.host,S=1234:2,S", 9, 1234),
        ("1.M1P1.host,S=12x4:2,", 9, 9),
        ("1.M1P1.host,S=:2,S=77", 9, 77),
    ],
)
def test_scan_reads_sizes_as_message_size(tmp_path, name, st_size, expected):
    """scan_dir parses ",S=" inline (per-file speed); it must agree with message_size."""
    mb = make_maildir(tmp_path / "m")
    (mb / "cur" / name).write_bytes(b"x" * st_size)
    summary, files = _scan(mb)
    assert message_size(name, st_size) == expected
    assert [f.size for f in files] == [expected] and summary.bytes == expected


def _unlink(mb, f):
    fd = open_root(str(mb))
    sub = open_dir(fd, f.sub)
    try:
        return unlink_message(sub, f)
    finally:
        os.close(sub)
        os.close(fd)


def test_unlink_deletes_the_scanned_file(tmp_path):
    mb = make_maildir(tmp_path / "m")
    p = add_msg(mb)
    (f,) = _scan(mb)[1]
    assert _unlink(mb, f) == "deleted"
    assert not p.exists()


def test_unlink_of_a_renamed_file_is_vanished_not_an_error(tmp_path):
    mb = make_maildir(tmp_path / "m")
    p = add_msg(mb)
    (f,) = _scan(mb)[1]
    renamed = p.with_name(p.name + "T")
    os.rename(p, renamed)  # a flag change
    assert _unlink(mb, f) == "vanished"
    assert renamed.exists()


def test_unlink_never_deletes_a_replaced_file(tmp_path):
    mb = make_maildir(tmp_path / "m")
    p = add_msg(mb)
    (f,) = _scan(mb)[1]
    p.unlink()
    target = tmp_path / "precious"
    target.write_bytes(b"y")
    os.symlink(target, p)  # the name now points elsewhere
    assert _unlink(mb, f) == "changed"
    assert target.exists() and os.path.islink(p)
    os.unlink(p)
    p.write_bytes(b"new")  # same name, another inode
    assert _unlink(mb, f) == "changed"
    assert p.exists()


def test_open_folder_refuses_symlinks_below_the_root(tmp_path):
    from maild.retention.maildir import Folder

    outside = make_maildir(tmp_path / "outside")
    mb = make_maildir(tmp_path / "m")
    os.symlink(outside, mb / ".Trash")
    fd = open_root(str(mb))
    try:
        with pytest.raises(OSError):
            open_folder(fd, Folder("Trash", (".Trash",)))
    finally:
        os.close(fd)


def test_received_date_is_kept_when_a_message_is_trashed(tmp_path):
    """The premise of aging Trash by ctime: a rename keeps mtime and sets ctime."""
    mb = make_maildir(tmp_path / "m", ("Trash",))
    p = add_msg(mb, mtime=1_000_000)
    dest = mb / ".Trash" / "cur" / p.name
    os.rename(p, dest)
    st = os.stat(dest)
    assert st.st_mtime == 1_000_000
    assert st.st_ctime > 1_000_000 + 300 * DAY
