"""The metrics an admin graphs, read from a running daemon's ``/metrics`` after a real peek
(a testbed remote over TLS, found through DNS), and the Grafana dashboard's queries
(contrib/grafana/peekproxy.json) checked against the series that daemon exports."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from peekproxy.metrics import SUBSCRIPTION_STATES, TRANSPORTS
from tests import front_support
from tests.conftest import Spawn
from tests.dashboard_check import exported_series, problems
from tests.front_support import Account
from tests.peek_world import PEEKPROXY, TESTBED, PeekWorld, build_world
from tests.support import DaemonProcess
from tests.synapse import Synapse

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "peekproxy.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(daemon: DaemonProcess) -> tuple[str, Samples]:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{daemon.metrics}/metrics")
    assert response.status_code == 200
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One series' value; a missing series fails (every one the tests read must exist)."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exported"
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` that have ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def wait_for(daemon: DaemonProcess, check: object, timeout: float = 30.0) -> Samples:
    """Scrape until ``check(samples)`` holds (fail at the deadline)."""
    assert callable(check)
    with trio.move_on_after(timeout):
        while True:
            _, samples = await scrape(daemon)
            if check(samples):
                return samples
            await trio.sleep(0.1)
    raise AssertionError("the metrics never showed what was expected")


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        peeks_env={"PEEKPROXY_PEEKS__LINGER": "0.1", "PEEKPROXY_PEEKS__IDLE_TIMEOUT": "8s"},
    )


async def test_metrics_after_a_peek_and_the_dashboard(world: PeekWorld) -> None:
    daemon = world.daemon
    _, fresh = await scrape(daemon)
    # Every (state, transport) pair is there from start, at 0: dashboards show zeros.
    for state in SUBSCRIPTION_STATES:
        for transport in TRANSPORTS:
            assert value(fresh, "peekproxy_subscriptions", state=state, transport=transport) == 0
    assert value(fresh, "peekproxy_device_peeks", status="active") == 0

    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    first = await world.sync()
    sent = [world.send(room_id, f"live {i}") for i in range(3)]
    await world.wait_delivered(*sent)
    caught_up = await world.sync(since=first["next_batch"])
    assert len(caught_up["rooms"]["peek"][room_id]["timeline"]["events"]) == len(sent)

    # A long-poll in flight, then woken by a live event.
    polled: dict[str, object] = {}

    async def poll() -> None:
        polled.update(await world.sync(since=caught_up["next_batch"], timeout_ms=20_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await wait_for(daemon, lambda s: value(s, "peekproxy_long_polls", api="delegation") == 1)
        sent.append(world.send(room_id, "wakes the long-poll"))
    await world.wait_delivered(*sent)
    assert polled["next_batch"]

    # An unauthenticated /send is refused and counted.
    async with httpx.AsyncClient(verify=False, timeout=30) as http:
        refused = await http.put(f"{daemon.federation}/_matrix/federation/v1/send/t1", json={})
    assert refused.status_code == 401

    # The device peeks are counted every 5 s (services/gauges.py), the rest at each scrape.
    await wait_for(daemon, lambda s: value(s, "peekproxy_device_peeks", status="active") == 1)
    text, samples = await scrape(daemon)
    assert value(samples, "peekproxy_subscriptions", state="active", transport="msc2444") == 1
    assert total(samples, "peekproxy_subscriptions") == 1
    assert value(samples, "peekproxy_device_peeks", status="active") == 1
    assert value(samples, "peekproxy_device_peeks", status="dormant") == 0

    # /send: what the testbed delivered, transaction by transaction.
    delivered = [t for t in world.testbed.senders[PEEKPROXY].transactions if t.status == "sent"]
    pushed = sum(len(t.event_ids) for t in delivered)
    assert pushed == len(sent)
    assert value(samples, "peekproxy_send_transactions_total", outcome="accepted") == len(delivered)
    assert value(samples, "peekproxy_send_transactions_total", outcome="duplicate") == 0
    assert value(samples, "peekproxy_send_transactions_total", outcome="unauthenticated") == 1
    assert value(samples, "peekproxy_send_pdus_total", outcome="stored") == len(sent)
    for outcome in ("duplicate", "rejected", "invalid", "not_peeked", "dropped"):
        assert value(samples, "peekproxy_send_pdus_total", outcome=outcome) == 0

    # Outbound: the peek itself and the testbed's server keys, both answered.
    assert value(samples, "peekproxy_federation_requests_total", endpoint="peek", result="ok") == 1
    assert value(samples, "peekproxy_federation_requests_total", endpoint="keys", result="ok") >= 1
    assert (
        total(samples, "peekproxy_federation_request_duration_seconds_count", endpoint="peek") == 1
    )

    # The woken long-poll's wake latency; the store's operations timed by name.
    assert value(samples, "peekproxy_wake_latency_seconds_count") >= 1
    assert total(samples, "peekproxy_store_operation_duration_seconds_count", kind="write") > 0
    txn_reads = value(
        samples,
        "peekproxy_store_operation_duration_seconds_count",
        operation="txn_response",
        kind="read",
    )
    assert txn_reads == len(delivered)
    assert value(samples, "peekproxy_long_polls", api="delegation") == 0

    # The dashboard's every query names series this daemon exports, with their labels.
    dashboard = json.loads(DASHBOARD.read_text())
    assert problems(dashboard, exported_series(text)) == []

    # The device stops syncing: after idle_timeout its peek is dormant.
    idle = await wait_for(
        daemon, lambda s: value(s, "peekproxy_device_peeks", status="dormant") == 1
    )
    assert value(idle, "peekproxy_device_peeks", status="active") == 0


async def test_front_mode_metrics_with_synapse(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Front mode before the real Synapse: a world_readable room of Synapse itself is followed
    through its client API (transport ``client_api``), and the client's own ``/sync`` counts
    as a front long-poll while it waits."""
    alice, bob, reader = (Account(synapse, f"metrics-{n}") for n in ("alice", "bob", "reader"))
    room_id = await alice.create_room(version="10")
    world = await front_support.front_world(
        synapse, nursery, tls_ca, tmp_path, spawn, reader=reader
    )
    daemon = world.daemon
    await front_support.peek(world, bob.token, room_id)
    first = await front_support.sync(daemon.client, bob.token)

    async def poll_until_live() -> None:
        since = first["next_batch"]
        with trio.fail_after(30):
            while True:
                synced = await front_support.sync(
                    daemon.client, bob.token, since=since, timeout_ms=20_000
                )
                if "live for metrics" in json.dumps(synced):
                    return
                since = synced["next_batch"]

    async with trio.open_nursery() as polls:
        polls.start_soon(poll_until_live)
        await wait_for(daemon, lambda s: value(s, "peekproxy_long_polls", api="front") == 1)
        await alice.send(room_id, "live for metrics")

    await wait_for(daemon, lambda s: value(s, "peekproxy_device_peeks", status="active") == 1)
    _, samples = await scrape(daemon)
    assert value(samples, "peekproxy_subscriptions", state="active", transport="client_api") == 1
    assert total(samples, "peekproxy_subscriptions") == 1
    assert value(samples, "peekproxy_device_peeks", status="active") == 1
    assert value(samples, "peekproxy_long_polls", api="front") == 0
    assert value(samples, "peekproxy_front_syncs_total", outcome="merged") >= 1
    assert value(samples, "peekproxy_wake_latency_seconds_count") >= 1
    # No federation was needed for a room of the fronted homeserver: no peek was sent.
    assert total(samples, "peekproxy_federation_requests_total", endpoint="peek") == 0


