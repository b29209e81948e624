"""Helpers for the [customer_source] tests: a policies.toml with a source, customer files."""

from __future__ import annotations

import os
from pathlib import Path

from maild.components import parse
from maild.config import Config
from maild.policy.context import Client
from maild.policy.customer import resolve


def policy(source: dict, customers: list | None = None, state: str = "state.db") -> dict:
    return {
        "server": {"state": state},
        "postmaster": {"domains": ["hosted.example"]},
        "customers": customers or [],
        "customer_source": source,
    }


def files_config(tmp_path: Path, **source: object) -> Config:
    d = tmp_path / "customers.d"
    d.mkdir(exist_ok=True)
    return parse(
        policy({"type": "files", "path": str(d), **source}),
        str(tmp_path / "policies.toml"),
    )


def write_customer(d: Path, name: str, body: str, *, tick: bool = True) -> Path:
    """NAME.toml; tick moves its mtime on, as a later edit would have (file systems with a
    coarse clock could otherwise give an edit within the same tick the same mtime)."""
    p = d / f"{name}.toml"
    old = p.stat().st_mtime_ns if p.exists() else 0
    p.write_text(body)
    if tick and old:
        os.utime(p, ns=(old + 10**9, old + 10**9))
    return p


def customer_toml(i: int, **extra: str) -> str:
    lines = [
        f'networks = ["10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"]',
        f'logins = ["user{i}@c{i}.example"]',
        f'domains = ["c{i}.example"]',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def who(config: Config, addr: str) -> str:
    return resolve(config, Client(addr=addr)).name
