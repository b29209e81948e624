"""MAIL-stage refusals are given at RCPT (Postfix's smtpd_delay_reject), after postmaster.

A rule may refuse at MAIL (a blocked sender, an unresolvable sender domain); refusing
MAIL itself would also refuse mail to postmaster, which must always be accepted. The
pipeline keeps the MAIL-stage verdict (pipeline.mail) and this rule gives it to every
other recipient.
"""

from __future__ import annotations

from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict


@rule(Stage.RCPT, "mail-stage")
def mail_stage(ctx: Context) -> Verdict | None:
    return ctx.mail_verdict
