"""Issue 16's acceptance: three peekproxy processes on one PostgreSQL database behind nginx
running contrib/nginx/peekproxy-cluster.conf (only its placeholders filled in), the testbed
as the remote server reaching the cluster through nginx (TLS ends there)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.cluster_world import Cluster, build_cluster
from tests.conftest import Spawn
from tests.peek_world import PEEKPROXY
from tests.proxies import NGINX_CLUSTER_CONF, StartProxy, address, render_cluster
from tests.support import issue_cert
from tests.synapse import REPO, free_tcp_port
from tests.test_cluster import until

LEASE_S = 2.0
DEVICES = [(f"@u{n}:peekproxy.test", f"D{n}") for n in range(3)]


class Device:
    """One device's sync stream: every event ID it was handed, every ``limited`` flag."""

    def __init__(self, cluster: Cluster, room_id: str, index: int) -> None:
        self.cluster, self.room_id = cluster, room_id
        self.user, self.device = DEVICES[index]
        self.since: str | None = None
        self.seen: list[str] = []
        self.limited: list[bool] = []

    async def sync(self, via: str, timeout_ms: int = 0) -> None:
        answer = await self.cluster.world.sync(
            user=self.user, device=self.device, since=self.since, timeout_ms=timeout_ms, via=via
        )
        self.since = answer["next_batch"]
        room: dict[str, Any] | None = answer.get("rooms", {}).get("peek", {}).get(self.room_id)
        if room is not None:
            self.seen += [e["event_id"] for e in room["timeline"]["events"]]
            self.limited.append(bool(room["timeline"].get("limited")))

    async def until_seen(self, via: str, *event_ids: str) -> None:
        with trio.fail_after(30):
            while not set(event_ids) <= set(self.seen):
                await self.sync(via, timeout_ms=5_000)


def test_docs_show_the_shipped_cluster_configuration() -> None:
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert f"```nginx\n{NGINX_CLUSTER_CONF.read_text()}```" in docs


async def _cluster_behind_nginx(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    pg_dsn: str,
    reverse_proxies: StartProxy,
) -> tuple[Cluster, str]:
    """Three instances and nginx in front (its plain-HTTP client base URL)."""
    cluster = await build_cluster(
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        pg_dsn,
        instances=3,
        lease=f"{LEASE_S}s",
        plain_federation=True,
    )
    client_port = free_tcp_port()
    config = render_cluster(
        federation=cluster.world.federation_port,
        client=client_port,
        tls=issue_cert(tls_ca, tmp_path, PEEKPROXY),
        instances=[(address(d.client), address(d.federation)) for d in cluster.daemons],
    )
    proxy = await reverse_proxies("nginx", rendered=(client_port, config))
    return cluster, proxy.url


async def _peeked_everywhere(cluster: Cluster) -> tuple[str, list[Device], list[str]]:
    """A testbed room peeked by a device on each instance (one remote subscription), and
    three events every device has seen: (room ID, devices, those event IDs)."""
    world = cluster.world
    room_id = world.create_room()
    devices = [Device(cluster, room_id, n) for n in range(3)]
    for n, device in enumerate(devices):
        peeked = await world.peek(
            room_id, user=device.user, device=device.device, via=cluster.client(n)
        )
        assert peeked.status_code == 200, peeked.text
        await device.sync(cluster.client(n))
    assert [entry[1:3] for entry in world.log_of("start")] == [(PEEKPROXY, room_id)]
    # Events reach every device (the testbed delivers through nginx to any instance).
    before = [world.send(room_id, f"before {i}") for i in range(3)]
    await world.wait_delivered(*before)
    for n, device in enumerate(devices):
        await device.until_seen(cluster.client(n), *before)
    return room_id, devices, before


async def _kill_owner(cluster: Cluster, room_id: str) -> tuple[int, str]:
    """``kill -9`` of the instance following the room: (its index, its name)."""
    owner = cluster.owner(room_id)
    assert owner is not None
    dead = int(owner.removeprefix("pp"))
    cluster.daemons[dead].signal(signal.SIGKILL)
    await cluster.daemons[dead].wait()
    return dead, owner


