"""CLI for outbound anti-spam: customers' state, warn/block/unblock, counter resets.

These commands write to the state store and leave a `control` row, then signal the
running `maild serve` on this node to apply it at once and wait for its answer
(maild.daemonctl); they say when the change takes effect. Counters shown are those last
persisted by the daemon (it writes them every few seconds).
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import click

from maild.antispam.limiter import Counter, counter_key, legacy_share, under
from maild.antispam.sanctions import control, set_state
from maild.clitools import config_option, echo_json, load_config, open_store, run_async
from maild.config import Config
from maild.customers.index import origin_kind
from maild.daemonctl import apply_control
from maild.policy.customer import index as customer_index
from maild.store.base import Store


async def _with_store(config: Config, fn: Any) -> Any:
    store = await open_store(config)
    try:
        return await fn(store)
    finally:
        await store.close()


def _need_customer(config: Config, name: str) -> None:
    if config.customer(name) is None:
        raise click.BadParameter(
            f"no customer named {name!r} in {config.path}{_where_else(config)} "
            f"(known: {known_customers(config)})",
            param_hint="NAME",
        )


def known_customers(config: Config, shown: int = 10) -> str:
    """A few names, not a hundred thousand."""
    names = [c.name for c in config.all_customers()]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more if names else "none"


def _where_else(config: Config) -> str:
    note = customer_index(config).source_note
    return f" or its [customer_source] ({note})" if note else ""


_OK = {"state": "ok", "since": None, "reason": "", "actor": ""}


async def _states(store: Store, name: str | None = None) -> dict[str, dict]:
    """Sanction state and strikes in 7 days, by customer: one customer's, or everyone's in
    two queries (a provider lists 100,000 customers)."""
    where, args = ("WHERE customer = ?", (name,)) if name is not None else ("", ())
    out: dict[str, dict] = {}
    for c, state, since, reason, actor in await store.fetchall(
        f"SELECT customer, state, since, reason, actor FROM sanctions {where}", args
    ):
        out[c] = {"state": state, "since": since, "reason": reason, "actor": actor}
    week = time.time() - 7 * 86400
    strikes = await store.fetchall(
        f"SELECT customer, COUNT(*) FROM strikes {where or 'WHERE 1 = 1'} AND ts >= ? "
        "GROUP BY customer",
        (*args, week),
    )
    for c, n in strikes:
        out.setdefault(c, dict(_OK))["strikes_7d"] = n
    return out


async def _state(store: Store, name: str) -> dict:
    return {"strikes_7d": 0, **_OK, **(await _states(store, name)).get(name, {})}


async def _stored(store: Store, prefix: str) -> list[tuple]:
    """The stored counters a reset of prefix clears (limiter.under): (key, value, ts, period)."""
    rows = await store.fetchall(
        "SELECT key, value, ts, period FROM ratelimit_counters WHERE substr(key, 1, ?) = ?",
        (len(prefix), prefix),
    )
    return [r for r in rows if under(r[0], prefix)]


async def _stored_by_customer(store: Store) -> dict[str, list[tuple]]:
    """Every customer's stored counters ('cust:NAME...'), by name: one query."""
    out: dict[str, list[tuple]] = {}
    for row in await store.fetchall(
        "SELECT key, value, ts, period FROM ratelimit_counters WHERE substr(key, 1, 5) = 'cust:'"
    ):
        name = re.split(r"[|:#]", row[0][len("cust:") :], maxsplit=1)[0]
        out.setdefault(name, []).append(row)
    return out


def _counters_of(rows: list[tuple]) -> dict[str, float]:
    now = time.time()
    return {k: round(Counter(value=v, ts=ts).current(now, p), 2) for k, v, ts, p in rows}


async def _counters(store: Store, prefix: str) -> dict[str, float]:
    return _counters_of(await _stored(store, prefix))


async def _window_counts(
    store: Store, config: Config, name: str, kinds: tuple[str, ...]
) -> dict[str, list[dict]] | None:
    return _windows_of(await _stored(store, f"cust:{name}"), config, name, kinds)


