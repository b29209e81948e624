"""Opt-in enforcement: list mail only to recipients whose consent maild can prove.

The sources: "Opt-in mailing lists are allowed, where it can be proved that subscribers
did opt-in and that a suitable opt-out mechanism is available"; "may not run
unauthorised mailing lists"; "include the recipient's e-mail address in the e-mail body
or TO line". The ledger and its evidence are in maild.optin; this module is the proxy's
side of it.

Mail from a customer (identified by login or network: a sender domain anyone can forge
never earns a strike) is list mail when its envelope sender is a registered list's
return path, it has List-Id or another RFC 2369 field, `Precedence: bulk|list` (not on
an RFC 3834 auto-reply), or the bulk detector saw the same content going to many
recipients. Then:

* no registered list of that customer: 550 5.7.1 "unregistered mailing list", a strike;
* each recipient must be confirmed: refused per recipient at RCPT when the return path
  names the list at MAIL time, else at end of data for the whole message;
* List-Unsubscribe (mailto: or https: with the exact RFC 8058 one-click field), and the
  recipient's address in To: or in the body.

Postmaster and abuse recipients are never judged (the postmaster rule ends the stage).
Mail *to* maild's confirm+TOKEN@ addresses is checked here (an unknown or expired token
is refused with a reason the subscriber can act on); what accepted mail means for
consent is recorded by the finish hook (maild.optin.inbound).
"""

from __future__ import annotations

from dataclasses import dataclass

from maild.optin import inbound
from maild.optin import ledger as _ledger  # noqa: F401  (registers the schema)
from maild.optin.detect import (
    header_list_id,
    is_auto_reply,
    list_signals,
    unnamed_recipients,
    unsubscribe_problem,
)
from maild.optin.model import Standing, State, iso
from maild.optin.registry import MailingList
from maild.optin.service import OptinService
from maild.optin.settings import section
from maild.optin.tokens import token_hash
from maild.policy import bulk
from maild.policy.context import Context, Stage
from maild.policy.rules import on_finish, rule
from maild.policy.verdict import Verdict, reject


@dataclass(frozen=True)
class ListMail:
    """Why a message is list mail, and the registered list it belongs to (if any)."""

    signals: tuple[str, ...]
    lst: MailingList | None


def _service(ctx: Context) -> OptinService | None:
    svc = ctx.services.optin
    if svc is None or not section(ctx.config).enabled:
        return None
    return svc


def _enforced(ctx: Context) -> bool:
    return ctx.identity.may_relay


def _day(ts: str) -> str:
    return ts[:10] or "an unknown date"


def refusal(st: Standing, list_id: str) -> str:
    """Why one recipient may not get this list's mail, and what to do about it."""
    if st.state is State.PENDING:
        return (
            f"has not confirmed the subscription to list {list_id} (pending since "
            f"{_day(st.since)}); send list mail only after the subscriber confirmed"
        )
    if st.state is State.REVOKED:
        return (
            f"unsubscribed from list {list_id} on {_day(st.since)}; remove this address "
            "from the list"
        )
    if st.state is State.SUPPRESSED:
        why = {"complaint": "a spam complaint", "bounce": "a permanent bounce"}.get(
            st.basis, st.basis
        )
        return (
            f"is suppressed on list {list_id} since {_day(st.since)} after {why}; remove "
            "this address from the list"
        )
    return (
        f"is not a subscriber of list {list_id} with recorded consent; subscribers must "
        "confirm (double opt-in) before they get list mail"
    )


def _return_path_list(ctx: Context, svc: OptinService) -> MailingList | None:
    key = "optin-rp"
    if key not in ctx.notes:
        lst = None
        if ctx.identity.customer is not None and ctx.sender is not None and not ctx.sender.is_null:
            lst = svc.registry(ctx.config).for_return_path(ctx.identity.name, ctx.sender.addr)
        ctx.notes[key] = lst
    return ctx.notes[key]  # type: ignore[return-value]


async def _check_token(svc: OptinService, ctx: Context, token: str) -> Verdict | None:
    t = await svc.find_token(token_hash(token))
    if t is None:
        return reject(
            550,
            "5.1.1",
            "This confirmation address is not valid (unknown "
            "code); to subscribe, ask the list again for a new confirmation message",
            "optin-confirm",
        )
    if not t.used and t.expires < svc.clock():
        return reject(
            550,
            "5.7.1",
            f"This confirmation request expired on "
            f"{iso(t.expires)[:16].replace('T', ' ')} UTC; ask the list again for a "
            "new confirmation message",
            "optin-confirm",
        )
    return None


@rule(Stage.RCPT, "optin")
async def optin_rcpt(ctx: Context) -> Verdict | None:
    svc = _service(ctx)
    if svc is None:
        return None
    rcpt = ctx.rcpt
    assert rcpt is not None
    token = svc.registry(ctx.config).confirm_token(
        rcpt.local, rcpt.domain, section(ctx.config).confirm_local_part
    )
    if token is not None:
        return await _check_token(svc, ctx, token)
    if not _enforced(ctx):
        return None
    lst = _return_path_list(ctx, svc)
    if lst is None:
        return None
    st = await svc.standing_before_refusal(lst.id, rcpt.addr, ctx.config)
    if st.sendable:
        return None
    return reject(550, "5.7.1", f"<{rcpt.addr}> {refusal(st, lst.id)}", "optin-consent")


