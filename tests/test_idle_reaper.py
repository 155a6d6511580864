"""The idle reaper (protocol.md decision 9) in-process, on the trio mock clock: a device that
stops syncing for ``idle_timeout`` has its peeks made dormant; devices that keep syncing,
and a device first seen later, are each judged by their own last sync."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio
import trio.testing

from peekproxy.federation.client import FederationClient, IpFilter, build_ssl_context
from peekproxy.federation.discovery import DnspythonLookup
from peekproxy.federation.keyring import Keyring
from peekproxy.peeks.service import PeekService, PeekSettings
from peekproxy.peeks.subscription import Subscription, SubState
from peekproxy.store import Store
from peekproxy.store import rooms as db

ROOM = "!room:remote.test"
ALICE = ("@alice:local.test", "PHONE")
BOB = ("@bob:local.test", "LAPTOP")
CAROL = ("@carol:local.test", "TABLET")


async def activate(store: Store, *devices: tuple[str, str]) -> None:
    for user_id, device_id in devices:
        await store.write(
            partial(
                db.set_device_peek,
                user_id=user_id,
                device_id=device_id,
                room_id=ROOM,
                state="active",
                now_ms=0,
            )
        )


async def test_only_devices_that_stop_syncing_go_dormant(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Jump only after 0.1 s of real idleness: SQLite work in worker threads must not be
    # overtaken by the virtual clock.
    autojump_clock.autojump_threshold = 0.1
    store = await Store.open(tmp_path / "p.db", "local.test")
    # A subscription with nothing to do: this test is about the device side only.
    dormant = Subscription(room_id=ROOM, state=SubState.DORMANT, candidates=("remote.test",))
    await store.write(lambda c: db.save_subscription(c, dormant))
    await activate(store, ALICE, BOB, CAROL)
    client = FederationClient(
        server_name=None,
        signing_key=None,
        dns=DnspythonLookup(),
        ip_filter=IpFilter([]),
        ssl_context=build_ssl_context(),
    )
    service = PeekService(
        store=store,
        client=client,
        keyring=Keyring(client),
        settings=PeekSettings(
            linger_ms=0,
            renewal_max_ms=1_800_000,
            max_peeks_per_device=100,
            max_remote_peeks=10,
            idle_timeout_ms=60_000,
        ),
        clock_ms=lambda: int(trio.current_time() * 1000),
    )

    async def state(device: tuple[str, str]) -> str | None:
        return await store.read(lambda c: db.device_peek_state(c, *device, ROOM))

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        start = trio.current_time()
        # Carol is idle from the start and dropped; she comes back later as a device the
        # reaper has not seen since, with a deadline of her own.
        await trio.sleep(61)
        assert await state(CAROL) == "dormant"
        assert await state(BOB) == "dormant"
        assert await state(ALICE) == "dormant"
        await activate(store, ALICE, BOB, CAROL)
        await service.sync(*ALICE, since=None, timeout_ms=0)
        await service.sync(*BOB, since=None, timeout_ms=0)
        seen = trio.current_time()
        for _ in range(6):  # Alice keeps syncing every 20 s; Bob stops
            await trio.sleep(20)
            assert await state(ALICE) == "active"  # her last sync was 20 s ago
            await service.sync(*ALICE, since=None, timeout_ms=0)
            if trio.current_time() - seen < 60:
                assert await state(BOB) == "active"
        assert await state(BOB) == "dormant"
        assert await state(ALICE) == "active"
        await service.sync(*CAROL, since=None, timeout_ms=0)
        carol_seen = trio.current_time()
        await trio.sleep(59)
        assert await state(CAROL) == "active"
        await trio.sleep(2)
        assert await state(CAROL) == "dormant"
        assert trio.current_time() - carol_seen < 62 and trio.current_time() - start > 180
        nursery.cancel_scope.cancel()
    await client.aclose()
    await store.aclose()