async def _taken_over(cluster: Cluster, room_id: str, owner: str) -> None:
    async def taken_over() -> bool:
        return cluster.owner(room_id) not in (owner, None)

    await until(taken_over, timeout_s=15)


async def test_three_instances_behind_nginx_one_subscription_and_takeover(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    pg_dsn: str,
    reverse_proxies: StartProxy,
) -> None:
    cluster, nginx = await _cluster_behind_nginx(
        nursery, tls_ca, tmp_path, spawn, pg_dsn, reverse_proxies
    )
    world = cluster.world
    # Devices spread across the instances peek the same room: one remote subscription.
    room_id, devices, before = await _peeked_everywhere(cluster)

    # kill -9 of the owner: another instance takes the room over within the lease time.
    renewals = len(world.log_of("renew"))
    dead, owner = await _kill_owner(cluster, room_id)
    killed = time.monotonic()
    survivors = [n for n in range(3) if n != dead]
    during = world.send(room_id, "while nobody follows")  # /send on a survivor, via nginx
    await _taken_over(cluster, room_id, owner)
    taken_after = time.monotonic() - killed
    # lease + one look (lease / 3) + the time the owner's last renewal was before the kill
    assert taken_after < LEASE_S * (1 + 1 / 3) + 1.0, taken_after
    # The new owner renewed the same remote peek (the testbed did not expire it): no re-peek.
    await world.testbed.wait_until(lambda: len(world.log_of("renew")) > renewals, timeout=10)
    assert len(world.log_of("start")) == 1

    after = [world.send(room_id, f"after {i}") for i in range(3)]
    await world.wait_delivered(during, *after)
    everything = [*before, during, *after]
    for n in survivors:
        await devices[n].until_seen(cluster.client(n), *everything)
    # The dead instance's device reconnects through nginx with its old token, misses nothing.
    await devices[dead].until_seen(nginx, *everything)

    for device in devices:
        # every event exactly once (the first answer also held the room's creation events)
        assert len(device.seen) == len(set(device.seen)), device.device
        assert [e for e in device.seen if e in everything] == everything, device.device
        assert not any(device.limited), device.device  # no gap: the testbed lost nothing
    assert len(world.log_of("start")) == 1
    print(f"takeover after kill -9: {taken_after:.2f} s (lease {LEASE_S} s)")


@pytest.mark.parametrize("recoverable", [True, False], ids=["fetched", "lost"])
async def test_the_dead_owners_peek_expired_by_the_testbed(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    pg_dsn: str,
    reverse_proxies: StartProxy,
    recoverable: bool,
) -> None:
    """The remote expired the peek while its owner was dead: the new owner's renewal is
    refused, it peeks again, and fetches the events pushed to nobody meanwhile (no gap); if
    the testbed cannot give them (``get_missing_events`` empty, backfill failing), every
    device sees the gap (``limited: true``)."""
    cluster, nginx = await _cluster_behind_nginx(
        nursery, tls_ca, tmp_path, spawn, pg_dsn, reverse_proxies
    )
    world = cluster.world
    room_id, devices, _ = await _peeked_everywhere(cluster)
    [(_, _, _, peek_id)] = world.log_of("start")
    dead, owner = await _kill_owner(cluster, room_id)
    world.testbed.expire_peek(PEEKPROXY, room_id, peek_id)  # the remote forgot the peeker
    # Pushed to nobody; the second is the room's newest event, in the answer to the re-peek.
    missed = world.send(room_id, "pushed to nobody")
    world.send(room_id, "pushed to nobody either")
    if not recoverable:
        world.testbed.faults.missing_events_empty_next = 100
        world.testbed.faults.backfill_fail_next = 100
    await _taken_over(cluster, room_id, owner)
    await world.testbed.wait_until(lambda: len(world.log_of("start")) == 2, timeout=15)
    after = world.send(room_id, "after the re-peek")
    await world.wait_delivered(after)
    for n, device in enumerate(devices):
        await device.until_seen(nginx if n == dead else cluster.client(n), after)
        assert len(device.seen) == len(set(device.seen)), device.device
        assert (missed in device.seen) is recoverable, device.device
        assert any(device.limited) is not recoverable, device.device