def _windows_of(
    rows: list[tuple], config: Config, name: str, kinds: tuple[str, ...]
) -> dict[str, list[dict]] | None:
    """The customer's counter against each of its windows, per kind (messages, recipients,
    bytes), as the limiter judges it (decayed over that window), in whole numbers; a
    counter stored before per-window counting by its share (limiter._adopt). None when
    rate limits are off."""
    from maild.policy.ratelimit import customer_key, customer_limits

    rl = config.sections.get("ratelimit")
    if rl is not None and not rl.enabled:
        return None
    stored = {k: (v, ts) for k, v, ts, _p in rows}
    limits = customer_limits(config, config.customer(name))
    now = time.time()
    out: dict[str, list[dict]] = {}
    for kind in kinds:
        key = customer_key(kind, name)
        rates = getattr(limits, kind) if limits else ()
        old = stored.get(key)
        out[kind] = []
        for r in rates:
            row = stored.get(counter_key(key, r))
            c = (
                Counter(value=row[0], ts=row[1])
                if row
                else legacy_share(*old, len(set(rates)))
                if old
                else Counter()
            )
            out[kind].append(
                {"rate": r.text, "count": round(c.current(now, r.period)), "limit": round(r.limit)}
            )
    return out


def _against(counts: list[dict]) -> str:
    """'5 of 200/1h, 40 of 2000/1d'."""
    return ", ".join(f"{m['count']} of {m['rate']}" for m in counts) or "no limit"