async def test_renewals_lapses_and_repeeks_are_counted(world: PeekWorld) -> None:
    world.testbed.renewal_interval_ms = 2_000  # renewed every second
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) >= 2, timeout=20)
    renewed = await wait_for(
        world.daemon, lambda s: value(s, "peekproxy_renewals_total", result="ok") >= 2
    )
    assert value(renewed, "peekproxy_lapses_total") == 0
    assert value(renewed, "peekproxy_repeeks_total", result="ok") == 0

    # The remote forgets the peek and refuses the next renewal: a lapse, then a re-peek.
    world.testbed.faults.update(
        {"peek_count": 1, "peek_status": 404, "peek_errcode": "M_NOT_FOUND"}
    )
    [(_, origin, _, peek_id)] = world.log_of("start")
    assert world.testbed.peeks.delete(origin, room_id, peek_id, world.testbed.clock_ms())
    await world.daemon.wait_for_log(rb"after a gap")
    samples = await wait_for(
        world.daemon, lambda s: value(s, "peekproxy_repeeks_total", result="ok") == 1
    )
    assert value(samples, "peekproxy_renewals_total", result="failed") == 1
    assert value(samples, "peekproxy_lapses_total") == 1
    assert value(samples, "peekproxy_subscriptions", state="active", transport="msc2444") == 1
    assert (
        value(samples, "peekproxy_federation_requests_total", endpoint="peek", result="http_4xx")
        == 1
    )
