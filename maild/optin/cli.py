"""`maild optin ...`: lists, subscription requests, attestations, revocations, evidence.

Every command writes to the state store and leaves a `control` row, so a running
`maild serve` applies the change within two seconds (a confirmation reply for a token
issued a moment ago is looked up in the store at once). There is no command that
confirms a subscription: only the subscriber's own reply is a confirmation.
"""

from __future__ import annotations

import getpass
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from maild.clitools import echo_json, load_config, open_store, run_async
from maild.config import Config
from maild.optin import actions, evidence
from maild.optin.actions import ActionError
from maild.optin.ledger import Ledger
from maild.optin.model import Kind, State, fold
from maild.optin.registry import MailingList, Registry
from maild.optin.settings import LIST_ID, ListConfig, normalise_list_id, section, valid_pattern

JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
REQUEST_CHANNELS = ("web", "email", "api")
REVOKE_CHANNELS = ("cli", "one-click", "web", "email", "api")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _actor(actor: str | None) -> str:
    return actor or f"cli:{_user()}"


async def _with_ledger(config: Config, fn: Any) -> Any:
    store = await open_store(config)
    try:
        return await fn(Ledger(store))
    finally:
        await store.close()


def _run(config: Config, fn: Any) -> Any:
    try:
        return run_async(_with_ledger(config, fn))
    except ActionError as e:
        raise click.ClickException(str(e)) from None


def _downstream(config: Config) -> Any:
    from maild.smtp.downstream import Downstream

    host, port = config.server.downstream
    return Downstream(
        host,
        port,
        local_hostname=config.server.hostname,
        timeout=min(config.server.downstream_timeout, 30.0),
        pool_size=1,
    )


async def _registry(config: Config, ledger: Ledger) -> Registry:
    return Registry.build(section(config), await ledger.stored_lists())


async def _need_list(config: Config, ledger: Ledger, list_id: str) -> MailingList:
    reg = await _registry(config, ledger)
    lst = reg.get(normalise_list_id(list_id))
    if lst is None:
        known = ", ".join(sorted(reg.lists)) or "none"
        raise click.BadParameter(
            f"no registered list {list_id!r} (known: {known}); see `maild optin lists`",
            param_hint="LIST",
        )
    return lst


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise click.BadParameter(
            f"cannot read {path}: {e.strerror}", param_hint="--evidence"
        ) from None
    if not data:
        raise click.BadParameter(f"{path} is empty", param_hint="--evidence")
    return data


def _when(ts: str) -> str:
    return ts[:19].replace("T", " ") if ts else "-"


@click.group("optin")
def optin() -> None:
    """Opt-in list evidence: registered lists, consent events, evidence bundles."""


# -------------------------------------------------------------- lists


@optin.command("lists")
@JSON
def lists_cmd(as_json: bool) -> None:
    """Registered lists (policies.toml and store) with subscribers per state."""
    config = load_config()

    async def collect(ledger: Ledger) -> list[dict]:
        reg = await _registry(config, ledger)
        out = []
        for lid, lst in sorted(reg.lists.items()):
            subs = await evidence.subscribers(
                ledger, lid, attested_ok=section(config).attested_consent
            )
            counts = Counter(str(st.state) for st in subs.values())
            problems = []
            if config.customer(lst.customer) is None:
                problems.append(f"no customer named {lst.customer}")
            if lst.cfg.domain not in config.hosted_domains:
                problems.append(f"domain {lst.cfg.domain} is not a hosted domain")
            out.append(
                {
                    "id": lid,
                    "source": lst.source,
                    "customer": lst.customer,
                    "owner": lst.cfg.owner,
                    "name": lst.cfg.name,
                    "domain": lst.cfg.domain,
                    "return_paths": list(lst.cfg.return_paths),
                    "unsubscribe": list(lst.cfg.unsubscribe),
                    "consent_hash": lst.cfg.consent_hash,
                    "subscribers": {
                        s.value: counts.get(s.value, 0) for s in State if s is not State.UNKNOWN
                    },
                    "problems": problems,
                }
            )
        return out

    rows = _run(config, collect)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no lists registered (see docs/optin.md)", err=True)
    for r in rows:
        s = r["subscribers"]
        click.echo(
            f"{r['id']} ({r['source']}): customer={r['customer']} owner={r['owner']} "
            f"confirmed={s['confirmed']} pending={s['pending']} "
            f"revoked={s['revoked']} suppressed={s['suppressed']}"
        )
        click.echo(
            f"  return paths: {', '.join(r['return_paths']) or '-'}; unsubscribe: "
            f"{', '.join(r['unsubscribe']) or '-'}; confirm replies: "
            f"confirm+TOKEN@{r['domain']}"
        )
        for p in r["problems"]:
            click.echo(f"  problem: {p}")


