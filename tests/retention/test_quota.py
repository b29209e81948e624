"""maildirsize and the Dovecot userdb file: written the way the mail store expects."""

from __future__ import annotations

import os
import stat

import pytest

from maild.retention import quota

MAILUID = 65534


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "Maildir"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    yield d, fd
    os.close(fd)


def test_parse_limits_and_usage():
    md = quota.parse("1048576S,1000C\n500 2\n-100 -1\n300 1\n")
    assert (md.bytes_limit, md.count_limit, md.usage_bytes, md.usage_count, md.usage_lines) == (
        1048576,
        1000,
        700,
        2,
        3,
    )
    assert quota.parse("0S\n0 0\n").bytes_limit == 0
    unfinished = quota.parse("100S\n10 1\n99")  # an append in progress
    assert unfinished.usage_bytes == 10


def test_format_and_shrunk_line_keep_the_count_limit():
    assert quota.format_limit(0) == "0S"
    assert quota.format_limit(1048576, 1000) == "1048576S,1000C"
    assert quota.format_limit(0, 50) == "50C"
    assert quota.shrunk_line("104857600S,1000C", 1048576) == "1048576S,1000C"
    assert quota.shrunk_line(None, 1048576) == "1048576S"


def test_set_limit_rewrites_line_one_and_keeps_the_deltas(root):
    d, fd = root
    (d / "maildirsize").write_text("104857600S\n5000 3\n-100 -1\n")
    old = quota.set_limit(fd, "1048576S", (0, 0))
    assert old == "104857600S"
    assert (d / "maildirsize").read_text() == "1048576S\n5000 3\n-100 -1\n"
    assert not [p for p in os.listdir(d) if "maild-tmp" in p]


def test_set_limit_on_a_missing_file_writes_the_counted_usage(root):
    d, fd = root
    assert quota.set_limit(fd, "1048576S", (4242, 7)) is None
    assert (d / "maildirsize").read_text() == "1048576S\n4242 7\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners needs root")
def test_rewrites_keep_owner_and_mode(root):
    """Dovecot (the mail user) must still be able to open maildirsize for appending."""
    d, fd = root
    os.chown(d, MAILUID, MAILUID)
    p = d / "maildirsize"
    p.write_text("100S\n0 0\n")
    os.chown(p, MAILUID, MAILUID)
    os.chmod(p, 0o600)
    quota.set_limit(fd, "50S", (0, 0))
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (MAILUID, MAILUID, 0o600)
    p.unlink()
    quota.set_limit(fd, "50S", (1, 1))  # a new file: owned like the mailbox
    st = os.stat(p)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (MAILUID, MAILUID, 0o600)
    assert quota.save_original(fd, "100S") == "100S"
    st = os.stat(d / quota.ORIGINAL)
    assert (st.st_uid, st.st_gid) == (MAILUID, MAILUID)


def test_append_usage_appends_one_line(root):
    d, fd = root
    (d / "maildirsize").write_text("100S\n500 5\n")
    assert quota.append_usage(fd, -200, -2)
    assert (d / "maildirsize").read_text() == "100S\n500 5\n-200 -2\n"
    assert quota.read(fd).usage_bytes == 300


def test_append_usage_never_creates_or_follows(root, tmp_path):
    d, fd = root
    assert quota.append_usage(fd, -1, -1) is False
    assert not (d / "maildirsize").exists()
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    os.symlink(target, d / "maildirsize")
    assert quota.append_usage(fd, -1, -1) is False
    assert target.read_text() == "keep\n"
    assert quota.read(fd) is None


def test_recount_replaces_the_deltas(root):
    d, fd = root
    (d / "maildirsize").write_text("100S\n500 5\n-200 -2\n")
    assert quota.recount(fd, (123, 4))
    assert (d / "maildirsize").read_text() == "100S\n123 4\n"


def test_original_is_recorded_once(root):
    d, fd = root
    assert quota.read_original(fd) is None
    assert quota.save_original(fd, "104857600S") == "104857600S"
    assert quota.save_original(fd, "1048576S") == "104857600S"  # never overwritten
    assert quota.read_original(fd) == "104857600S"
    quota.drop_original(fd)
    assert quota.read_original(fd) is None
    assert quota.save_original(fd, quota.NO_FILE) == quota.NO_FILE


def test_userdb_file_lines_and_restore(tmp_path):
    path = tmp_path / "dovecot-quota.passwd"
    u = quota.UserdbOverrides(str(path))
    u.ensure()
    assert path.exists() and u.read() == {}
    assert u.set("alice@example.com", 1048576)
    assert not u.set("alice@example.com", 1048576)  # no change, no rewrite
    assert u.set("bob@example.com", 2048)
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == [
        "alice@example.com:::::::userdb_quota_rule=*:bytes=1048576",
        "bob@example.com:::::::userdb_quota_rule=*:bytes=2048",
    ]
    assert u.limit("alice@example.com") == 1048576
    assert u.remove("alice@example.com")
    assert not u.remove("alice@example.com")
    assert u.limit("alice@example.com") is None and u.limit("bob@example.com") == 2048


def test_userdb_file_mtime_always_moves_forward(tmp_path):
    """Dovecot re-reads a passwd-file when mtime (seconds) or size changes."""
    path = tmp_path / "q.passwd"
    u = quota.UserdbOverrides(str(path))
    u.set("a@x", 1)
    stamps = [int(os.stat(path).st_mtime)]
    for n in range(2, 6):  # same size each time, within one second
        u.set("a@x", n)
        stamps.append(int(os.stat(path).st_mtime))
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))


def test_userdb_refuses_names_that_break_the_file(tmp_path):
    u = quota.UserdbOverrides(str(tmp_path / "q"))
    with pytest.raises(ValueError):
        u.set("evil:::::::userdb_quota_rule=*:bytes=0", 1)
