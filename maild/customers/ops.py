"""`maild doctor`'s line about the customers: how many are in force, from where, and what
in the source does not load."""

from __future__ import annotations

from maild.config import Config
from maild.doctor import Finding, fail, ok, warn
from maild.policy.customer import index


def doctor_checks(config: Config) -> list[Finding]:
    idx = index(config)
    counts = " ".join(f"{k}={v}" for k, v in idx.counts().items())
    summary = f"{len(idx.customers)} in force ({counts or 'none'})"
    if not config.customer_source.enabled:
        return [ok("customers", f"{summary}, from {config.path}")]
    note = idx.source_note
    if note.endswith(": unreadable"):
        return [
            fail(
                "customers",
                f"{summary}; {idx.refused[0] if idx.refused else note}",
                "make [customer_source] readable by maild (maild serve refuses to start "
                "without it, or without the snapshot of a postgresql source)",
            )
        ]
    if idx.refused:
        shown = "; ".join(idx.refused[:3]) + (
            f"; and {len(idx.refused) - 3} more" if len(idx.refused) > 3 else ""
        )
        return [
            warn(
                "customers",
                f"{summary}; {note}; {len(idx.refused)} problem(s): {shown}",
                "correct the files or rows named (`maild check-config` lists them all); "
                "until then the version of each customer in force stays",
            )
        ]
    if "from the snapshot" in note:
        return [
            warn(
                "customers",
                f"{summary}; {note}",
                "the database is unreachable: maild serves the snapshot until it answers",
            )
        ]
    return [ok("customers", f"{summary}; {note}")]
