"""The live window against the store when one write carries several rows (events, EDUs,
peek changes, duplicate events) and the window is small: memory answers equal store answers."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from peekproxy.core.live import LiveWindow
from peekproxy.store import WriteTransaction
from peekproxy.store.sql import SqlTransaction
from tests.conftest import OpenStore
from tests.test_live_window import (
    ALICE,
    BOB,
    OTHER,
    ROOM,
    _pdu,
    snapshot_of,
    window_matches_store,
)


@pytest.mark.parametrize("seed", range(10))
async def test_multi_row_writes(open_store: OpenStore, seed: int) -> None:
    rng = random.Random(seed)
    store = await open_store()
    window = LiveWindow(capacity=rng.choice([5, 12, 1000]))
    store.set_commit_hook(
        lambda tx: tx.stream_changes(window.watermark),
        lambda r: window.start(r[1]) if window.watermark is None else window.apply(*r),
    )
    await store.write(lambda tx: None)
    rooms = [ROOM, OTHER]
    devices = [ALICE, BOB]
    for d in devices:
        for r in rooms:
            await store.write(
                lambda tx: tx.set_device_peek(
                    user_id=d[0],  # noqa: B023
                    device_id=d[1],  # noqa: B023
                    room_id=r,  # noqa: B023
                    state="active",
                    now_ms=0,
                )
            )
    tokens = [await store.read(lambda tx: tx.max_stream_pos())]
    answered = 0
    n = 0
    for _step in range(60):
        ops: list[Callable[[Any], object]] = []
        for _ in range(rng.randint(1, 4)):
            n += 1
            room_id = rng.choice(rooms)
            roll = rng.random()
            if roll < 0.5:
                eid = f"$event{rng.randint(0, n)}"  # sometimes a repeat
                ops.append(
                    partial(
                        SqlTransaction.append_event,
                        room_id=room_id,
                        event_id=eid,
                        pdu=_pdu(rng, room_id, n),
                        redacted=rng.random() < 0.2,
                        now_ms=0,
                    )
                )
            elif roll < 0.55:
                ops.append(partial(SqlTransaction.add_gap, room_id=room_id, now_ms=0))
            elif roll < 0.85:
                t = rng.choice(["m.typing", "m.receipt"])
                c: dict[str, Any] = (
                    {
                        "room_id": room_id,
                        "user_id": f"@u{rng.randint(0, 2)}:remote.test",
                        "typing": rng.random() < 0.5,
                    }
                    if t == "m.typing"
                    else {
                        "m.read": {
                            f"@u{rng.randint(0, 2)}:remote.test": {
                                "event_ids": [f"$event{n}"],
                                "data": {"ts": n},
                            }
                        }
                    }
                )
                ops.append(
                    partial(
                        SqlTransaction.save_ephemeral,
                        room_id=room_id,
                        edu_type=t,
                        content=c,
                        now_ms=0,
                    )
                )
            else:
                d = rng.choice(devices)
                ops.append(
                    partial(
                        SqlTransaction.set_device_peek,
                        user_id=d[0],
                        device_id=d[1],
                        room_id=room_id,
                        state=rng.choice(["active", "ended"]),
                        now_ms=0,
                    )
                )

        def run(tx: WriteTransaction, ops: list[Any] = ops) -> None:
            for op in ops:
                op(tx)

        await store.write(run)
        tokens.append(await store.read(lambda tx: tx.max_stream_pos()))
        for d in devices:
            if rng.random() < 0.5:
                s = await snapshot_of(store, d, None, 10)
                window.load_device(d, s.peeks, as_of=s.upto)
            for since in rng.sample(tokens, min(5, len(tokens))):
                limit = rng.choice([0, 1, 2, 5, 10])
                answered += await window_matches_store(store, window, d, since, limit)
    assert answered > 10  # the comparison really ran
    await store.aclose()