@optin.group("list")
def list_group() -> None:
    """Register or unregister a list in the state store."""


@list_group.command("register")
@click.argument("list_id", metavar="ID")
@click.option("--customer", required=True, help="The customer that runs the list.")
@click.option(
    "--owner", required=True, help="The list owner's address (From: of the confirmation mail)."
)
@click.option("--name", default="", help="Display name (default: the List-Id).")
@click.option(
    "--domain",
    default="",
    help="Where confirm+TOKEN@ replies arrive (a hosted domain; default: the owner's domain).",
)
@click.option(
    "--return-path",
    "return_paths",
    multiple=True,
    metavar="PATTERN",
    help="Envelope sender of the list's mail; '*' for VERP (repeatable).",
)
@click.option(
    "--unsubscribe",
    multiple=True,
    metavar="PATTERN",
    help="Address of the List-Unsubscribe mailto: (repeatable).",
)
@click.option("--consent-text", default=None, help="What subscribers agree to.")
@click.option(
    "--consent-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="... or a UTF-8 file with it.",
)
@click.option("--replace", is_flag=True, help="Replace a list registered earlier.")
@JSON
def list_register(
    list_id: str,
    customer: str,
    owner: str,
    name: str,
    domain: str,
    return_paths: tuple[str, ...],
    unsubscribe: tuple[str, ...],
    consent_text: str | None,
    consent_file: str | None,
    replace: bool,
    as_json: bool,
) -> None:
    """Register list ID (an RFC 2919 List-Id such as news.customer.example)."""
    config = load_config()
    lid = normalise_list_id(list_id)
    if not LIST_ID.match(lid):
        raise click.BadParameter(
            f"{list_id!r}: expected an RFC 2919 List-Id such as news.customer.example",
            param_hint="ID",
        )
    if config.customer(customer) is None:
        known = ", ".join(c.name for c in config.customers) or "none"
        raise click.BadParameter(
            f"no customer named {customer!r} in {config.path} (known: {known})",
            param_hint="--customer",
        )
    owner = owner.strip().lower()
    if not valid_pattern(owner) or "*" in owner:
        raise click.BadParameter(f"{owner!r} is not an address", param_hint="--owner")
    for opt, vals in (("--return-path", return_paths), ("--unsubscribe", unsubscribe)):
        for p in vals:
            if not valid_pattern(p):
                raise click.BadParameter(
                    f"{p!r}: expected an address or a pattern with * in the local part",
                    param_hint=opt,
                )
    if (consent_text is None) == (consent_file is None):
        raise click.UsageError("give --consent-text or --consent-file (one of them)")
    text = (
        consent_text
        if consent_text is not None
        else Path(consent_file or "").read_text(encoding="utf-8")
    )
    if not text.strip():
        raise click.BadParameter("the consent text is empty", param_hint="--consent-text")
    domain = (domain or owner.rpartition("@")[2]).lower().rstrip(".")
    if domain not in config.hosted_domains:
        click.echo(
            f"warning: {domain} is not a hosted domain of {config.path}: confirmation "
            "replies to confirm+TOKEN@ will not pass through maild",
            err=True,
        )
    lst = ListConfig(
        id=lid,
        customer=customer,
        owner=owner,
        consent_text=text.strip(),
        domain=domain,
        name=name or lid,
        return_paths=tuple(p.lower() for p in return_paths),
        unsubscribe=tuple(p.lower() for p in unsubscribe),
    )

    async def do(ledger: Ledger) -> None:
        from maild.antispam.sanctions import control
        from maild.store.base import StoreError

        if any(x.id == lid for x in section(config).lists):
            raise ActionError(f"list {lid} is defined in {config.path}; change it there")
        try:
            await ledger.register_list(lst, _actor(None), replace=replace)
        except StoreError as e:
            if "unique" in str(e).lower():
                raise ActionError(
                    f"list {lid} is already registered; --replace to change it"
                ) from None
            raise
        await control(ledger.store, "optin-lists", lid)

    _run(config, do)
    if as_json:
        echo_json(
            {
                "id": lid,
                "customer": customer,
                "owner": owner,
                "domain": domain,
                "consent_hash": lst.consent_hash,
            }
        )
    else:
        click.echo(
            f"list {lid} registered for {customer}; consent text sha256:{lst.consent_hash[:16]}"
        )


