"""`maild customers import FILE.csv`: a billing system's CSV export into customer files.

The CSV has the columns of a [customer_source] query (name, network, login, domain,
address, contact, tier, settings), one row per network, login, domain or address, or
several values in one cell separated by spaces. Every customer is checked as maild reads
it before any file is written: one bad row and nothing changes.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import click

from maild.clitools import echo_json, load_config, wiring
from maild.customers.sources import customer_from, group_rows

# The order of a [[customers]] table's keys in docs/policies.md; others follow, sorted.
_ORDER = ("name", "networks", "logins", "domains", "addresses", "contact", "tier")


@click.command("import")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(dir_okay=False))
@click.option(
    "--to",
    "target",
    metavar="DIR",
    help='Where to write NAME.toml files (default: [customer_source] path, type = "files").',
)
@click.option("--replace", is_flag=True, help="Overwrite customer files whose content differs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def import_csv(csv_file: str, target: str | None, replace: bool, as_json: bool) -> None:
    """Turn a CSV export into one NAME.toml per customer (the files layout)."""
    config = load_config()
    src = config.customer_source
    if target is None:
        if src.type != "files":
            raise click.UsageError(
                f'{config.path} has no [customer_source] with type = "files": give --to DIR'
            )
        target = src.path
    out = Path(target)
    if not out.is_absolute():
        out = Path(config.path).resolve().parent / out
    tables, problems = _read(Path(csv_file))
    files: dict[str, str] = {}
    for name, t in tables.items():
        _c, errs = customer_from(
            t, wiring().customer_keys, "", f"{csv_file}: customer {name}", default_name=name
        )
        problems += errs
        try:
            files[f"{name}.toml"] = render(t)
        except ValueError as e:
            problems.append(f"{csv_file}: customer {name}: {e}")
    if problems:
        click.echo(f"maild: {len(problems)} problem(s) in {csv_file}; nothing written:", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)
    status: dict[str, list[str]] = {"new": [], "changed": [], "unchanged": []}
    for fname, text in files.items():
        dest = out / fname
        old = dest.read_text() if dest.is_file() else None
        status["new" if old is None else "unchanged" if old == text else "changed"].append(fname)
    if status["changed"] and not replace:
        shown = ", ".join(status["changed"][:10])
        raise click.UsageError(
            f"{len(status['changed'])} customer file(s) in {out} differ from the CSV "
            f"({shown}): --replace overwrites them"
        )
    out.mkdir(parents=True, exist_ok=True)
    for fname in status["new"] + status["changed"]:
        _write(out / fname, files[fname])
    result = {"directory": str(out), **{k: len(v) for k, v in status.items()}}
    if as_json:
        echo_json(result)
        return
    when = (
        f"maild applies them within refresh = {src.refresh:g}s"
        if src.type == "files" and Path(src.path) == Path(target)
        else f"point [customer_source] path at {out} to use them"
    )
    click.echo(
        f"imported {len(files)} customer(s) into {out}: {result['new']} new, "
        f"{result['changed']} changed, {result['unchanged']} unchanged; {when}"
    )


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return {}, [f"{path}: empty: expected a header line (name,network,...)"]
            reader.fieldnames = [h.strip().lower() for h in reader.fieldnames]
            rows = [{k: v for k, v in r.items() if k is not None and v} for r in reader]
    except OSError as e:
        raise click.UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise click.UsageError(f"{path}: not a UTF-8 CSV file: {e}") from None
    return group_rows(rows, str(path))


def _write(path: Path, text: str) -> None:
    """Atomically: maild's refresh never reads half a file."""
    fd, tmp = tempfile.mkstemp(prefix=".import.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render(table: dict[str, Any]) -> str:
    """A customer table as TOML (tomllib reads back exactly the same table)."""
    keys = [k for k in _ORDER if k in table] + sorted(k for k in table if k not in _ORDER)
    text = "".join(f"{k} = {_value(table[k])}\n" for k in keys)
    if tomllib.loads(text) != table:
        raise ValueError("a value TOML cannot hold (null in settings?)")
    return text


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, str):
        return _string(v)
    raise ValueError(f"{v!r}: TOML has no such value (null in settings?)")


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) and k.isascii() else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
