"""The pure selection: exactly the right messages, for every action, clock and folder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from maild.retention.config import RetentionRule, StoreSettings
from maild.retention.maildir import MsgFile
from maild.retention.select import (
    expired,
    folder_matcher,
    is_idle,
    oldest_until,
    plan,
    quota_counts,
    timestamp,
)

DAY = 86400.0
NOW = 1_800_000_000.0
STORE = StoreSettings(path="/v/%u")
FOLDERS = ["INBOX", "Trash", "Deleted Items", "Sent", "Trash/Old", "Archive/2019", "trash"]


def msg(folder="INBOX", *, mtime=NOW, ctime=NOW, size=100, name=None) -> MsgFile:
    return MsgFile(folder, "cur", name or f"{folder}-{mtime}-{ctime}-{size}", size, mtime, ctime, 1)


def match(*folders, exclude=()):
    return folder_matcher(RetentionRule(name="r", folders=folders, exclude_folders=exclude), STORE)


def test_trash_special_use_selects_the_aliases_only():
    m = match("\\Trash")
    assert [f for f in FOLDERS if m(f)] == ["Trash", "Deleted Items", "trash"]


def test_inbox_star_percent_and_exclude():
    assert [f for f in FOLDERS if match("INBOX")(f)] == ["INBOX"]
    assert [f for f in FOLDERS if match("inbox")(f)] == ["INBOX"]
    assert all(match("*")(f) for f in FOLDERS)
    assert [f for f in FOLDERS if match("Trash/*")(f)] == ["Trash/Old"]
    assert [f for f in FOLDERS if match("%")(f)] == [
        "INBOX",
        "Trash",
        "Deleted Items",
        "Sent",
        "trash",
    ]
    assert [f for f in FOLDERS if match("*", exclude=("\\Trash", "Sent"))(f)] == [
        "INBOX",
        "Trash/Old",
        "Archive/2019",
    ]
    assert [f for f in FOLDERS if match("Archive/2019")(f)] == ["Archive/2019"]


def test_idle_is_strictly_longer_than_the_period():
    assert is_idle(None, NOW, NOW)
    assert not is_idle(60 * DAY, NOW - 60 * DAY, NOW)
    assert is_idle(60 * DAY, NOW - 60 * DAY - 1, NOW)


def test_trash_aged_by_time_in_trash_not_by_received_date():
    old_mail_trashed_today = msg("Trash", mtime=NOW - 400 * DAY, ctime=NOW)
    trashed_8_days_ago = msg("Trash", mtime=NOW - 9 * DAY, ctime=NOW - 8 * DAY)
    got = expired([old_mail_trashed_today, trashed_8_days_ago], 7 * DAY, "saved", NOW)
    assert got == [trashed_8_days_ago]


def test_exactly_at_the_age_is_not_yet_expired():
    f = msg(mtime=NOW - 90 * DAY)
    assert expired([f], 90 * DAY, "received", NOW) == []
    assert expired([f], 90 * DAY, "received", NOW + 0.001) == [f]


times = st.floats(min_value=NOW - 400 * DAY, max_value=NOW, allow_nan=False)
files_st = st.lists(
    st.builds(
        lambda folder, m, c, size, i: msg(folder, mtime=m, ctime=c, size=size, name=f"f{i}"),
        st.sampled_from(FOLDERS),
        times,
        times,
        st.integers(0, 5000),
        st.integers(),
    ),
    max_size=60,
    unique_by=lambda f: f.name,
)


@settings(max_examples=200, deadline=None)
@given(files_st, st.sampled_from(["saved", "received"]), st.floats(1, 200 * DAY))
def test_expired_is_exactly_the_older_files(files, age_by, age):
    got = expired(files, age, age_by, NOW)
    assert set(got) == {f for f in files if NOW - timestamp(f, age_by) > age}


@settings(max_examples=200, deadline=None)
@given(
    files_st,
    st.integers(0, 100_000),
    st.sampled_from(["saved", "received"]),
    st.one_of(st.none(), st.floats(1, 100 * DAY)),
)
def test_oldest_until_is_minimal_oldest_first_and_respects_min_age(files, limit, age_by, min_age):
    usage = sum(f.size for f in files)
    got = oldest_until(files, usage, limit, age_by, min_age, NOW)
    left = usage - sum(f.size for f in got)
    kept = [f for f in files if f not in got]
    # never younger than min_age
    if min_age:
        assert all(NOW - timestamp(f, age_by) > min_age for f in got)
    # oldest first: nothing kept is older than something deleted
    if got:
        newest_deleted = max(timestamp(f, age_by) for f in got)
        assert all(timestamp(f, age_by) >= newest_deleted for f in kept)
        # minimal: without the last one deleted, usage would still be over the limit
        assert left + got[-1].size > limit
    # it fits, unless the eligible files ran out
    eligible = [f for f in kept if not min_age or NOW - timestamp(f, age_by) > min_age]
    assert left <= limit or not eligible or usage <= limit


def test_shrink_counts_every_counted_folder_and_deletes_only_selected_counted_ones():
    rule = RetentionRule(name="s", action="shrink", folders=("INBOX",), idle=DAY, quota=250)
    files = [
        msg("INBOX", mtime=NOW - 3 * DAY, size=100),
        msg("INBOX", mtime=NOW - 1 * DAY, size=100),
        msg("Trash", mtime=NOW - 9 * DAY, size=100),
    ]
    counted_all = quota_counts(STORE, ())
    got = plan(rule, files, NOW, selected=folder_matcher(rule, STORE), counted=counted_all)
    assert got == [files[0]]  # 300 > 250: the oldest INBOX message
    courier = quota_counts(STORE, ("Trash",))  # Trash not counted: 200 <= 250
    assert plan(rule, files, NOW, selected=folder_matcher(rule, STORE), counted=courier) == []


def test_trim_counts_only_its_folders():
    rule = RetentionRule(name="t", action="trim", folders=("INBOX",), max_size=100)
    files = [
        msg("INBOX", mtime=NOW - 5 * DAY, size=80),
        msg("INBOX", mtime=NOW - 2 * DAY, size=80),
        msg("Sent", mtime=NOW - 9 * DAY, size=5000),
    ]
    got = plan(
        rule, files, NOW, selected=folder_matcher(rule, STORE), counted=quota_counts(STORE, ())
    )
    assert got == [files[0]]


def test_delete_plan_takes_only_selected_folders():
    rule = RetentionRule(name="d", folders=("\\Trash",), age=7 * DAY, age_by="saved")
    files = [msg("Trash", ctime=NOW - 8 * DAY), msg("INBOX", ctime=NOW - 8 * DAY)]
    got = plan(
        rule, files, NOW, selected=folder_matcher(rule, STORE), counted=quota_counts(STORE, ())
    )
    assert got == [files[0]]
