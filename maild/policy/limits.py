"""Protocol limits that apply to everyone, postmaster included: recipients per message.

(Message size, line length, timeouts and session counts are enforced by the SMTP server
itself, where the bytes are read: maild/smtp/server.py and maild/smtp/data.py.)
"""

from __future__ import annotations

from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict, tempfail


@rule(Stage.RCPT, "recipients-per-message")
def recipients_per_message(ctx: Context) -> Verdict | None:
    limit = ctx.config.server.limits.recipients_per_message
    if len(ctx.recipients) >= limit:
        return tempfail(
            452,
            "4.5.3",
            f"Too many recipients: at most {limit} per message; send the rest in another message",
            "recipients-per-message",
        )
    return None
