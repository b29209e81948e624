"""[web] require_one_click: list mail must carry maild's own one-click URL for its recipient.

Gmail and Yahoo ask bulk senders for RFC 8058 one-click unsubscribe honoured within two
days; when maild serves the URL itself, the unsubscribe is honoured at once and
recorded first-hand. This rule runs after the opt-in rule passed a message of a
registered list (so the message has an acceptable List-Unsubscribe already) and asks
that its http(s) URI is maild's one-click URL for that list and each recipient, and
that it has no other: RFC 8058 allows one HTTPS URI, and a mail client that finds two
posts to either, so a second one (the customer's own, or another recipient's) could
take the unsubscribe or give it to the wrong address.
"""

from __future__ import annotations

from maild.log import clean
from maild.optin.detect import _URI
from maild.policy.context import Context, Stage
from maild.policy.rules import rule
from maild.policy.verdict import Verdict, reject
from maild.web import oneclick
from maild.web.settings import section


@rule(Stage.DATA, "optin-one-click")
async def optin_one_click(ctx: Context) -> Verdict | None:
    w = section(ctx.config)
    list_id = ctx.notes.get("optin-deliver")  # set by the opt-in rule when it passed
    web = ctx.services.web
    if not (w.enabled and w.require_one_click) or not isinstance(list_id, str) or web is None:
        return None
    assert ctx.message is not None
    uris = [
        u.strip()
        for v in ctx.message.headers.get_all("List-Unsubscribe", [])
        for u in _URI.findall(str(v))
    ]
    key = await web.list_key(list_id)
    web_uris = [u for u in uris if u.lower().startswith(("http:", "https:"))]
    other = [u for u in web_uris if not oneclick.parse(w.base_url, u)]
    if other and len(other) < len(web_uris):
        return reject(
            550,
            "5.7.1",
            f"List mail for {list_id} refused: its List-Unsubscribe "
            f"has an http(s) URI <{clean(other[0], 100)}> besides this provider's "
            "one-click URL; RFC 8058 allows one, and a mail client may post to "
            "either: remove it",
            "optin-one-click",
        )
    # Every http(s) URI must be the recipient's own: a mail client posts to one of them,
    # so another recipient's URL in the same message would unsubscribe that recipient.
    missing = [
        a.addr
        for a in ctx.recipients
        if not web_uris
        or not all(oneclick.for_recipient(w.base_url, key, u, list_id, a.addr) for u in web_uris)
    ]
    if not missing:
        return None
    how = (
        f"maild optin unsubscribe-url {list_id} ADDRESS prints it; list software can "
        "compute it with the list's key (docs/optin.md)"
    )
    if not any(oneclick.parse(w.base_url, u) for u in uris):
        why = (
            f"its List-Unsubscribe has no one-click URL of this provider "
            f"({oneclick.prefix(w.base_url)}...), which is required here; add "
            f"<{oneclick.prefix(w.base_url)}...> for each recipient ({how})"
        )
    else:
        shown = ", ".join(f"<{a}>" for a in missing[:3]) + (" ..." if len(missing) > 3 else "")
        why = (
            f"its one-click List-Unsubscribe URL is not the one for {shown} (each "
            f"recipient has its own; send one message per subscriber; {how})"
        )
    return reject(550, "5.7.1", f"List mail for {list_id} refused: {why}", "optin-one-click")
