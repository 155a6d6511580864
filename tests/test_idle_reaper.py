"""The idle reaper (protocol.md decision 9) in-process, on a trio mock clock the test moves
by hand (SQLite runs in worker threads, which an autojumping clock could overtake): a device
that stops syncing for ``idle_timeout`` has its peeks made dormant; devices that keep
syncing, and a device first seen later, are each judged by their own last sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from peekproxy.core.subscription import Subscription, SubState
from peekproxy.services.assembly import Services
from peekproxy.store import Storage
from peekproxy.store.sqlite import open_sqlite
from tests.offline import offline_service

ROOM = "!room:remote.test"
ALICE = ("@alice:local.test", "PHONE")
BOB = ("@bob:local.test", "LAPTOP")
CAROL = ("@carol:local.test", "TABLET")


async def activate(store: Storage, *devices: tuple[str, str]) -> None:
    for user_id, device_id in devices:
        await store.write(
            lambda tx: tx.set_device_peek(
                user_id=user_id,  # noqa: B023
                device_id=device_id,  # noqa: B023
                room_id=ROOM,
                state="active",
                now_ms=0,
            )
        )


class DropLog:
    """Records each call of the service's ``_make_dormant``: which device, at what time."""

    def __init__(self, service: Services) -> None:
        self.calls: list[tuple[tuple[str, str], float]] = []
        self.finished: list[tuple[str, str]] = []
        self._changed = trio.Event()
        self._original = service.syncing._make_dormant

    async def make_dormant(self, user_id: str, device_id: str) -> None:
        self.calls.append(((user_id, device_id), trio.current_time()))
        await self._original(user_id, device_id)
        self.finished.append((user_id, device_id))
        self._changed.set()
        self._changed = trio.Event()

    def times(self, device: tuple[str, str]) -> list[float]:
        return [at for d, at in self.calls if d == device]

    async def wait_finished(self, device: tuple[str, str], count: int) -> None:
        while self.finished.count(device) < count:
            await self._changed.wait()


async def test_only_devices_that_stop_syncing_go_dormant(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    # A subscription with nothing to do: this test is about the device side only.
    dormant = Subscription(room_id=ROOM, state=SubState.DORMANT, candidates=("remote.test",))
    await store.write(lambda tx: tx.save_subscription(dormant))
    await activate(store, ALICE, BOB, CAROL)
    service = offline_service(store)
    drops = DropLog(service)
    monkeypatch.setattr(service.syncing, "_make_dormant", drops.make_dormant)

    async def state(device: tuple[str, str]) -> str | None:
        return await store.read(lambda tx: tx.device_peek_state(*device, ROOM))

    async def advance(seconds: float) -> None:
        mock_clock.jump(seconds)
        await trio.testing.wait_all_tasks_blocked()  # the reaper has looked, if it was due

    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        start = trio.current_time()
        # Nobody syncs: every device is dropped once idle_timeout has passed, not before.
        await advance(59)
        assert drops.calls == []
        await advance(2)
        for device in (ALICE, BOB, CAROL):
            await drops.wait_finished(device, 1)
            assert drops.times(device) == [start + 61]
            assert await state(device) == "dormant"

        await activate(store, ALICE, BOB, CAROL)
        await service.syncing.sync(*ALICE, since=None, timeout_ms=0)
        await service.syncing.sync(*BOB, since=None, timeout_ms=0)
        bob_seen = trio.current_time()
        assert service.syncing.live.knows(BOB)
        for _ in range(6):  # Alice keeps syncing every 20 s; Bob stops
            await advance(20)
            assert drops.times(ALICE) == [start + 61]  # never again
            await service.syncing.sync(*ALICE, since=None, timeout_ms=0)
        await drops.wait_finished(BOB, 2)
        assert drops.times(BOB)[1] - bob_seen == 60
        assert await state(BOB) == "dormant"
        assert not service.syncing.live.knows(BOB)  # an idle device leaves the live window
        assert await state(ALICE) == "active"

        # Carol appears after the reaper planned its next wake-up: her own deadline counts.
        await service.syncing.sync(*CAROL, since=None, timeout_ms=0)
        carol_seen = trio.current_time()
        await advance(59)
        assert len(drops.times(CAROL)) == 1
        await advance(2)
        await drops.wait_finished(CAROL, 2)
        assert drops.times(CAROL)[1] - carol_seen == 61
        assert await state(CAROL) == "dormant"
        nursery.cancel_scope.cancel()
    await service.client.aclose()
    await store.aclose()
