"""Machine-readable reports that change consent: ARF complaints and DSN bounces.

An ARF report (RFC 5965) is a multipart/report; report-type=feedback-report: a human
part, a message/feedback-report part (Feedback-Type, Original-Mail-From,
Original-Rcpt-To, Source-IP ...) and the original message or its headers. Mailbox
providers often redact the recipient; the original's return path (VERP) or To: then
identifies it. A DSN (RFC 3464) is a multipart/report; report-type=delivery-status with
one field block per recipient (Final-Recipient, Action, Status).
"""

from __future__ import annotations

import email.message
import email.policy
import email.utils
from dataclasses import dataclass, field
from email.parser import BytesParser

from maild.optin.settings import normalise_list_id

MAX_REPORT = 4 * 1024 * 1024
COMPLAINT_TYPES = ("abuse", "fraud")


def _addr(value: object) -> str:
    """'rfc822; <bob@example.org>' or '<bob@example.org>' -> 'bob@example.org'."""
    s = str(value or "").strip()
    if ";" in s:
        kind, _, s = s.partition(";")
        if kind.strip().lower() not in ("rfc822", ""):
            return ""
    _, a = email.utils.parseaddr(s.strip())
    return a.lower() if "@" in a else ""


@dataclass
class Complaint:
    feedback_type: str
    reporter: str = ""  # the report's User-Agent field
    source_ip: str = ""
    mail_from: str = ""  # Original-Mail-From, else the original's Return-Path
    rcpt_to: list[str] = field(default_factory=list)  # Original-Rcpt-To
    list_id: str = ""  # the original's List-Id
    to: list[str] = field(default_factory=list)  # the original's To:
    message_id: str = ""  # the original's Message-ID
    arrival: str = ""


@dataclass
class Bounce:
    recipient: str
    status: str
    action: str
    diagnostic: str = ""


def _parse(content: bytes) -> email.message.Message | None:
    if len(content) > MAX_REPORT:
        return None
    try:
        return BytesParser(policy=email.policy.compat32).parsebytes(content)
    except Exception:  # noqa: BLE001  a malformed report is simply not a report
        return None


def _report(msg: email.message.Message, kind: str) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "")).lower() == kind
    )


def _blocks(part: email.message.Message) -> list[email.message.Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, email.message.Message)]
    return []


def parse_arf(content: bytes) -> Complaint | None:
    msg = _parse(content)
    if msg is None or not _report(msg, "feedback-report"):
        return None
    fields: email.message.Message | None = None
    original: email.message.Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and fields is None:
            blocks = _blocks(part)
            fields = blocks[0] if blocks else None
        elif ctype in ("message/rfc822", "message/global") and original is None:
            blocks = _blocks(part)
            original = blocks[0] if blocks else None
        elif ctype == "text/rfc822-headers" and original is None:
            text = part.get_payload(decode=True) or b""
            original = BytesParser(policy=email.policy.compat32).parsebytes(
                text if isinstance(text, bytes) else b"", headersonly=True
            )
    if fields is None:
        return None
    c = Complaint(
        feedback_type=str(fields.get("Feedback-Type", "")).strip().lower(),
        reporter=str(fields.get("User-Agent", "")).strip()[:200],
        source_ip=str(fields.get("Source-IP", "")).strip()[:60],
        mail_from=_addr(fields.get("Original-Mail-From")),
        rcpt_to=[a for a in (_addr(v) for v in fields.get_all("Original-Rcpt-To", [])) if a],
        arrival=str(fields.get("Arrival-Date", "")).strip()[:80],
    )
    if original is not None:
        if not c.mail_from:
            c.mail_from = _addr(original.get("Return-Path"))
        lid = original.get("List-Id")
        c.list_id = normalise_list_id(str(lid)) if lid is not None else ""
        c.to = [
            a.lower()
            for _, a in email.utils.getaddresses([str(v) for v in original.get_all("To", [])])
            if "@" in a
        ]
        c.message_id = str(original.get("Message-ID", "")).strip()[:300]
    return c


def parse_dsn(content: bytes) -> list[Bounce]:
    """Permanent failures reported by a DSN (Action: failed, Status: 5.x.x)."""
    msg = _parse(content)
    if msg is None or not _report(msg, "delivery-status"):
        return []
    out: list[Bounce] = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = _blocks(part)
        for b in blocks[1:]:  # the first block is per-message
            action = str(b.get("Action", "")).strip().lower()
            status = str(b.get("Status", "")).strip().split(" ")[0]
            rcpt = _addr(b.get("Original-Recipient")) or _addr(b.get("Final-Recipient"))
            if action == "failed" and status.startswith("5.") and rcpt:
                out.append(
                    Bounce(
                        rcpt,
                        status,
                        action,
                        " ".join(str(b.get("Diagnostic-Code", "")).split())[:300],
                    )
                )
    return out


def address_failure(status: str) -> bool:
    """Statuses that say the address itself is bad (not a policy or content refusal)."""
    return status.startswith("5.1.") or status in ("5.2.1",)
