"""`maild optin unsubscribe-url` and `unsubscribe-key`: one-click URLs for list software.

A list's key is created on first use and shared through the state store with the
daemon (and every node of a shared store). Printing the key is for the list owner's
software to compute URLs itself (docs/optin.md); it is never logged.
"""

from __future__ import annotations

import click

from maild.clitools import echo_json, load_config
from maild.config import Config
from maild.optin.actions import ActionError, check_address
from maild.optin.cli import _need_list, _run
from maild.optin.ledger import Ledger
from maild.web import keys, oneclick
from maild.web.settings import section


def _base_url(config: Config) -> str:
    w = section(config)
    if not w.base_url:
        raise click.UsageError(
            f"{config.path}: [web] base_url is not set: one-click URLs are "
            "built from the public URL maild's pages are reached at "
            "(docs/policies.md, [web])"
        )
    return w.base_url


@click.command("unsubscribe-url")
@click.argument("list_id", metavar="LIST")
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def unsubscribe_url_cmd(list_id: str, address: str, as_json: bool) -> None:
    """Print ADDRESS's RFC 8058 one-click unsubscribe URL for LIST."""
    config = load_config()
    base = _base_url(config)
    try:
        addr = check_address(address)
    except ActionError as e:
        raise click.BadParameter(str(e), param_hint="ADDRESS") from None

    async def do(ledger: Ledger) -> tuple[str, str]:
        lst = await _need_list(config, ledger, list_id)
        k = await keys.key(ledger.store, keys.list_key_name(lst.id))
        return lst.id, oneclick.url(base, k, lst.id, addr)

    lid, url = _run(config, do)
    if as_json:
        echo_json(
            {
                "list_id": lid,
                "address": addr,
                "url": url,
                "list_unsubscribe": f"<{url}>",
                "list_unsubscribe_post": "List-Unsubscribe=One-Click",
            }
        )
    else:
        click.echo(url)


@click.command("unsubscribe-key")
@click.argument("list_id", metavar="LIST")
def unsubscribe_key_cmd(list_id: str) -> None:
    """Print LIST's one-click key (hex) for list software that builds the URLs itself."""
    config = load_config()
    _base_url(config)

    async def do(ledger: Ledger) -> bytes:
        lst = await _need_list(config, ledger, list_id)
        return await keys.key(ledger.store, keys.list_key_name(lst.id))

    click.echo(_run(config, do).hex())
