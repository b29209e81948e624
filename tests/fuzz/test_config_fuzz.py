"""policies.toml loader under hostile input: any file either loads or is refused with a
ConfigError listing its problems. Nothing else may escape: `maild serve` and `maild
check-config` turn ConfigError into a readable message and exit 2, and SIGHUP keeps the
running policy; any other exception is a traceback at start, or a reload that silently
never finishes.

Inputs: random bytes; the shipped policies.toml with random byte edits; and documents
built from the shipped policy with random values (every TOML type, NaN and infinities,
dates, nested tables) put at random places, known keys included.
"""

from __future__ import annotations

import copy
import math
import signal
import socket
import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from maild import components
from maild import config as cfg
from tests.fuzz.budget import budget
from tests.fuzz.strategies import toml_values
from tests.harness.maild import render
from tests.integration.conftest import front_policy

SHIPPED = Path(__file__).resolve().parents[2] / "policies.toml"
SHIPPED_TEXT = SHIPPED.read_bytes()
SHIPPED_DOC = tomllib.loads(SHIPPED_TEXT.decode())


def load_bytes(tmp: Path, data: bytes) -> cfg.Config | None:
    p = tmp / "policies.toml"
    p.write_bytes(data)
    try:
        return components.load(p)
    except cfg.ConfigError as e:
        assert e.problems and all(isinstance(x, str) and x for x in e.problems)
        return None


def check_accepted(c: cfg.Config) -> None:
    """What an accepted configuration may be trusted with (see docs/policies.md)."""
    s = c.server
    assert s.mode in cfg.MODES
    for host, port in (s.listen, s.downstream):
        assert 0 < port < 65536 and isinstance(host, str)
    lim = s.limits
    assert 78 <= lim.line_length <= 100000
    assert (
        lim.recipients_per_message >= 1 and lim.max_sessions >= 1 and lim.max_sessions_per_ip >= 1
    )
    assert lim.message_size >= 0
    assert not (s.downstream_timeout >= 100)
    assert all(cfg.is_hostname(d) for d in c.hosted_domains)
    assert "postmaster" in c.postmaster.local_parts
    names = [x.name for x in c.customers]
    assert len(names) == len(set(names))


@budget(250)
@given(st.binary(max_size=400))
@example(b"\xff\xfe")
@example(b"[server\n")
@example(b"\x00")
def test_random_bytes(tmp_path_factory, data: bytes) -> None:
    c = load_bytes(tmp_path_factory.mktemp("b"), data)
    if c is not None:
        check_accepted(c)


@budget(250)
@given(
    st.lists(
        st.tuples(st.integers(0, len(SHIPPED_TEXT)), st.binary(max_size=8), st.integers(0, 8)),
        min_size=1,
        max_size=6,
    )
)
def test_edited_shipped_file(tmp_path_factory, edits: list[tuple[int, bytes, int]]) -> None:
    data = bytearray(SHIPPED_TEXT)
    for pos, insert, delete in edits:
        data[pos : pos + delete] = insert
    c = load_bytes(tmp_path_factory.mktemp("e"), bytes(data))
    if c is not None:
        check_accepted(c)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _set(doc: dict, path: tuple, value: object) -> None:
    *head, last = path
    node = doc
    for k in head:
        node = node[k]
    node[last] = value


BASES = [SHIPPED_DOC, front_policy(10026)]


@budget(250)
@given(st.sampled_from(range(len(BASES))), st.data())
def test_random_values_at_known_places(base: int, data: st.DataObject) -> None:
    doc = copy.deepcopy(BASES[base])
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths))
        try:
            _set(doc, path, data.draw(toml_values))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed the parent
        paths = [p for p in _paths(doc) if p]
    if data.draw(st.booleans()):
        table = data.draw(st.sampled_from([doc] + [v for v in doc.values() if isinstance(v, dict)]))
        table[data.draw(st.text(min_size=1, max_size=10))] = data.draw(toml_values)
    try:
        c = components.parse(doc, "fuzz.toml")
    except cfg.ConfigError as e:
        assert e.problems
        return
    check_accepted(c)


@pytest.mark.parametrize(
    "key, value",
    [
        (k, v)
        for k in ("limits.command_timeout", "limits.data_timeout", "downstream_timeout")
        for v in (math.nan, math.inf, 0, "0s")
        if (k, v) != ("downstream_timeout", math.inf)
    ],
)  # refused already: not below 100 s
def test_timeouts_must_be_finite_and_positive(key: str, value: object) -> None:
    doc = copy.deepcopy(SHIPPED_DOC)
    table = doc["server"]
    *head, last = key.split(".")
    for k in head:
        table = table[k]
    table[last] = value
    with pytest.raises(cfg.ConfigError):
        components.parse(doc, "fuzz.toml")


DEEP = b"a = " + b"[" * 3000 + b"]" * 3000 + b"\n"


def test_deeply_nested_file_is_a_config_error(tmp_path: Path) -> None:
    assert load_bytes(tmp_path, DEEP) is None


def test_sighup_with_deeply_nested_file_is_refused(
    maild_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock_path = tmp_path / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    m = maild_factory(front_policy(10026))
    try:
        assert rx.recv(1000).startswith(b"READY=1")
        m.config.write_bytes(DEEP)
        m.signal(signal.SIGHUP)
        assert rx.recv(1000) == b"RELOADING=1"
        m.wait_log("reload refused, keeping the running policy", timeout=3)
        assert rx.recv(1000) == b"READY=1"
        assert m.proc.poll() is None
    finally:
        rx.close()
        m.config.write_text(render(m.policy))