@list_group.command("unregister")
@click.argument("list_id", metavar="ID")
@JSON
def list_unregister(list_id: str, as_json: bool) -> None:
    """Unregister a store list; its consent events are kept (they are evidence)."""
    config = load_config()
    lid = normalise_list_id(list_id)

    async def do(ledger: Ledger) -> bool:
        from maild.antispam.sanctions import control

        gone = await ledger.unregister_list(lid)
        if gone:
            await control(ledger.store, "optin-lists", lid)
        return gone

    if not _run(config, do):
        raise click.ClickException(f"no list {lid} registered in the store")
    if as_json:
        echo_json({"id": lid, "unregistered": True})
    else:
        click.echo(f"list {lid} unregistered; its events are kept")


# -------------------------------------------------------------- events


@optin.command("request")
@click.argument("list_id", metavar="LIST")
@click.argument("address")
@click.option("--ip", default="", help="The subscriber's IP address (web form).")
@click.option("--user-agent", default="", help="The subscriber's browser (web form).")
@click.option(
    "--evidence",
    "evidence_file",
    metavar="FILE",
    default=None,
    help="The raw request (web log lines, the subscription mail); '-' = stdin.",
)
@click.option(
    "--channel",
    type=click.Choice(REQUEST_CHANNELS),
    default="web",
    show_default=True,
    help="How the subscriber asked.",
)
@click.option("--actor", default=None, help="Who relays the request (default cli:USER).")
@JSON
def request_cmd(
    list_id: str,
    address: str,
    ip: str,
    user_agent: str,
    evidence_file: str | None,
    channel: str,
    actor: str | None,
    as_json: bool,
) -> None:
    """Record a subscription request and send ADDRESS the confirmation mail.

    The subscriber is subscribed only when they reply (double opt-in); the reply
    passes through maild and is kept with all its headers.
    """
    config = load_config()
    raw = _read(evidence_file)

    async def do(ledger: Ledger) -> actions.RequestResult:
        lst = await _need_list(config, ledger, list_id)
        ds = _downstream(config)
        try:
            return await actions.request(
                ledger,
                config,
                ds,
                lst.cfg,
                address,
                channel=channel,
                actor=_actor(actor),
                ip=ip,
                user_agent=user_agent,
                evidence=raw,
            )
        finally:
            await ds.close()

    res = _run(config, do)
    out = {
        "list_id": res.event.list_id,
        "address": res.event.address,
        "seq": res.event.seq,
        "confirmation_message_id": res.message_id,
        "sent": res.sent,
        "downstream_reply": res.reply,
        "expires": res.event.detail.get("expires"),
    }
    if as_json:
        echo_json(out)
    else:
        click.echo(
            f"request recorded: list={out['list_id']} address={out['address']} "
            f"seq={out['seq']} expires={_when(str(out['expires']))}"
        )
        click.echo(f"confirmation mail: {'sent' if res.sent else 'NOT SENT'} ({res.reply})")
    if not res.sent:
        sys.exit(1)


