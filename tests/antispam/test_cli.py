"""`maild customers`: the listing says what its message figures are."""

from __future__ import annotations

import asyncio
import json
import time

from click.testing import CliRunner

from maild.antispam.limiter import Limiter, Rate, Reservation
from maild.cli import main
from maild.components import open_store


def test_customers_shows_whole_messages_against_each_window(tmp_path):
    db = tmp_path / "state.db"
    policy = tmp_path / "p.toml"
    policy.write_text(f'[server]\nstate = "{db}"\n[postmaster]\ndomains = ["h.example"]\n'
                      '[[customers]]\nname = "acme"\n[customers.ratelimit]\nmessages = ["100/1h"]\n'
                      '[[customers]]\nname = "quiet"\n')

    async def relay_six_messages_ten_minutes_ago() -> None:
        store = await open_store(str(db))
        limiter = Limiter(clock=lambda: time.time() - 600)
        for _ in range(6):
            res = Reservation()
            assert limiter.try_reserve(res, [("messages", "cust:acme", Rate.parse("100/1h"), 1.0)]) is None
            limiter.commit(res)
        await limiter.flush(store)
        await store.close()

    asyncio.run(relay_six_messages_ten_minutes_ago())
    r = CliRunner().invoke(main, ["customers", "-c", str(policy)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    # 6 messages, decayed for a sixth of the window: 5 (the stored counter is 5.0 or 4.99..)
    assert lines[1].split()[0] == "acme" and lines[1].endswith(" 5 of 100/1h"), r.output
    assert lines[0].split()[-3:] == ["MESSAGES", "(of", "LIMIT/WINDOW)"]
    assert lines[2].split()[0] == "quiet" and lines[2].endswith(" 0 of 200/1h, 0 of 2000/1d"), r.output
    assert "decaying" in lines[-1]
    rows = {x["name"]: x for x in json.loads(
        CliRunner().invoke(main, ["customers", "-c", str(policy), "--json"]).output)}
    assert rows["acme"]["messages"] == [{"rate": "100/1h", "count": 5, "limit": 100}]
