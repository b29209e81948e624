"""`maild check-message`: every forged-header check on a saved message, before enabling one.

Operators run a complaint's or a customer's .eml through the checks as if the customer
had just submitted it, and see each check's result and the reply maild would give,
under the policy in policies.toml (overrides, tag mode and [dns] included). Nothing is
sent, counted or logged. Only the header checks run (not relay, rate limits, ...).
A saved message does not carry the client's HELO: without --helo the HELO checks
are skipped, not failed, so they do not hide the verdict that matters.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from maild.policy.services import Services


def _crlf(data: bytes) -> bytes:
    """A file saved with LF line ends, as SMTP would carry it (CRLF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@click.command("check-message")
@click.argument("file", type=click.File("rb"), metavar="FILE")
@click.option(
    "--customer",
    metavar="NAME",
    help="Judge it as submitted by this customer (by network; with --login, by login).",
)
@click.option("--login", metavar="LOGIN", help="The SASL login it was submitted with.")
@click.option(
    "--client",
    "client_addr",
    metavar="IP",
    help="The client's IP address (also "
    "identifies the customer by network when --customer is not given).",
)
@click.option(
    "--helo",
    metavar="NAME",
    help="The client's HELO/EHLO name; without it the HELO "
    "checks are skipped ('' judges a client that sent none).",
)
@click.option(
    "--mail-from",
    "mail_from",
    metavar="ADDR",
    help="The envelope sender ('<>' "
    "for the null sender); default: the message's Return-Path:, if any.",
)
@click.option("--smtputf8", is_flag=True, help="As if sent with MAIL FROM ... SMTPUTF8.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_message(
    file: Any,
    customer: str | None,
    login: str | None,
    client_addr: str | None,
    helo: str | None,
    mail_from: str | None,
    smtputf8: bool,
    as_json: bool,
) -> None:
    """Run every forged-header check on FILE (a saved .eml, '-' for stdin).

    Exit status: 0 when maild would relay the message (tags allowed), 1 when it would
    refuse it, 2 on bad usage or a broken policies.toml.
    """
    from maild.clitools import echo_json, load_config, run_async

    config = load_config()
    data = file.read(config.server.limits.message_size + 1)
    if not data.strip():
        raise click.BadParameter("the file is empty", param_hint="FILE")
    if len(data) > config.server.limits.message_size:
        raise click.BadParameter(
            f"larger than message_size ({config.server.limits.message_size} "
            "bytes): maild would refuse it before any header check",
            param_hint="FILE",
        )
    if client_addr is not None:
        try:
            ipaddress.ip_address(client_addr)
        except ValueError:
            raise click.BadParameter(
                f"{client_addr!r} is not an IP address", param_hint="--client"
            ) from None
    quiet = logging.getLogger("maild.policy")
    quiet.disabled = True  # a dry run: DNS failures show in the output, not in the mail log
    try:
        report = run_async(
            _run(
                config,
                _crlf(data),
                customer=customer,
                login=login or "",
                client_addr=client_addr or "",
                helo=helo,
                mail_from=mail_from,
                smtputf8=smtputf8,
            )
        )
    finally:
        quiet.disabled = False
    report["file"] = getattr(file, "name", "-")
    if as_json:
        echo_json(report)
    else:
        _print(report)
    if report["verdict"]["action"] != "relay":
        raise SystemExit(1)


async def _run(
    config: Any,
    content: bytes,
    *,
    customer: str | None,
    login: str,
    client_addr: str,
    helo: str | None,
    mail_from: str | None,
    smtputf8: bool,
    services: Services | None = None,
) -> dict[str, Any]:
    from maild import dns as maild_dns
    from maild.address import PathError, parse_path
    from maild.policy import chain
    from maild.policy import checks as h
    from maild.policy.context import Client, Context, Identity, Message
    from maild.policy.customer import resolve
    from maild.policy.identity import HELO_CHECKS
    from maild.policy.services import Services

    maild_dns.configure(config)
    message = Message(content)
    if mail_from is None:
        rp = message.headers.get("Return-Path")
        mail_from = " ".join(str(rp).split()) if rp is not None else None
    sender = None
    if mail_from is not None:
        raw = mail_from.strip()
        try:
            if raw.startswith("<") != raw.endswith(">") or raw.count("<") > 1:
                raise PathError("unbalanced angle brackets")
            sender = parse_path(raw if raw.startswith("<") else f"<{raw}>")
        except PathError as e:
            raise click.BadParameter(f"{mail_from!r}: {e}", param_hint="--mail-from") from None
    client = Client(addr=client_addr, helo=helo or "")
    if customer is not None:
        c = config.customer(customer)
        if c is None:
            known = ", ".join(x.name for x in config.customers) or "none"
            raise click.BadParameter(
                f"no customer {customer!r} in {config.path} (known: {known})",
                param_hint="--customer",
            )
        identity = Identity(c, "login" if login else "network", login)
    elif login or client_addr:
        identity = resolve(config, client, login, sender)
    else:
        identity = Identity()
    ctx = Context(
        config=config,
        session_id="check-message",
        client=client,
        identity=identity,
        sender=sender,
        mail_params=["SMTPUTF8"] if smtputf8 else [],
        message=message,
        services=services or Services(),
    )
    ctx.notes["dry-run"] = True
    results, verdict = [], None
    for d in chain.describe_checks():
        c = chain.CHECKS[d["name"]]
        ctx.stage = c.stage
        row: dict[str, Any] = {"name": c.name, "stage": c.stage.value}
        skip = (
            "no --helo given" if helo is None and c.name in HELO_CHECKS else h.skip_reason(c, ctx)
        )
        if skip is not None:
            row.update(result="skip", why=skip)
        elif (f := await h.evaluate(c, ctx)) is None:
            row.update(result="pass")
        else:
            action, v = h.outcome(c, ctx, f)
            row.update(result="fail", action=action, reason=f.reason)
            if v is not None:
                row["reply"] = v.reply
                verdict = verdict or {"action": v.action.value, "rule": c.name, "reply": v.reply}
            else:
                row["header"] = f"{h.VERDICT_HEADER}: {h.tag_value(c, ctx, f)}"
        results.append(row)
    who = identity.name + (f" (by {identity.by})" if identity.customer else " (not identified)")
    return {
        "customer": who,
        "client": client_addr,
        "helo": helo or "",
        "mail_from": None if sender is None else f"<{sender.addr}>",
        "mode": h.mode(ctx),
        "checks": results,
        "verdict": verdict or {"action": "relay", "rule": "-", "reply": ""},
    }


def _print(report: dict[str, Any]) -> None:
    click.echo(
        f"{report['file']}: customer={report['customer']} "
        f"client={report['client'] or '-'} helo={report['helo'] or '-'} "
        f"mail_from={report['mail_from'] or '-'} mode={report['mode']}"
    )
    width = max(len(r["name"]) for r in report["checks"])
    for r in report["checks"]:
        name = r["name"].ljust(width)
        if r["result"] == "pass":
            click.echo(f"  pass  {r['name']}")
        elif r["result"] == "skip":
            click.echo(f"  skip  {name}  ({r['why']})")
        elif "reply" in r:
            click.echo(f"  FAIL  {name}  {r['action']}: {r['reply']}")
        else:
            click.echo(f"  FAIL  {name}  {r['action']}: {r['reason']}")
    v = report["verdict"]
    if v["action"] == "relay":
        tags = sum(1 for r in report["checks"] if r["result"] == "fail" and "header" in r)
        click.echo("verdict: relay" + (f" with {tags} X-Maild-Verdict header(s)" if tags else ""))
    else:
        click.echo(f"verdict: {v['action']} by {v['rule']}: {v['reply']}")