_SHOWN = ("messages", "recipients", "bytes")  # per-customer counters `customer show` lists


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@click.group("customers", invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def customers(ctx: click.Context, as_json: bool) -> None:
    """List customers with where each comes from, their sanction state, strikes and
    message counters; `customers import` turns a CSV export into customer files."""
    if ctx.invoked_subcommand is None:
        _list(as_json)


def _list(as_json: bool) -> None:
    config = load_config()
    for line in customer_index(config).refused:
        click.echo(f"warning: {line}", err=True)

    async def collect(store: Store) -> list[dict]:
        out = []
        states, stored = await _states(store), await _stored_by_customer(store)
        for c in config.all_customers():
            st = {"strikes_7d": 0, **_OK, **states.get(c.name, {})}
            rows = [r for r in stored.get(c.name, []) if under(r[0], f"cust:{c.name}")]
            counters = _counters_of(rows)
            counts = _windows_of(rows, config, c.name, ("messages",))
            out.append(
                {
                    "name": c.name,
                    "source": c.origin,
                    **st,
                    "counters": counters,
                    "messages": None if counts is None else counts["messages"],
                }
            )
        return out

    rows = run_async(_with_store(config, collect))
    if as_json:
        echo_json(rows)
        return
    click.echo(
        f"{'CUSTOMER':20} {'SOURCE':13} {'STATE':8} {'STRIKES(7d)':11} {'SINCE':16} "
        "MESSAGES (of LIMIT/WINDOW)"
    )
    for r in rows:
        msgs = "rate limits off" if r["messages"] is None else _against(r["messages"])
        click.echo(
            f"{r['name']:20} {origin_kind(r['source']):13} {r['state']:8} "
            f"{r['strikes_7d']:<11} {_when(r['since']):16} {msgs}"
        )
    if note := customer_index(config).source_note:
        click.echo(f"SOURCE: policies.toml's [[customers]], or [customer_source]: {note}")
    click.echo(
        "MESSAGES: the rate limiter's decaying counter, decayed over each window as "
        "it is compared with the limit; as the daemon last stored it"
    )


@click.group("customer")
def customer() -> None:
    """Show one customer, or warn, block or unblock it."""


@customer.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(name: str, as_json: bool) -> None:
    """State, strikes, counters and sanction history of customer NAME."""
    config = load_config()
    _need_customer(config, name)

    async def collect(store: Store) -> dict:
        st = await _state(store, name)
        st["counters"] = await _counters(store, f"cust:{name}")
        counts = await _window_counts(store, config, name, _SHOWN)
        st.update(counts or dict.fromkeys(_SHOWN))
        st["strikes"] = [
            dict(zip(("ts", "rule", "reason", "session"), r, strict=True))
            for r in await store.fetchall(
                "SELECT ts, rule, reason, session FROM strikes WHERE customer = ? "
                "ORDER BY id DESC LIMIT 20",
                (name,),
            )
        ]
        st["history"] = [
            dict(zip(("ts", "action", "reason", "actor"), r, strict=True))
            for r in await store.fetchall(
                "SELECT ts, action, reason, actor FROM sanction_events WHERE "
                "customer = ? ORDER BY id DESC LIMIT 50",
                (name,),
            )
        ]
        return st

    st = run_async(_with_store(config, collect))
    c = config.customer(name)
    assert c is not None
    st.update(
        {
            "name": name,
            "source": c.origin,
            "contact": c.contact,
            "networks": [str(n) for n in c.networks],
            "logins": list(c.logins),
            "domains": list(c.domains),
        }
    )
    if as_json:
        echo_json(st)
        return
    click.echo(
        f"customer {name}: {st['state']} since {_when(st['since'])}"
        + (f" ({st['reason']}, by {st['actor']})" if st["reason"] else "")
    )
    click.echo(f"  source: {_origin_text(c.origin, config.path)}")
    click.echo(f"  contact: {c.contact or '-'}; domains: {', '.join(c.domains) or '-'}")
    click.echo(f"  strikes in 7 days: {st['strikes_7d']}")
    for kind in _SHOWN:
        click.echo(f"  {kind}: " + ("rate limits off" if st[kind] is None else _against(st[kind])))
    for h in st["history"][:10]:
        click.echo(f"  {_when(h['ts'])} {h['action']}: {h['reason']} ({h['actor']})")


def _origin_text(origin: str, config_path: str) -> str:
    kind, _, where = origin.partition(":")
    if kind == "files":
        return f"file {where}"
    if kind == "postgresql":
        return f"postgresql {where} (its last answer)"
    if kind == "postgresql-snapshot":
        return f"postgresql, from the snapshot {where} (the database was unreachable)"
    return f"[[customers]] in {origin or config_path}"


def _change(name: str, state: str, reason: str, as_json: bool) -> None:
    config = load_config()
    _need_customer(config, name)
    actor = f"cli:{_user()}"
    run_async(
        _with_store(
            config,
            lambda store: set_state(store, name, state, reason, actor, clear=(state == "ok")),
        )
    )
    _effect(
        config,
        {"name": name, "state": state, "reason": reason, "actor": actor},
        f"customer {name}: {state}",
        as_json,
    )


json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@customer.command("warn")
@click.argument("name")
@click.option("--reason", required=True, help="Why; recorded and shown in `customer show`.")
@json_opt
def warn(name: str, reason: str, as_json: bool) -> None:
    """Record a warning for customer NAME (mail still flows)."""
    _change(name, "warned", reason, as_json)


@customer.command("block")
@click.argument("name")
@click.option("--reason", required=True, help="Why; recorded, and part of the 554 reply.")
@json_opt
def block(name: str, reason: str, as_json: bool) -> None:
    """Block all outbound mail of customer NAME (postmaster and abuse still reachable)."""
    _change(name, "blocked", reason, as_json)


@customer.command("unblock")
@click.argument("name")
@click.option(
    "--reason",
    default="unblocked by operator",
    show_default=True,
    help="Why; recorded in the history.",
)
@json_opt
def unblock(name: str, reason: str, as_json: bool) -> None:
    """Lift a block (or warning) on NAME; strikes before now no longer count."""
    _change(name, "ok", reason, as_json)


@click.group("ratelimit")
def ratelimit() -> None:
    """Inspect or reset rate-limit counters."""


@ratelimit.command("reset")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reset(key: str, as_json: bool) -> None:
    """Reset counters for KEY: a customer name, or cust:NAME, login:L, ip:ADDR, from:ADDR.

    A bare customer name resets everything counted for that customer (messages,
    recipients, bytes, per-recipient counters).
    """
    config = load_config()
    prefixes = [key]
    if ":" not in key:
        _need_customer(config, key)
        prefixes = [f"cust:{key}", f"rcpt:{key}"]

    async def do(store: Store) -> int:
        n = 0
        for p in prefixes:
            keys = [(r[0],) for r in await _stored(store, p)]
            await store.executemany("DELETE FROM ratelimit_counters WHERE key = ?", keys)
            n += len(keys)
            await control(store, "ratelimit-reset", p)
        return n

    n = run_async(_with_store(config, do))
    _effect(
        config,
        {"key": key, "prefixes": prefixes, "deleted": n},
        f"reset {key}: {n} stored counter(s) removed",
        as_json,
    )


def _effect(config: Config, result: dict, text: str, as_json: bool) -> None:
    """Have the running daemon apply the change now and say when it takes effect;
    exit 1 when the daemon did not confirm (the change is recorded all the same)."""
    settled, effect = apply_control(config)
    if as_json:
        echo_json({**result, "applied": settled, "effect": effect})
    else:
        click.echo(f"{text}; {effect}", err=not settled)
    if not settled:
        sys.exit(1)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"
