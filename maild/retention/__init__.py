"""Retention jobs on the mail store (issue 6).

Trash emptied after a time in the folder, old mail deleted from idle mailboxes, idle
root mailboxes shrunk to a small quota and restored at the next login. Policy is data
([retention] in policies.toml, parsed by config.py); selection is pure (select.py); the
file system is touched only by maildir.py and quota.py; the schedule lives in
scheduler.py and the operator's commands in cli.py. See docs/retention.md.
"""
