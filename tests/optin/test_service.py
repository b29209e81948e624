"""The daemon's cache: loads, follows the CLI, applies its own events at once, retries."""

from __future__ import annotations

import asyncio
import logging

from maild.antispam.sanctions import control
from maild.components import open_store
from maild.optin.ledger import Ledger
from maild.optin.model import Kind, State
from maild.optin.service import OptinService
from maild.optin.settings import ListConfig
from maild.optin.tokens import token_hash

LIST = "news.acme.example"


async def started(config, store) -> OptinService:
    svc = OptinService(config, store, None)
    await svc.start()
    return svc


async def test_start_loads_the_ledger_and_stored_lists(config, store, ledger, caplog):
    await ledger.append(list_id=LIST, address="a@x.example", kind=Kind.OWNER_ADD, channel="cli")
    await ledger.append(
        list_id=LIST,
        address="b@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash="f" * 64,
        detail={"expires": "2999-01-01T00:00:00.000000Z"},
    )
    await ledger.register_list(
        ListConfig(
            id="tips.acme.example",
            customer="acme",
            owner="t@acme.example",
            consent_text="t",
            domain="lists.hosted.example",
        ),
        "cli:root",
    )
    caplog.set_level(logging.INFO, logger="maild.optin")
    svc = await started(config, store)
    try:
        assert svc.standing(LIST, "A@x.example").state is State.CONFIRMED
        assert svc.standing(LIST, "b@x.example").state is State.PENDING
        assert svc.tokens["f" * 64].address == "b@x.example"
        assert svc.registry().get("tips.acme.example").source == "store"
        assert "optin: lists=3 subscribers=2 events=2 tokens=1" in caplog.text
    finally:
        await svc.stop()


async def test_cli_changes_reach_the_daemon_through_control(config, store, tmp_path):
    svc = await started(config, store)
    other = await open_store(store.path)  # the CLI's own connection
    try:
        await Ledger(other).append(
            list_id=LIST, address="c@x.example", kind=Kind.OWNER_ADD, channel="cli"
        )
        await control(other, "optin", LIST)
        assert svc.standing(LIST, "c@x.example").state is State.UNKNOWN
        svc._own_poll = True
        await svc._poll_control()  # what the 2-second housekeeping does
        await asyncio.gather(*svc.tasks)
        assert svc.standing(LIST, "c@x.example").state is State.CONFIRMED
    finally:
        await other.close()
        await svc.stop()


async def test_a_refusal_reads_the_ledger_again_first(config, store):
    """A confirmation the CLI wrote a moment ago counts before the periodic fold."""
    svc = await started(config, store)
    other = await open_store(store.path)  # the CLI's own connection
    try:
        await Ledger(other).append(
            list_id=LIST, address="d@x.example", kind=Kind.OWNER_ADD, channel="cli"
        )
        assert svc.standing(LIST, "d@x.example").state is State.UNKNOWN  # the cache lags
        st = await svc.standing_before_refusal(LIST, "d@x.example")
        assert st.state is State.CONFIRMED and st.sendable
        nobody = await svc.standing_before_refusal(LIST, "nobody@x.example")
        assert not nobody.sendable
    finally:
        await other.close()
        await svc.stop()


async def test_a_stored_lists_addresses_are_its_customers_for_ownership(
    config, store, ledger, monkeypatch
):
    """`maild optin list register` lists and issued tokens reach owner_of through the
    running service, for the list's customer only."""
    from maild.policy.identity import lists_of, owner_of

    await ledger.register_list(
        ListConfig(
            id="tips.acme.example",
            customer="acme",
            owner="tips@acme.example",
            consent_text="t",
            domain="hosted.example",
            return_paths=("tips-bounces+*@hosted.example",),
            unsubscribe=("tips-leave@hosted.example",),
        ),
        "cli:root",
    )
    await ledger.append(
        list_id="tips.acme.example",
        address="b@x.example",
        kind=Kind.REQUEST,
        channel="web",
        token_hash=token_hash("tok1"),
        detail={"expires": "2999-01-01T00:00:00.000000Z"},
    )
    svc = await started(config, store)
    try:
        acme, other = config.customer("acme"), config.customer("other")
        for addr, why in (
            ("tips-bounces+b=x.example@hosted.example", "return path"),
            ("tips-leave@hosted.example", "unsubscribe address"),
            ("confirm+tok1@hosted.example", "confirmation address"),
        ):
            assert (
                owner_of(acme, addr, "envelope", lists_of(config, svc))
                == f"{why} of list tips.acme.example"
            )
            assert owner_of(other, addr, "envelope", lists_of(config, svc)) is None
        assert owner_of(acme, "confirm+tok2@hosted.example", "from", lists_of(config, svc)) is None
    finally:
        await svc.stop()


async def test_own_events_apply_at_once_and_survive_a_store_outage(config, store, caplog):
    svc = await started(config, store)
    try:
        await store.execute("ALTER TABLE optin_events RENAME TO optin_events_away")
        svc.record(
            "test revoke",
            [
                dict(
                    list_id=LIST,
                    address="d@x.example",
                    kind=Kind.REVOKE,
                    channel="mailto",
                    raw=b"Subject: unsubscribe\r\n\r\n",
                )
            ],
        )
        assert svc.standing(LIST, "d@x.example").state is State.REVOKED  # honoured at once
        for _ in range(100):
            if "cannot record test revoke" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "cannot record test revoke" in caplog.text
        await store.execute("ALTER TABLE optin_events_away RENAME TO optin_events")
        await asyncio.wait_for(svc.queue.join(), 10)
        assert [e.kind for e in await svc.ledger.events_for("d@x.example")] == [Kind.REVOKE]
        assert not svc.overlay and svc.standing(LIST, "d@x.example").state is State.REVOKED
    finally:
        await svc.stop()


async def test_events_still_queued_at_shutdown_are_logged(config, store, caplog):
    svc = await started(config, store)
    await store.execute("ALTER TABLE optin_events RENAME TO optin_events_away")
    svc.record(
        "late",
        [dict(list_id=LIST, address="e@x.example", kind=Kind.COMPLAINT, channel="complaint")],
    )
    await svc.stop(grace=0.2)
    assert (
        "NOT RECORDED at shutdown: list=news.acme.example address=e@x.example "
        "event=complaint" in caplog.text
    )


async def test_delivered_counts_persist_across_restarts(config, store):
    svc = await started(config, store)
    svc.count_delivered(LIST, 40)
    await svc.stop()
    svc = await started(config, store)
    try:
        assert svc.complaint_rate(LIST) == (0, 40, 0.0)
    finally:
        await svc.stop()


async def test_complaint_rate_has_a_volume_floor(config, store):
    svc = await started(config, store)
    try:
        await svc.ledger.append(
            list_id=LIST, address="f@x.example", kind=Kind.COMPLAINT, channel="complaint"
        )
        await svc.refresh()
        svc.count_delivered(LIST, 10)
        assert svc.complaint_rate(LIST) == (1, 10, 1.0)  # 1 / max(10, 100)
        svc.count_delivered(LIST, 990)
        assert svc.complaint_rate(LIST) == (1, 1000, 0.1)
    finally:
        await svc.stop()