@optin.command("add")
@click.argument("list_id", metavar="LIST")
@click.argument("address")
@click.option(
    "--source",
    required=True,
    help="Where and how consent was obtained (e.g. 'web form double opt-in on shop.example').",
)
@click.option(
    "--obtained",
    required=True,
    metavar="DATE",
    help="When consent was obtained (ISO 8601, e.g. 2024-03-01).",
)
@click.option(
    "--evidence",
    "evidence_file",
    metavar="FILE",
    default=None,
    help="What proves it (log lines, the original request mail); '-' = stdin.",
)
@click.option("--ip", default="", help="The subscriber's IP address, if known.")
@click.option("--user-agent", default="", help="The subscriber's user agent, if known.")
@click.option(
    "--channel",
    type=click.Choice(("web", "email", "api", "cli")),
    default="cli",
    show_default=True,
    help="How the attestation reached maild.",
)
@click.option("--actor", default=None, help="Who attests (default cli:USER).")
@JSON
def add_cmd(
    list_id: str,
    address: str,
    source: str,
    obtained: str,
    evidence_file: str | None,
    ip: str,
    user_agent: str,
    channel: str,
    actor: str | None,
    as_json: bool,
) -> None:
    """Owner-add: the list owner attests that ADDRESS consented (recorded as such)."""
    config = load_config()
    raw = _read(evidence_file)

    async def do(ledger: Ledger) -> tuple[list, dict]:
        lst = await _need_list(config, ledger, list_id)
        return await actions.attest(
            ledger,
            lst.cfg,
            [address],
            kind=Kind.OWNER_ADD,
            source=source,
            obtained=obtained,
            actor=_actor(actor),
            channel=channel,
            ip=ip,
            user_agent=user_agent,
            evidence=raw,
        )

    written, skipped = _run(config, do)
    if skipped:
        raise click.ClickException(f"{address}: not added: {next(iter(skipped.values()))}")
    e = written[0]
    if as_json:
        echo_json({"list_id": e.list_id, "address": e.address, "seq": e.seq, "event": str(e.kind)})
    else:
        click.echo(f"owner-add recorded: list={e.list_id} address={e.address} seq={e.seq}")


@optin.command("import")
@click.argument("list_id", metavar="LIST")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--source", required=True, help="Where and how these subscribers consented.")
@click.option(
    "--obtained",
    required=True,
    metavar="DATE",
    help="When (ISO 8601); per-address dates belong in the file itself.",
)
@click.option("--actor", default=None, help="Who attests (default cli:USER).")
@JSON
def import_cmd(
    list_id: str, file: str, source: str, obtained: str, actor: str | None, as_json: bool
) -> None:
    """Import addresses (one per line, or the first CSV column) with an attestation.

    The file itself is stored as the evidence of every import event. Addresses that
    unsubscribed, complained or bounced are skipped: only they can re-subscribe.
    """
    config = load_config()
    raw = Path(file).read_bytes()
    addresses = []
    for line in raw.decode("utf-8", "replace").splitlines():
        first = line.split(",")[0].split(";")[0].strip().strip('"')
        if first and not first.startswith("#") and "@" in first:
            addresses.append(first)
    if not addresses:
        raise click.BadParameter(f"{file}: no addresses found", param_hint="FILE")

    async def do(ledger: Ledger) -> tuple[list, dict]:
        lst = await _need_list(config, ledger, list_id)
        return await actions.attest(
            ledger,
            lst.cfg,
            addresses,
            kind=Kind.IMPORT,
            source=source,
            obtained=obtained,
            actor=_actor(actor),
            channel="import",
            evidence=raw,
        )

    t0 = time.monotonic()
    written, skipped = _run(config, do)
    if as_json:
        echo_json({"imported": len(written), "skipped": skipped})
    else:
        click.echo(
            f"imported {len(written)} address(es) in {time.monotonic() - t0:.1f}s; "
            f"skipped {len(skipped)}"
        )
        for a, why in list(skipped.items())[:50]:
            click.echo(f"  skipped {a}: {why}")


