"""Every `maild` command is a module-level click command that maild.components lists.

A command defined inside a register() function cannot be imported, tested or listed by
the composition root; one style means a newcomer reads one command module and knows
them all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import click

from maild import cli, components

ROOT = Path(__file__).resolve().parent.parent


def _is_click_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, ast.Attribute) and target.attr in ("command", "group")


def nested_commands(root: Path = ROOT / "maild") -> list[str]:
    """file:line of every click command or group defined inside a function."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for outer in ast.walk(tree):
            if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(outer):
                if (
                    inner is not outer
                    and isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)
                    and any(_is_click_decorator(d) for d in inner.decorator_list)
                ):
                    found.append(f"{path.relative_to(root.parent)}:{inner.lineno} {inner.name}")
    return found


def test_no_command_is_defined_inside_a_function() -> None:
    assert nested_commands() == []


def test_every_command_of_the_main_group_is_its_own_or_the_roots() -> None:
    own = {"serve", "check-config", "log"}
    listed = {c.name for c in components.COMMANDS}
    assert set(cli.main.commands) == own | listed
    for group, cmd in components.SUBCOMMANDS:
        parent = cli.main.commands[group]
        assert isinstance(parent, click.Group) and parent.commands[cmd.name or ""] is cmd
