"""The pure rules of several instances on one database (:mod:`peekproxy.core.cluster`), the
lease operations of the store (one SQLite database, two instance names), and the
``[cluster]`` config section."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peekproxy.config import ConfigError, load_config
from peekproxy.core.cluster import (
    Lease,
    default_instance_name,
    fenced,
    idle_reap_at,
    may_take,
    needs_follower,
    renew_every_ms,
    store_sync_due,
)
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.services.settings import cluster_settings
from tests.conftest import OpenStore

ROOM = "!r:remote.test"
times = st.integers(min_value=0, max_value=10**13)
leases_ms = st.integers(min_value=1, max_value=10**7)


@given(times, leases_ms, st.integers(min_value=0, max_value=10**7))
def test_only_the_owner_may_take_a_lease_until_it_expires(
    now: int, lease_ms: int, left: int
) -> None:
    lease = Lease(ROOM, "A", now + left)
    assert may_take(lease, "A", now)
    assert may_take(lease, "B", now) is (left == 0)
    assert may_take(None, "B", now)
    assert may_take(lease, "B", now + left + lease_ms)


@given(times, leases_ms)
def test_an_owner_stops_acting_when_its_lease_runs_out(now: int, lease_ms: int) -> None:
    held_until = now + lease_ms
    assert not fenced(held_until, now)
    assert fenced(held_until, held_until)
    assert fenced(None, now)
    # Renewed every third of the lease: two renewals may fail before it runs out.
    assert 3 * renew_every_ms(lease_ms) <= max(3, lease_ms)


@given(times, st.integers(min_value=4, max_value=10**8), st.integers(min_value=0, max_value=10**8))
def test_stored_syncs_are_coarse_and_never_reap_early(now: int, idle: int, since: int) -> None:
    # A device that syncs at `now` has a stored sync at most idle/4 older...
    stored = now - since if not store_sync_due(now - since, now, idle) else now
    assert now - stored < idle // 4 or stored == now
    # ... so an instance that only knows the stored one never reaps it before idle.
    at = idle_reap_at(None, stored, idle)
    assert at is not None and at >= now + idle
    # The exact last sync of this instance counts too; the later verdict wins.
    assert idle_reap_at(now, stored, idle) == max(now + idle, at)
    assert idle_reap_at(None, None, idle) is None


def test_a_room_needs_a_follower_while_peeked_or_something_is_left_to_do() -> None:
    active = Subscription(ROOM, state=SubState.ACTIVE, server="remote.test", peek_id="p")
    dormant = Subscription(ROOM, state=SubState.DORMANT, wanted=False)
    assert needs_follower(active, 0) and needs_follower(dormant, 1)
    assert not needs_follower(dormant, 0)
    assert needs_follower(
        Subscription(ROOM, state=SubState.DORMANT, pending_deletes=(("s", "p"),)), 0
    )
    assert not needs_follower(Subscription(ROOM, state=SubState.ENDED, wanted=False), 0)


async def test_the_store_gives_a_lease_to_one_instance_until_it_expires(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    assert await store.write(lambda tx: tx.take_lease(ROOM, "A", 1_000, 2_000))
    assert not await store.write(lambda tx: tx.take_lease(ROOM, "B", 1_500, 2_500))
    assert await store.write(lambda tx: tx.take_lease(ROOM, "A", 1_500, 2_500))  # renewed
    assert await store.write(lambda tx: tx.renew_leases("A", 3_000)) == [ROOM]
    assert await store.write(lambda tx: tx.renew_leases("B", 3_000)) == []
    assert await store.write(lambda tx: tx.request_end(ROOM, "encrypted"))
    # A died: B takes the room once the lease has expired; A's renewal no longer has it.
    assert await store.write(lambda tx: tx.take_lease(ROOM, "B", 3_000, 4_000))
    assert await store.write(lambda tx: tx.renew_leases("A", 5_000)) == []
    assert await store.read(lambda tx: tx.leases()) == {
        ROOM: Lease(ROOM, "B", 4_000, "encrypted")  # the end request waits for its owner
    }
    other = "!other:remote.test"
    assert await store.write(lambda tx: tx.take_lease(other, "A", 5_000, 6_000))
    assert set(await store.read(lambda tx: tx.leases())) == {ROOM, other}
    assert await store.read(lambda tx: tx.leases(ROOM)) == {  # one room's alone
        ROOM: Lease(ROOM, "B", 4_000, "encrypted")
    }
    await store.write(lambda tx: tx.release_lease(other, "A"))
    await store.write(lambda tx: tx.release_lease(ROOM, "A"))  # not A's: kept
    assert ROOM in await store.read(lambda tx: tx.leases())
    await store.write(lambda tx: tx.release_lease(ROOM, "B"))
    assert await store.read(lambda tx: tx.leases()) == {}
    assert not await store.write(lambda tx: tx.request_end(ROOM, "encrypted"))
    await store.aclose()


async def test_the_store_keeps_each_devices_last_sync(open_store: OpenStore) -> None:
    store = await open_store()
    for device in ("PHONE", "LAPTOP"):
        await store.write(
            lambda tx: tx.set_device_peek("@a:local.test", device, ROOM, "active", 0)  # noqa: B023
        )
    await store.write(lambda tx: tx.record_sync("@a:local.test", "PHONE", 5_000))
    await store.write(lambda tx: tx.record_sync("@a:local.test", "PHONE", 4_000))  # never back
    assert await store.write(lambda tx: tx.record_unsynced_devices(1_000)) == 1  # LAPTOP
    assert await store.read(lambda tx: tx.last_sync("@a:local.test", "PHONE")) == 5_000
    assert await store.read(lambda tx: tx.idle_devices(4_000)) == [
        ("@a:local.test", "LAPTOP", 1_000)
    ]
    assert len(await store.read(lambda tx: tx.idle_devices(6_000))) == 2
    await store.aclose()


def test_the_cluster_section(tmp_path: Path) -> None:
    text = '[server]\nserver_name = "example.org"\nsigning_key_file = "signing.key"\n'
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path, {}, check_files=False)
    assert not config.cluster_enabled and config.cluster.lease == 15.0
    postgres = '[store]\nbackend = "postgres"\ndsn = "dbname=peekproxy"\n'
    path.write_text(text + postgres)
    assert load_config(path, {}, check_files=False).cluster_enabled  # on with PostgreSQL
    path.write_text(text + postgres + "[cluster]\nenabled = false\n")
    assert not load_config(path, {}, check_files=False).cluster_enabled
    path.write_text(text + '[cluster]\nenabled = true\ninstance_name = "pp1"\nlease = "30s"\n')
    config = load_config(path, {}, check_files=False)
    settings = cluster_settings(config.cluster.instance_name, config.cluster.lease)
    assert (settings.instance_name, settings.lease_ms) == ("pp1", 30_000)
    default = default_instance_name(socket.gethostname(), os.getpid())
    assert cluster_settings(None, 15).instance_name == default
    path.write_text(text + "[cluster]\nlease = 0.5\n")
    with pytest.raises(ConfigError, match=r"cluster\.lease"):
        load_config(path, {}, check_files=False)