@optin.command("revoke")
@click.argument("list_id", metavar="LIST")
@click.argument("address")
@click.option(
    "--channel",
    type=click.Choice(REVOKE_CHANNELS),
    default="cli",
    show_default=True,
    help="How the subscriber asked (one-click: RFC 8058 POST received by the list's web server).",
)
@click.option("--ip", default="", help="The IP address the request came from.")
@click.option("--user-agent", default="", help="The user agent of a web request.")
@click.option("--reason", default="", help="Recorded with the event.")
@click.option(
    "--evidence",
    "evidence_file",
    metavar="FILE",
    default=None,
    help="The raw request (web log lines, mail); '-' = stdin.",
)
@click.option(
    "--no-notify", is_flag=True, help="Do not send the 'you have been unsubscribed' notice."
)
@click.option("--actor", default=None, help="Who relays the request (default cli:USER).")
@JSON
def revoke_cmd(
    list_id: str,
    address: str,
    channel: str,
    ip: str,
    user_agent: str,
    reason: str,
    evidence_file: str | None,
    no_notify: bool,
    actor: str | None,
    as_json: bool,
) -> None:
    """Revoke ADDRESS's consent to LIST: honoured at once, the subscriber told once."""
    config = load_config()
    raw = _read(evidence_file)

    async def do(ledger: Ledger) -> actions.RevokeResult:
        lst = await _need_list(config, ledger, list_id)
        ds = None if no_notify else _downstream(config)
        try:
            return await actions.revoke(
                ledger,
                config,
                ds,
                lst.cfg,
                address,
                channel=channel,
                actor=_actor(actor),
                ip=ip,
                user_agent=user_agent,
                reason=reason,
                evidence=raw,
                notify=not no_notify,
            )
        finally:
            if ds is not None:
                await ds.close()

    res = _run(config, do)
    if as_json:
        echo_json(
            {
                "list_id": res.event.list_id,
                "address": res.event.address,
                "seq": res.event.seq,
                "previous_state": str(res.before.state),
                "notified": res.notified,
            }
        )
    else:
        click.echo(
            f"revoked: list={res.event.list_id} address={res.event.address} "
            f"(was {res.before.state}); notice "
            f"{'sent' if res.notified else 'not sent'}"
        )


# -------------------------------------------------------------- reading


@optin.command("status")
@click.argument("address")
@click.option("--list", "list_id", default=None, metavar="LIST", help="Only this list.")
@JSON
def status_cmd(address: str, list_id: str | None, as_json: bool) -> None:
    """ADDRESS's standing on every list, and its events."""
    config = load_config()

    async def collect(ledger: Ledger) -> list[dict]:
        events = await ledger.events_for(
            address.strip().strip("<>"), normalise_list_id(list_id) if list_id else None
        )
        out = []
        for lid in sorted({e.list_id for e in events}):
            mine = [e for e in events if e.list_id == lid]
            st = fold(mine, attested_ok=section(config).attested_consent)
            out.append(
                {
                    "list_id": lid,
                    "state": str(st.state),
                    "since": st.since,
                    "decided_by": st.basis,
                    "events": [
                        {
                            "seq": e.seq,
                            "ts": e.ts,
                            "event": str(e.kind),
                            "channel": e.channel,
                            "actor": e.actor,
                            "ip": e.ip,
                        }
                        for e in mine
                    ],
                }
            )
        return out

    rows = _run(config, collect)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"{address}: no consent events (unknown to every list)")
        sys.exit(1)
    for r in rows:
        click.echo(
            f"{address} on {r['list_id']}: {r['state']} since {_when(r['since'])} "
            f"({r['decided_by']})"
        )
        for e in r["events"]:
            click.echo(
                f"  #{e['seq']} {_when(e['ts'])} {e['event']} via {e['channel']}"
                + (f" by {e['actor']}" if e["actor"] else "")
                + (f" from {e['ip']}" if e["ip"] else "")
            )


