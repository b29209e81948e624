"""type = "files": one TOML file per customer, refreshed without a reload."""

from __future__ import annotations

import logging
import shutil

from maild.customers.directory import Refresher
from maild.policy.customer import index
from maild.policy.ratelimit import customer_limits
from tests.customers.conftest import customer_toml, files_config, who, write_customer

N = 10_000


async def test_ten_thousand_files_then_one_changed_without_a_reload(tmp_path, caplog):
    caplog.set_level(logging.INFO, "maild")
    config = files_config(tmp_path, refresh="1s")
    d = tmp_path / "customers.d"
    for i in range(N):
        write_customer(d, f"c{i}", customer_toml(i))
    r = Refresher(config)
    await r.start()
    try:
        idx = index(config)
        assert len(idx.customers) == N
        assert who(config, "10.0.39.15") == "c9999" and who(config, "10.0.39.16") == "-"
        assert config.customer("c42").origin == f"files:{d / 'c42.toml'}"
        # nothing changed: no new index
        assert not await r.refresh() and index(config) is idx
        write_customer(
            d,
            "c9999",
            'networks = ["192.0.2.0/24"]\n',
        )
        assert await r.refresh()
        assert who(config, "192.0.2.77") == "c9999" and who(config, "10.0.39.15") == "-"
        assert index(config).by_name("c1") is idx.by_name("c1")  # not re-parsed
    finally:
        await r.stop()


async def test_a_malformed_file_keeps_the_version_in_force_and_names_file_key_and_fix(
    tmp_path, caplog
):
    config = files_config(tmp_path)
    d = tmp_path / "customers.d"
    p = write_customer(d, "acme", 'networks = ["192.0.2.0/24"]\ntier = "bulk"\n')
    r = Refresher(config)
    await r.start()
    write_customer(d, "acme", 'networks = ["192.0.2.300/24"]\n')
    write_customer(d, "broken", "networks = [\n")
    await r.refresh()
    await r.stop()
    assert who(config, "192.0.2.1") == "acme"
    assert config.customer("broken") is None
    text = caplog.text
    assert (
        f'customers: {p}: networks[0] = "192.0.2.300/24": expected an IP address or CIDR '
        'network, e.g. "192.0.2.0/24"; the version in force stays'
    ) in text
    assert f"customers: {d / 'broken.toml'}: TOML syntax error" in text and "; not loaded" in text


async def test_a_vanished_directory_keeps_the_customers_and_says_so(tmp_path, caplog):
    config = files_config(tmp_path)
    d = tmp_path / "customers.d"
    for i in range(3):
        write_customer(d, f"c{i}", customer_toml(i))
    r = Refresher(config)
    await r.start()
    shutil.rmtree(d)
    assert not await r.refresh()
    assert not await r.refresh()
    await r.stop()
    assert who(config, "10.0.0.2") == "c2"
    lines = [x for x in caplog.messages if "cannot read" in x]
    assert lines == [
        f"customers: cannot read {d}: No such file or directory; keeping the 3 source "
        "customers in force"
    ]  # once a minute, not at every refresh


async def test_a_source_that_shrinks_too_much_is_refused_until_a_reload(tmp_path, caplog):
    config = files_config(tmp_path, max_shrink="10%")
    d = tmp_path / "customers.d"
    for i in range(20):
        write_customer(d, f"c{i}", customer_toml(i))
    r = Refresher(config)
    await r.start()
    for i in range(2, 20):
        (d / f"c{i}.toml").unlink()
    assert not await r.refresh()
    assert who(config, "10.0.0.19") == "c19"
    assert "refresh refused" in caplog.text and "18 of the 20 in force are gone" in caplog.text
    (d / "c1.toml").unlink()
    (d / "c0.toml").write_text(customer_toml(0))
    # one customer gone is within any share: removing a customer is not refused
    new = files_config(tmp_path, max_shrink="10%")
    await r.adopt(new)  # a reload confirms
    await r.stop()
    assert [c.name for c in new.all_customers()] == ["c0"]


async def test_settings_and_collisions_with_policies_toml(tmp_path, caplog):
    from maild.components import parse
    from tests.customers.conftest import policy

    d = tmp_path / "customers.d"
    d.mkdir()
    config = parse(
        {
            **policy(
                {"type": "files", "path": str(d)},
                [{"name": "acme", "networks": ["192.0.2.0/24"]}],
            ),
            "ratelimit": {"tiers": {"bulk": {"messages": ["5000/1h"]}}},
        },
        str(tmp_path / "policies.toml"),
    )
    write_customer(d, "acme", 'networks = ["198.51.100.0/24"]\n')
    write_customer(d, "shop", 'networks = ["192.0.2.0/24"]\n')
    write_customer(d, "bulky", 'tier = "bulk"\n[ratelimit]\nrecipients = ["9/1m"]\n')
    r = Refresher(config)
    await r.start()
    await r.stop()
    assert who(config, "198.51.100.1") == "-" and who(config, "192.0.2.1") == "acme"
    assert config.customer("acme").origin.endswith("policies.toml")
    assert config.customer("shop") is None
    assert (
        "customers: shop (files:" in caplog.text
        and "network 192.0.2.0/24 belongs to customer acme" in caplog.text
    )
    limits = customer_limits(config, config.customer("bulky"))
    assert [x.text for x in limits.messages] == ["5000/1h"]
    assert [x.text for x in limits.recipients] == ["9/1m"]


def test_check_config_names_what_a_files_source_needs(tmp_path):
    import pytest

    from maild.components import parse
    from maild.config import ConfigError
    from tests.customers.conftest import policy

    with pytest.raises(ConfigError) as e:
        parse(
            policy(
                {
                    "type": "files",
                    "path": "",
                    "refresh": "0s",
                    "max_shrink": "150%",
                    "dsn": "postgresql://x/y",
                    "typo": 1,
                }
            )
        )
    text = str(e.value)
    assert 'customer_source.path = "": expected a directory of customer files' in text
    assert 'customer_source.refresh = "0s": expected a duration greater than zero' in text
    assert 'customer_source.max_shrink = "150%": expected a share from "0%" to "100%"' in text
    assert 'customer_source.dsn = "postgresql://x/y": expected no value' in text
    assert "customer_source.typo: unknown key" in text
    with pytest.raises(ConfigError, match="customer_source.type is missing"):
        parse(policy({"path": "/x"}))
