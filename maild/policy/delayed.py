"""MAIL-stage refusals are given at RCPT (Postfix's smtpd_delay_reject), after postmaster.

A rule may refuse at MAIL (a blocked sender, an unresolvable sender domain); refusing
MAIL itself would also refuse mail to postmaster, which must always be accepted. The
proxy keeps the MAIL-stage verdict and this rule gives it to every other recipient.
"""

from __future__ import annotations

from maild.policy.context import Context, Stage
from maild.policy.pipeline import rule
from maild.policy.verdict import Verdict


@rule(Stage.RCPT, "mail-stage", order=1)
def mail_stage(ctx: Context) -> Verdict | None:
    return ctx.notes.get("mail-verdict")  # type: ignore[return-value]