def classify(ctx: Context, svc: OptinService) -> ListMail | None:
    """Is this customer's message list mail, and of which registered list? (cached)"""
    if "optin-class" in ctx.notes:
        return ctx.notes["optin-class"]  # type: ignore[return-value]
    result = None
    if _enforced(ctx) and ctx.message is not None and ctx.identity.customer is not None:
        h = ctx.message.headers
        null = ctx.sender is None or ctx.sender.is_null
        signals: list[str] = []
        lst = _return_path_list(ctx, svc)
        if lst is not None:
            signals.append(f"envelope sender is the return path of list {lst.id}")
        header = list_signals(h)
        if (
            header
            and all(s.startswith("Precedence") for s in header)
            and (null or is_auto_reply(h))
        ):
            header = []  # an RFC 3834 auto-reply is not list mail
        signals += header
        score = ctx.notes.get("bulk-score")
        limit = bulk.section(ctx).threshold
        if isinstance(score, int | float) and score >= limit:
            signals.append(f"{ctx.notes.get('bulk-copies', '?')} substantially similar messages")
        if signals:
            if lst is None:
                cand = svc.registry(ctx.config).get(header_list_id(h))
                if cand is not None and cand.customer == ctx.identity.name:
                    lst = cand
            result = ListMail(tuple(signals), lst)
    ctx.notes["optin-class"] = result
    return result


def _unregistered(ctx: Context, cls: ListMail) -> Verdict:
    assert ctx.message is not None
    lid = header_list_id(ctx.message.headers)
    sender = ctx.sender.addr if ctx.sender is not None and not ctx.sender.is_null else ""
    what = (
        f"List-Id <{lid}>"
        if lid
        else (f"the envelope sender <{sender}>" if sender else "this message")
    )
    return reject(
        550,
        "5.7.1",
        f"Unregistered mailing list: this message is list mail "
        f"({'; '.join(cls.signals)}) but {ctx.identity.name} has no registered list "
        f"for {what}; register the list with your provider (List-Id, return path, "
        "consent text) and send list mail only to confirmed subscribers",
        "optin-unregistered",
        strike=True,
    )


@rule(Stage.DATA, "optin")
def optin_data(ctx: Context) -> Verdict | None:
    svc = _service(ctx)
    if svc is None:
        return None
    cls = classify(ctx, svc)
    if cls is None:
        return None
    if cls.lst is None:
        return _unregistered(ctx, cls)
    assert ctx.message is not None
    lst = cls.lst
    bad = [
        (a.addr, st)
        for a in ctx.recipients
        if not (st := svc.standing(lst.id, a.addr, ctx.config)).sendable
    ]
    if bad:
        shown = ", ".join(f"<{a}> ({st.state})" for a, st in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        return reject(
            550,
            "5.7.1",
            f"List mail for {lst.id} to recipients without confirmed "
            f"opt-in: {shown}{more}; remove them, or send from the list's return path "
            "so that they are refused one by one",
            "optin-consent",
        )
    h = ctx.message.headers
    problem = unsubscribe_problem(h, require_one_click=section(ctx.config).require_one_click)
    if problem:
        return reject(
            550, "5.7.1", f"List mail for {lst.id} refused: {problem}", "optin-unsubscribe"
        )
    unnamed = unnamed_recipients(ctx.message.content, h, [a.addr for a in ctx.recipients])
    if unnamed:
        if len(ctx.recipients) == 1:
            reason = (
                f"List mail for {lst.id} must name its recipient: <{unnamed[0]}> appears "
                "neither in To: nor in the body; address each copy to its subscriber"
            )
        else:
            reason = (
                f"List mail for {lst.id} went to {len(ctx.recipients)} recipients with a "
                f"To: that does not name them (Bcc-style; {len(unnamed)} not named in To: "
                "or the body); send one message per subscriber with its address in To: "
                "or the body"
            )
        return reject(550, "5.7.1", reason, "optin-recipient")
    ctx.notes["optin-deliver"] = lst.id
    return None


def vouch(ctx: Context) -> bool:
    """Bulk exemption: a registered list's mail to confirmed subscribers only."""
    svc = _service(ctx)
    if svc is None:
        return False
    cls = classify(ctx, svc)
    return (
        cls is not None
        and cls.lst is not None
        and all(svc.standing(cls.lst.id, a.addr, ctx.config).sendable for a in ctx.recipients)
    )


if vouch not in bulk.EXEMPTIONS:
    bulk.EXEMPTIONS.append(vouch)


@on_finish
def optin_finish(ctx: Context, accepted: bool) -> None:
    """Accepted mail only: delivered counts (complaint rates) and consent changes."""
    svc = _service(ctx)
    if svc is None or not accepted:
        return
    list_id = ctx.notes.get("optin-deliver")
    if isinstance(list_id, str):
        svc.count_delivered(list_id, len(ctx.recipients))
    inbound.on_accepted(svc, ctx)