@optin.command("subscribers")
@click.argument("list_id", metavar="LIST")
@click.option(
    "--state",
    type=click.Choice([s.value for s in State if s is not State.UNKNOWN]),
    default=None,
    help="Only addresses in this state.",
)
@JSON
def subscribers_cmd(list_id: str, state: str | None, as_json: bool) -> None:
    """Every address of LIST with its state (what the list may mail: confirmed)."""
    config = load_config()

    async def collect(ledger: Ledger) -> dict:
        lst = await _need_list(config, ledger, list_id)
        return await evidence.subscribers(
            ledger, lst.id, attested_ok=section(config).attested_consent
        )

    subs = _run(config, collect)
    rows = sorted((a, st) for a, st in subs.items() if state is None or st.state == state)
    if as_json:
        echo_json(
            [
                {"address": a, "state": str(st.state), "since": st.since, "decided_by": st.basis}
                for a, st in rows
            ]
        )
        return
    for a, st in rows:
        click.echo(f"{a} {st.state} {_when(st.since)} {st.basis}")


@optin.command("evidence")
@click.argument("address")
@click.option("--list", "list_id", default=None, metavar="LIST", help="Only this list.")
@click.option(
    "--out",
    "out_dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for the bundle (a zip).",
)
@JSON
def evidence_cmd(address: str, list_id: str | None, out_dir: str, as_json: bool) -> None:
    """Write the evidence bundle for ADDRESS: events, chain check, raw messages."""
    config = load_config()
    t0 = time.monotonic()

    async def make(ledger: Ledger) -> evidence.Bundle:
        reg = await _registry(config, ledger)
        return await evidence.build(
            ledger,
            config,
            address,
            list_id=normalise_list_id(list_id) if list_id else None,
            out_dir=Path(out_dir),
            registry=reg,
        )

    try:
        bundle = _run(config, make)
    except OSError as e:
        raise click.ClickException(
            f"cannot write the bundle in {out_dir}: {e.strerror or e}"
        ) from None
    took = time.monotonic() - t0
    doc = bundle.doc
    if as_json:
        echo_json(
            {
                "path": str(bundle.path),
                "events": len(doc["events"]),
                "lists": [x["list_id"] for x in doc["lists"]],
                "verified": doc["verified"],
                "seconds": round(took, 3),
            }
        )
    else:
        click.echo(
            f"{bundle.path}: {len(doc['events'])} event(s) on "
            f"{len(doc['lists'])} list(s); chain "
            f"{'verified' if doc['verified'] else 'BROKEN'}; {took:.2f}s"
        )
        for x in doc["lists"]:
            click.echo(f"  {x['list_id']}: {x['state']} since {_when(x['since'])}")
    if not doc["events"]:
        click.echo(
            f"no consent events for {address}: the bundle records that there are none", err=True
        )
    if not doc["verified"] or not doc["events"]:
        sys.exit(1)


@optin.command("verify")
@click.option("--list", "list_id", default=None, metavar="LIST", help="Only this list.")
@JSON
def verify_cmd(list_id: str | None, as_json: bool) -> None:
    """Check every hash chain and stored message; exit 1 and say where on any break."""
    config = load_config()
    t0 = time.monotonic()
    report = _run(
        config,
        lambda ledger: evidence.verify_all(ledger, normalise_list_id(list_id) if list_id else None),
    )
    if as_json:
        echo_json(report.as_dict())
    else:
        for c in report.chains:
            state = "ok" if c.ok else "BROKEN"
            click.echo(
                f"list {c.list_id}: {state}: {c.rows} event(s), head seq "
                f"{c.head[0]} hash {c.head[1][:16]}"
            )
            for b in c.breaks:
                click.echo(f"  {b}")
        for p in report.raw_problems:
            click.echo(f"  {p}")
        click.echo(
            f"{'OK' if report.ok else 'TAMPERING DETECTED'}: {len(report.chains)} "
            f"chain(s) checked in {time.monotonic() - t0:.2f}s"
        )
    if not report.ok:
        sys.exit(1)
