"""What makes a message list mail, and the per-message rules list mail must meet.

List mail is recognised by RFC 2919's List-Id, the other RFC 2369 List-* fields, or
`Precedence: bulk|list` (the proxy rule adds the registered return path and the bulk
detector's volume). List mail must let its recipient leave: a List-Unsubscribe with a
mailto: or https: URI, and with https the exact RFC 8058 one-click field; and it must
name its recipient, in To: or in the body, so a recipient can tell which address a list
mails (and a forwarded copy cannot hide whose consent it relies on).
"""

from __future__ import annotations

import email.message
import email.utils
import re

from maild.optin.settings import normalise_list_id
from maild.textsig import body_text

RFC2369 = (
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
ONE_CLICK = "List-Unsubscribe=One-Click"
_URI = re.compile(r"<([^<>]*)>")


def list_signals(h: email.message.Message) -> list[str]:
    """The header evidence that a message is list mail, for the refusal reason."""
    present = {name.lower() for name in h}  # one pass, not one get() per name
    out = []
    if "list-id" in present:
        out.append("List-Id")
    out += [name for name in RFC2369 if name.lower() in present]
    prec = str(h.get("Precedence", "")).strip().lower() if "precedence" in present else ""
    if prec in ("bulk", "list"):
        out.append(f"Precedence: {prec}")
    return out


def header_list_id(h: email.message.Message) -> str:
    v = h.get("List-Id")
    return normalise_list_id(str(v)) if v is not None else ""


def is_auto_reply(h: email.message.Message) -> bool:
    """RFC 3834 automatic responses (vacation replies) carry Precedence: bulk too."""
    auto = str(h.get("Auto-Submitted", "no")).strip().lower()
    return auto.startswith("auto-replied")


def automatic(h: email.message.Message, null_sender: bool) -> str:
    """Why a message is not a person's own act (''), e.g. for a confirmation."""
    if null_sender:
        return "null envelope sender (a bounce or an automatic reply)"
    auto = str(h.get("Auto-Submitted", "no")).strip().lower()
    if auto and not auto.startswith("no"):
        return f"Auto-Submitted: {auto[:40]}"
    prec = str(h.get("Precedence", "")).strip().lower()
    if prec in ("bulk", "junk", "list", "auto_reply"):
        return f"Precedence: {prec}"
    for name in ("X-Autoreply", "X-Autorespond"):
        if h.get(name) is not None:
            return f"{name} header"
    return ""


def unsubscribe_problem(h: email.message.Message, *, require_one_click: bool) -> str:
    """'' when List-Unsubscribe meets RFC 2369 and RFC 8058, else what to fix."""
    values = [str(v) for v in h.get_all("List-Unsubscribe", [])]
    if not values:
        return (
            "list mail must carry a List-Unsubscribe header (RFC 2369) with a mailto: or "
            "https: URI so that recipients can leave the list"
        )
    uris = [u.strip() for v in values for u in _URI.findall(v)]
    https = [u for u in uris if u.lower().startswith("https:")]
    mailto = [u for u in uris if u.lower().startswith("mailto:")]
    if not https and not mailto:
        return (
            "List-Unsubscribe must offer a <mailto:...> or <https://...> URI in angle "
            "brackets (RFC 2369; RFC 8058 one-click needs https)"
        )
    if https:
        posts = [str(v).strip() for v in h.get_all("List-Unsubscribe-Post", [])]
        if posts != [ONE_CLICK]:
            found = "none" if not posts else "; ".join(repr(p[:60]) for p in posts)
            return (
                f"with an https: List-Unsubscribe URI, RFC 8058 requires exactly one "
                f"'List-Unsubscribe-Post: {ONE_CLICK}' header (found: {found})"
            )
    elif require_one_click:
        return (
            "List-Unsubscribe needs an https: URI with 'List-Unsubscribe-Post: "
            f"{ONE_CLICK}' (RFC 8058 one-click); mailto: alone is not enough"
        )
    return ""


def to_addresses(h: email.message.Message) -> set[str]:
    return {
        a.lower() for _, a in email.utils.getaddresses([str(v) for v in h.get_all("To", [])]) if a
    }


def unnamed_recipients(
    content: bytes, h: email.message.Message, recipients: list[str]
) -> list[str]:
    """Recipients whose address appears neither in To: nor in the body."""
    to = to_addresses(h)
    missing = [r for r in recipients if r.lower() not in to]
    if not missing:
        return []
    end = content.find(b"\r\n\r\n")
    body = content[end + 4 :].lower() if end >= 0 else b""
    missing = [r for r in missing if r.lower().encode("utf-8", "replace") not in body]
    if not missing:
        return []
    text = body_text(content).lower()  # quoted-printable, base64, HTML
    return [r for r in missing if r.lower() not in text]
