"""`maild customers import FILE.csv`: a CSV export into the files layout maild reads."""

from __future__ import annotations

from click.testing import CliRunner

from maild.cli import main
from maild.components import load
from tests.customers.conftest import who

CSV = (
    "Name,Network,Login,Domain,Contact,Tier\n"
    "shop,198.51.100.0/24,shop@sasl,shop.example,ops@shop.example,bulk\n"
    "shop,2001:db8:5::/48,,shop2.example,,\n"
    'beta,203.0.113.7,,"beta.example beta2.example",,\n'
)


def _setup(tmp_path, csv: str = CSV):
    (tmp_path / "in.csv").write_text(csv)
    cfg = tmp_path / "policies.toml"
    cfg.write_text(
        '[postmaster]\ndomains = ["hosted.example"]\n'
        '[ratelimit.tiers.bulk]\nmessages = ["5000/1h"]\n'
        '[customer_source]\ntype = "files"\npath = "customers.d"\n'
    )
    return cfg


def _import(cfg, *extra: str):
    return CliRunner().invoke(
        main, ["customers", "import", str(cfg.parent / "in.csv"), "-c", str(cfg), *extra]
    )


def test_a_csv_becomes_customer_files_maild_reads(tmp_path):
    cfg = _setup(tmp_path)
    r = _import(cfg)
    assert r.exit_code == 0, r.output
    assert "2 new, 0 changed, 0 unchanged" in r.output
    assert (tmp_path / "customers.d" / "shop.toml").read_text() == (
        'name = "shop"\n'
        'networks = ["198.51.100.0/24", "2001:db8:5::/48"]\n'
        'logins = ["shop@sasl"]\n'
        'domains = ["shop.example", "shop2.example"]\n'
        'contact = "ops@shop.example"\n'
        'tier = "bulk"\n'
    )
    config = load(str(cfg))
    assert who(config, "2001:db8:5::1") == "shop" and who(config, "203.0.113.7") == "beta"
    assert config.customer("beta").domains == ("beta.example", "beta2.example")
    assert _import(cfg).output.count("0 new, 0 changed, 2 unchanged") == 1


def test_one_bad_row_writes_nothing_and_names_row_key_and_fix(tmp_path):
    cfg = _setup(tmp_path, CSV + "gamma,10.0.0.300,,,,\n")
    r = _import(cfg)
    assert r.exit_code == 2
    assert 'customer gamma: networks[0] = "10.0.0.300": expected an IP address' in r.output
    assert not (tmp_path / "customers.d").exists()


def test_a_changed_customer_needs_replace(tmp_path):
    cfg = _setup(tmp_path)
    assert _import(cfg).exit_code == 0
    (tmp_path / "in.csv").write_text(CSV.replace("203.0.113.7", "203.0.113.8"))
    r = _import(cfg)
    assert r.exit_code == 2 and "beta.toml" in r.output and "--replace" in r.output
    assert _import(cfg, "--replace").exit_code == 0
    assert who(load(str(cfg)), "203.0.113.8") == "beta"
