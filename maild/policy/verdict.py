"""What a rule answers: accept, tempfail or reject, with an RFC 3463 code and a reason.

A reason is written for the customer who reads the bounce: it says what happened and
what to do about it, never only which rule fired (the rule name goes to the log).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    ACCEPT = "accept"
    TEMPFAIL = "tempfail"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    code: int
    status: str  # enhanced status code, RFC 3463, e.g. "5.7.1"
    reason: str
    rule: str = "-"
    # A final accept stops the stage: later rules are not asked (postmaster).
    final: bool = False
    # A reject that counts as a strike against the customer (sanctions).
    strike: bool = False
    # The recipient is a postmaster address: the transaction takes only such recipients.
    postmaster: bool = False

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.reason}"

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


def accept(
    rule: str = "-", *, final: bool = False, reason: str = "Ok", postmaster: bool = False
) -> Verdict:
    return Verdict(Action.ACCEPT, 250, "2.0.0", reason, rule, final=final, postmaster=postmaster)


def reject(code: int, status: str, reason: str, rule: str, *, strike: bool = False) -> Verdict:
    assert 500 <= code < 600 and status.startswith("5.")
    return Verdict(Action.REJECT, code, status, reason, rule, strike=strike)


def tempfail(code: int, status: str, reason: str, rule: str, *, strike: bool = False) -> Verdict:
    assert 400 <= code < 500 and status.startswith("4.")
    return Verdict(Action.TEMPFAIL, code, status, reason, rule, strike=strike)
