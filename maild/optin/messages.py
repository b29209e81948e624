"""The mail maild sends for a list: the confirmation request and the revocation notice.

The confirmation asks for a reply by mail, never a click: link scanners (Office 365 Safe
Links and the like) fetch every URL in a message, so a fetched link proves nothing. With
[web] it also offers maild's confirmation page, whose GET shows only a button: pressing
it (a POST) confirms, fetching it does not (maild.web.consent). It
states the consent text verbatim (its hash is recorded with the request), who asked and
when, and that ignoring it is enough to stay unsubscribed. It asks autoresponders to
keep quiet (Auto-Submitted, X-Auto-Response-Suppress), and maild ignores automatic
replies anyway.

The stored copy of the confirmation (part of the evidence) has the token replaced by its
hash: the ledger never holds a usable token.
"""

from __future__ import annotations

import textwrap
import uuid
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, localtime

from maild.optin.settings import ListConfig
from maild.optin.tokens import token_hash
from maild.smtp.submit import as_bytes

HOW = {
    "mailto": "by the unsubscribe message you sent",
    "one-click": "by the one-click unsubscribe link in a list message",
    "web": "on the list's web page",
    "api": "at your request, by the list's software",
    "cli": "at your request, by the list administrator",
    "email": "by your email request",
}


def message_id(hostname: str) -> str:
    return f"<optin.{uuid.uuid4().hex}@{hostname}>"


def confirm_address(lst: ListConfig, local: str, token: str) -> str:
    return f"{local}+{token}@{lst.domain}"


def _quote(text: str) -> str:
    """Each paragraph wrapped at 72 columns and indented."""
    paras = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    return "\n\n".join(
        textwrap.fill(p, 72, initial_indent="    ", subsequent_indent="    ") for p in paras if p
    )


def confirmation(
    lst: ListConfig,
    address: str,
    token: str,
    *,
    confirm_local: str,
    hostname: str,
    when: str,
    expires: str,
    ip: str = "",
    confirm_url: str = "",
) -> tuple[EmailMessage, str]:
    """The double opt-in request; returns (message, Message-ID). With `confirm_url`
    ([web]) it also offers maild's confirmation page, where only a button confirms."""
    reply_to = confirm_address(lst, confirm_local, token)
    mid = message_id(hostname)
    msg = EmailMessage()
    msg["From"] = formataddr((lst.name, lst.owner))
    msg["To"] = address
    msg["Reply-To"] = reply_to
    msg["Subject"] = f"Please confirm your subscription to {lst.name}"
    msg["Date"] = format_datetime(localtime())
    msg["Message-ID"] = mid
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    who = f" from the internet address {ip}" if ip else ""
    how = (
        f"To confirm, open this page and press its button:\n\n    {confirm_url}\n\nor reply"
        if confirm_url
        else "To confirm, reply"
    )
    only = (
        "Opening the page alone confirms nothing: only its button, or your reply, counts."
        if confirm_url
        else "Opening a link is not enough and there is none to open: only your reply counts."
    )
    body = (
        f"Someone, hopefully you, asked{who} on {when} (UTC) to subscribe\n\n"
        f"    {address}\n\n"
        f'to the mailing list "{lst.name}" <{lst.id}>, run by {lst.owner}.\n\n'
        "By confirming you agree to this:\n\n"
        f"{_quote(lst.consent_text)}\n\n"
        f"{how} to this message (the reply goes to the address below), or send a message "
        "of your own to:\n\n"
        f"    {reply_to}\n\n"
        f"{only}\n\n"
        f"This request expires on {expires} (UTC). If you did not ask to subscribe, ignore "
        "this message: you will not be subscribed and will not hear from this list again.\n"
        f"Every list message lets you leave at once; to ask a question, write to {lst.owner}.\n"
    )
    msg.set_content(body)
    return msg, mid


def redacted(msg: EmailMessage, token: str) -> bytes:
    """The confirmation as stored in the ledger: the token replaced by its hash (in the
    text, before transfer encoding: a long line's soft breaks could split it)."""
    marker = f"TOKEN-SHA256-{token_hash(token)[:32]}"
    copy = EmailMessage()
    for name, value in msg.items():
        if not name.lower().startswith("content-") and name.lower() != "mime-version":
            copy[name] = str(value).replace(token, marker)
    copy.set_content(str(msg.get_content()).replace(token, marker))
    return as_bytes(copy)


def revocation_notice(
    lst: ListConfig, address: str, *, channel: str, when: str, hostname: str
) -> tuple[EmailMessage, str]:
    """'You have been unsubscribed', sent once per revocation, from the null sender."""
    mid = message_id(hostname)
    msg = EmailMessage()
    msg["From"] = formataddr((lst.name, lst.owner))
    msg["To"] = address
    msg["Subject"] = f"You have been unsubscribed from {lst.name}"
    msg["Date"] = format_datetime(localtime())
    msg["Message-ID"] = mid
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    how = HOW.get(channel, f"({channel})")
    msg.set_content(
        f'{address} was unsubscribed from the mailing list "{lst.name}" <{lst.id}> on {when} '
        f"(UTC), {how}.\n\nYou will receive no more mail from this list. This is the only "
        "message about it; there is nothing you need to do.\n\n"
        f"If this was a mistake, subscribe again; questions to {lst.owner}.\n"
    )
    return msg, mid
