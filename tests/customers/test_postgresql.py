"""type = "postgresql": a provider's own database, a real PostgreSQL with a billing-like schema."""

from __future__ import annotations

import logging
import stat

import pytest

from maild.components import parse
from maild.customers.directory import Refresher
from maild.policy.customer import index
from maild.policy.ratelimit import customer_limits
from tests.customers.conftest import policy, who
from tests.harness.postgres import Postgres, need_postgres

SCHEMA = """
CREATE TABLE accounts (id serial PRIMARY KEY, handle text UNIQUE NOT NULL,
    status text NOT NULL DEFAULT 'active', abuse_email text, plan text);
CREATE TABLE account_ips (account_id int REFERENCES accounts, block cidr NOT NULL);
CREATE TABLE account_domains (account_id int REFERENCES accounts, domain text NOT NULL);
CREATE TABLE smtp_logins (account_id int REFERENCES accounts, username text NOT NULL);
INSERT INTO accounts (handle, abuse_email, plan) VALUES
    ('shop', 'ops@shop.example', 'bulk'), ('blog', NULL, NULL), ('gone', NULL, NULL);
UPDATE accounts SET status = 'cancelled' WHERE handle = 'gone';
INSERT INTO account_ips VALUES (1, '198.51.100.0/24'), (1, '2001:db8:5::/48'),
    (2, '203.0.113.7/32'), (3, '192.0.2.0/24');
INSERT INTO account_domains VALUES (1, 'shop.example'), (2, 'blog.example');
INSERT INTO smtp_logins VALUES (1, 'shop@sasl');
"""

# One row per network, login and domain, named as docs/policies.md says (as a Dovecot
# userdb query names its fields).
QUERY = """
SELECT a.handle AS name, i.block AS network, NULL AS login, NULL AS domain,
       a.abuse_email AS contact, a.plan AS tier
  FROM accounts a JOIN account_ips i ON i.account_id = a.id WHERE a.status = 'active'
UNION ALL
SELECT a.handle, NULL, l.username, NULL, a.abuse_email, a.plan
  FROM accounts a JOIN smtp_logins l ON l.account_id = a.id WHERE a.status = 'active'
UNION ALL
SELECT a.handle, NULL, NULL, d.domain, a.abuse_email, a.plan
  FROM accounts a JOIN account_domains d ON d.account_id = a.id WHERE a.status = 'active'
"""


@pytest.fixture(scope="module")
def pg():
    server = Postgres(need_postgres()).start()
    yield server
    server.remove()


@pytest.fixture
def billing(pg, request):
    name = "billing_" + request.node.name[-40:].lower().replace("[", "_").replace("]", "")
    url = pg.create_db(name)
    pg.psql(SCHEMA, name)
    return name, url


def _config(tmp_path, url: str, **extra: object):
    return parse(
        {
            **policy({"type": "postgresql", "dsn": url, "query": QUERY, **extra}),
            "ratelimit": {"tiers": {"bulk": {"messages": ["5000/1h"]}}},
        },
        str(tmp_path / "policies.toml"),
    )


async def test_customers_come_from_the_query_with_their_tier(tmp_path, billing):
    _db, url = billing
    config = _config(tmp_path, url)
    r = Refresher(config)
    await r.start()
    await r.stop()
    assert sorted(c.name for c in config.all_customers()) == ["blog", "shop"]
    shop = config.customer("shop")
    assert shop.origin == f"postgresql:{url}" and shop.contact == "ops@shop.example"
    assert who(config, "2001:db8:5::9") == "shop" and who(config, "192.0.2.1") == "-"
    assert index(config).by_login("shop@sasl") is shop
    assert [x.text for x in customer_limits(config, shop).messages] == ["5000/1h"]


async def test_a_row_changed_in_the_database_is_in_force_at_the_next_refresh(tmp_path, pg, billing):
    db, url = billing
    config = _config(tmp_path, url)
    r = Refresher(config)
    await r.start()
    assert not await r.refresh()  # nothing changed
    pg.psql("UPDATE account_ips SET block = '198.18.0.0/15' WHERE account_id = 2", db)
    assert await r.refresh()
    await r.stop()
    assert who(config, "198.19.1.1") == "blog" and who(config, "203.0.113.7") == "-"


async def test_a_bad_row_keeps_that_customers_version_in_force(tmp_path, pg, billing, caplog):
    db, url = billing
    config = _config(tmp_path, url)
    r = Refresher(config)
    await r.start()
    pg.psql("UPDATE accounts SET abuse_email = 'nobody' WHERE handle = 'blog'", db)
    await r.refresh()
    await r.stop()
    assert config.customer("blog").contact == ""  # the version in force
    assert 'customer blog: contact = "nobody": expected an email address' in caplog.text


async def test_an_outage_keeps_the_snapshot_and_a_restart_starts_from_it(
    tmp_path, pg, billing, caplog
):
    caplog.set_level(logging.INFO, "maild")
    _db, url = billing
    config = _config(tmp_path, url)
    r = Refresher(config)
    await r.start()
    snap = tmp_path / "customers.snapshot.json"
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    pg.stop()
    try:
        assert not await r.refresh()
        assert not await r.refresh()
        await r.stop()
        assert who(config, "203.0.113.7") == "blog"
        failures = [m for m in caplog.messages if "cannot query postgresql" in m]
        assert len(failures) == 1 and "keeping the 2 source customers in force" in failures[0]
        # a restart during the outage
        again = _config(tmp_path, url)
        r2 = Refresher(again)
        await r2.start()
        await r2.stop()
        assert who(again, "203.0.113.7") == "blog"
        assert again.customer("shop").origin == f"postgresql-snapshot:{snap}"
        assert any("using the snapshot" in m for m in caplog.messages)
    finally:
        pg.start()


def test_check_config_names_what_a_postgresql_source_needs(tmp_path):
    from maild.config import ConfigError

    with pytest.raises(ConfigError) as e:
        parse(policy({"type": "postgresql", "dsn": "mysql://x", "path": "/x"}))
    text = str(e.value)
    assert 'customer_source.dsn = "mysql://x": expected a libpq URL' in text
    assert "customer_source.query is missing" in text
    assert 'customer_source.path = "/x": expected no value: it is for type = "files"' in text


async def test_a_command_reading_the_source_inside_its_coroutine_gets_the_database(
    tmp_path, billing
):
    """`maild report` looks customers up from inside asyncio.run(): the query must still run."""
    _db, url = billing
    config = _config(tmp_path, url)  # no refresher: the first lookup reads the source
    shop = config.customer("shop")
    assert shop is not None and shop.origin == f"postgresql:{url}"


async def test_at_start_an_answer_that_lost_most_customers_is_refused_for_the_snapshot(
    tmp_path, pg, billing, caplog
):
    db, url = billing
    first = Refresher(_config(tmp_path, url))
    await first.start()  # writes the snapshot: shop and blog
    await first.stop()
    pg.psql("UPDATE accounts SET status = 'cancelled'", db)  # a wrong bulk update
    config = _config(tmp_path, url)
    r = Refresher(config)
    await r.start()
    await r.stop()
    assert sorted(c.name for c in config.all_customers()) == ["blog", "shop"]
    assert "2 of the 2 in the snapshot are gone" in caplog.text
    again = _config(tmp_path, url)
    await r.adopt(again)  # a reload accepts the database's answer
    assert again.all_customers() == ()
