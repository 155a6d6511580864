"""The live window (core/live.py): answering incremental syncs from memory.

Unit tests of the pure window, the store's commit hook that feeds it, and an equivalence
test: over random streams written to a real store (SQLite and PostgreSQL), every sync the
window answers equals the sync built from the store snapshot.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import trio

from peekproxy.core.live import LiveWindow, StreamChange
from peekproxy.core.sync import DevicePeek, SyncSnapshot, build_sync
from peekproxy.store import ReadTransaction, Storage, WriteTransaction
from tests.conftest import OpenStore

ROOM = "!room:remote.test"
OTHER = "!other:remote.test"
ALICE = ("@alice:local.test", "PHONE")
BOB = ("@bob:local.test", "LAPTOP")


def message(pos: int, room_id: str = ROOM, body: str = "hi") -> StreamChange:
    return StreamChange(
        pos,
        room_id,
        "event",
        event_id=f"$e{pos}",
        pdu={
            "type": "m.room.message",
            "sender": "@carol:remote.test",
            "content": {"msgtype": "m.text", "body": body},
            "origin_server_ts": 1_000,
        },
    )


def version_10(room_id: str) -> str:
    return "10"


def window_with_alice(*, capacity: int = 100) -> LiveWindow:
    window = LiveWindow(capacity)
    window.start(10)
    window.load_device(ALICE, [DevicePeek(ROOM, "active", 5)], as_of=10)
    return window


def test_not_started_answers_nothing_and_refuses_rows() -> None:
    window = LiveWindow()
    assert window.answer(ALICE, 0, timeline_limit=10, room_version_of=version_10) is None
    with pytest.raises(ValueError, match="not started"):
        window.apply([message(1)], 1)


def test_a_new_event_is_answered_from_memory() -> None:
    window = window_with_alice()
    quiet = window.answer(ALICE, 10, timeline_limit=10, room_version_of=version_10)
    assert quiet is not None and not quiet.changed and quiet.active == [ROOM]
    window.apply([message(11, body="live")], 11)
    answer = window.answer(ALICE, 10, timeline_limit=10, room_version_of=version_10)
    assert answer is not None and answer.upto == 11
    response = build_sync(
        since=10, upto=answer.upto, peeks=answer.peeks, rooms=answer.views, now_ms=2_000
    )
    timeline = response["rooms"]["peek"][ROOM]["timeline"]
    assert [e["content"]["body"] for e in timeline["events"]] == ["live"]
    assert timeline["limited"] is False and timeline["prev_batch"] == "pp1_10"
    assert response["next_batch"] == "pp1_11"
    # A device that already has the event sees nothing new.
    later = window.answer(ALICE, 11, timeline_limit=10, room_version_of=version_10)
    assert later is not None and not later.changed


def test_unknown_devices_and_stale_loads_are_left_to_the_store() -> None:
    window = window_with_alice()
    assert window.answer(BOB, 10, timeline_limit=10, room_version_of=version_10) is None
    window.apply([message(11)], 11)
    window.load_device(BOB, [DevicePeek(ROOM, "active", 5)], as_of=10)  # read before row 11
    assert window.answer(BOB, 10, timeline_limit=10, room_version_of=version_10) is None
    window.load_device(BOB, [DevicePeek(ROOM, "active", 5)], as_of=11)
    assert window.answer(BOB, 10, timeline_limit=10, room_version_of=version_10) is not None


def test_quiet_from_only_for_devices_the_window_knows() -> None:
    window = window_with_alice()
    assert window.quiet_from(ALICE) is None  # an active peek
    assert window.quiet_from(BOB) is None  # unknown: the store knows
    window.load_device(BOB, [], as_of=10)
    assert window.quiet_from(BOB) == 0
    window.apply([StreamChange(11, ROOM, "device", device=BOB, peek_state="active")], 11)
    assert window.quiet_from(BOB) is None  # Bob peeks now
    window.apply([StreamChange(12, ROOM, "device", device=BOB, peek_state="ended")], 12)
    assert window.quiet_from(BOB) == 12


@pytest.mark.parametrize(
    ("rows", "limit"),
    [
        pytest.param([StreamChange(11, ROOM, "gap"), message(12)], 10, id="gap"),
        pytest.param([message(11), message(12), message(13)], 2, id="more-than-limit"),
        pytest.param([message(11)], 0, id="limit-zero"),
    ],
)
def test_limited_timelines_are_left_to_the_store(rows: list[StreamChange], limit: int) -> None:
    window = window_with_alice()
    window.apply(rows, rows[-1].pos)
    assert window.answer(ALICE, 10, timeline_limit=limit, room_version_of=version_10) is None


def test_exactly_the_limit_is_answered() -> None:
    window = window_with_alice()
    window.apply([message(11), message(12)], 12)
    answer = window.answer(ALICE, 10, timeline_limit=2, room_version_of=version_10)
    assert answer is not None and [i.pos for i in answer.views[ROOM].recent] == [11, 12]


@pytest.mark.parametrize("state", ["active", "dormant", "ended"])
def test_peek_changes_after_since_are_left_to_the_store(state: str) -> None:
    window = window_with_alice()
    window.apply(
        [StreamChange(11, OTHER, "device", device=ALICE, peek_state=state)], 11
    )  # a new peek, an idle drop, an unpeek: each needs state or a leave entry
    assert window.answer(ALICE, 10, timeline_limit=10, room_version_of=version_10) is None
    answer = window.answer(ALICE, 11, timeline_limit=10, room_version_of=version_10)
    if state == "dormant":
        assert answer is None  # the store restores dormant peeks
    else:
        assert answer is not None and not answer.changed


def test_tokens_older_than_the_window_or_ahead_of_it_are_left_to_the_store() -> None:
    window = window_with_alice(capacity=2)
    window.apply([message(11), message(12), message(13)], 13)
    assert window.complete_after == 11
    assert window.answer(ALICE, 10, timeline_limit=10, room_version_of=version_10) is None
    answer = window.answer(ALICE, 11, timeline_limit=10, room_version_of=version_10)
    assert answer is not None and [i.pos for i in answer.views[ROOM].recent] == [12, 13]
    assert window.answer(ALICE, 14, timeline_limit=10, room_version_of=version_10) is None


def test_rows_out_of_order_break_the_window_for_good() -> None:
    window = window_with_alice()
    window.apply([message(11)], 11)
    with pytest.raises(ValueError, match="not after"):
        window.apply([message(11)], 12)
    assert window.answer(ALICE, 11, timeline_limit=10, room_version_of=version_10) is None


def _typing(pos: int, user_id: str, typing: bool = True) -> StreamChange:
    content = {"room_id": ROOM, "user_id": user_id, "typing": typing}
    return StreamChange(pos, ROOM, "ephemeral", edu_type="m.typing", content=content)


def _typing_shown(window: LiveWindow, since: int) -> list[Any] | None:
    answer = window.answer(ALICE, since, timeline_limit=10, room_version_of=version_10)
    assert answer is not None
    built = build_sync(
        since=since, upto=answer.upto, peeks=answer.peeks, rooms=answer.views, now_ms=0
    )
    room = built["rooms"]["peek"].get(ROOM)
    if room is None:
        return None
    return [
        e["content"]["user_ids"] for e in room["ephemeral"]["events"] if e["type"] == "m.typing"
    ]


def test_every_user_typing_is_shown() -> None:
    """Two users typing in one sync range are both listed, and a user who started typing
    before ``since`` is still listed when someone else starts (issue 10 item 8)."""
    window = window_with_alice()
    window.apply([_typing(11, "@a:r"), _typing(12, "@b:r")], 12)
    assert _typing_shown(window, 10) == [["@a:r", "@b:r"]]
    assert _typing_shown(window, 11) == [["@a:r", "@b:r"]]
    assert _typing_shown(window, 12) is None  # no news
    window.apply([_typing(13, "@a:r", False)], 13)
    assert _typing_shown(window, 12) == [["@b:r"]]
    window.apply([message(14)], 14)
    assert _typing_shown(window, 13) == []  # news, but no typing change: no m.typing event
    window.apply([_typing(15, "@b:r", False)], 15)
    assert _typing_shown(window, 14) == [[]]


# -- the store's commit hook ----------------------------------------------------------------


async def test_commit_hook_sees_every_write_in_commit_order(open_store: OpenStore) -> None:
    """Each write's ``apply`` in commit order; PostgreSQL's listener may repeat the last
    position between writes (a catch-up with nothing new), never skip or reorder one."""
    store = await open_store()
    calls: list[int] = []
    store.set_commit_hook(lambda tx: tx.max_stream_pos(), calls.append)

    def applied() -> list[int]:
        return [pos for pos, _ in itertools.groupby(calls)]

    async def add(i: int) -> None:
        await store.write(lambda tx: tx.add_gap(f"!r{i}:remote.test", 0))

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(add, i)
    assert applied() == list(range(1, 41))

    def fail(tx: WriteTransaction) -> None:
        tx.add_gap(ROOM, 0)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(fail)
    assert applied() == list(range(1, 41))  # a rolled-back write is not handed on

    def bad_read(tx: ReadTransaction) -> int:
        raise RuntimeError("hook")

    store.set_commit_hook(bad_read, calls.append)
    with pytest.raises(RuntimeError, match="hook"):
        await store.write(lambda tx: tx.add_gap(ROOM, 0))
    assert (
        await store.read(lambda tx: tx.max_stream_pos()) == 40
    )  # the hook's failure rolled it back
    await store.aclose()


# -- equivalence with the store --------------------------------------------------------------


def _pdu(rng: random.Random, room_id: str, n: int) -> dict[str, Any]:
    if rng.random() < 0.2:
        return {
            "type": "m.room.topic",
            "state_key": "",
            "sender": "@carol:remote.test",
            "content": {"topic": f"topic {n}"},
            "origin_server_ts": 1_000 + n,
            "room_id": room_id,
        }
    return {
        "type": "m.room.message",
        "sender": "@carol:remote.test",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
        "origin_server_ts": 1_000 + n,
        "room_id": room_id,
    }


async def set_peek(store: Storage, device: tuple[str, str], room_id: str, state: str) -> None:
    user_id, device_id = device
    await store.write(
        lambda tx: tx.set_device_peek(
            user_id=user_id,
            device_id=device_id,
            room_id=room_id,
            state=state,
            now_ms=0,
        )
    )


async def snapshot_of(
    store: Storage, device: tuple[str, str], since: int | None, limit: int
) -> SyncSnapshot:
    user_id, device_id = device
    snapshot: SyncSnapshot = await store.read(
        lambda tx: tx.sync_snapshot(
            user_id=user_id,
            device_id=device_id,
            since=since,
            full_state=False,
            limit=limit,
        )
    )
    return snapshot


def _built(since: int, upto: int, peeks: Any, views: Any, limit: int) -> dict[str, Any]:
    return build_sync(
        since=since, upto=upto, peeks=peeks, rooms=views, timeline_limit=limit, now_ms=5_000
    )


async def window_matches_store(
    store: Storage, window: LiveWindow, device: tuple[str, str], since: int, limit: int
) -> bool:
    """If the window answers ``device``'s sync from ``since``, assert the answer is the one
    the store snapshot gives; returns whether it answered."""
    answer = window.answer(device, since, timeline_limit=limit, room_version_of=version_10)
    if answer is None:
        return False
    stored = await snapshot_of(store, device, since, limit)
    from_store = _built(since, stored.upto, stored.peeks, stored.views, limit)
    assert answer.upto == stored.upto
    assert answer.active == stored.active
    assert answer.changed == bool(from_store["rooms"]["peek"])
    assert _built(since, answer.upto, answer.peeks, answer.views, limit) == from_store
    return True


@pytest.mark.parametrize("seed", range(6))
async def test_memory_answers_equal_store_answers(open_store: OpenStore, seed: int) -> None:
    rng = random.Random(seed)
    store = await open_store()
    window = LiveWindow(capacity=rng.choice([8, 30, 1000]))
    store.set_commit_hook(
        lambda tx: tx.stream_changes(window.watermark),
        lambda result: (
            window.start(result[1]) if window.watermark is None else window.apply(*result)
        ),
    )
    await store.write(lambda tx: None)
    rooms = [ROOM, OTHER, "!third:remote.test"]
    devices = [ALICE, BOB, ("@carol:local.test", "TABLET")]
    for device in devices:
        for room_id in rng.sample(rooms, 2):
            await set_peek(store, device, room_id, "active")
    tokens: list[int] = [await store.read(lambda tx: tx.max_stream_pos())]
    from_memory = 0
    for n in range(80):
        room_id = rng.choice(rooms)
        roll = rng.random()
        if roll < 0.1:
            # A new snapshot (a re-peek) with history fetched before its latest event: on
            # the stream, maybe after a gap (closed when the history is complete).
            history = [
                (f"$history{n}.{i}", _pdu(rng, room_id, 1000 * n + i), False)
                for i in range(rng.choice([0, 1, 3, 12]))
            ]
            latest = (f"$latest{n}", _pdu(rng, room_id, n))
            gap, complete = rng.random() < 0.5, rng.random() < 0.5

            def write_snapshot(
                tx: WriteTransaction,
                room_id: str = room_id,
                history: list[tuple[str, dict[str, Any], bool]] = history,
                latest: tuple[str, dict[str, Any]] = latest,
                gap: bool = gap,
                complete: bool = complete,
            ) -> None:
                tx.store_snapshot(
                    room_id,
                    events=dict([latest]),
                    redacted=[],
                    state=tx.current_state_ids(room_id),
                    latest_event_id=latest[0],
                    gap=gap,
                    now_ms=0,
                    history=history,
                    history_complete=complete,
                )

            await store.write(write_snapshot)
        elif roll < 0.6:
            pdu = _pdu(rng, room_id, n)
            redacted = rng.random() < 0.1
            await store.write(
                lambda tx: tx.append_event(
                    room_id=room_id,  # noqa: B023
                    event_id=f"$event{n}",  # noqa: B023
                    pdu=pdu,  # noqa: B023
                    redacted=redacted,  # noqa: B023
                    now_ms=0,
                )
            )
        elif roll < 0.7:
            await store.write(
                lambda tx: tx.add_gap(
                    room_id=room_id,  # noqa: B023
                    now_ms=0,
                )
            )
        elif roll < 0.85:
            edu_type = rng.choice(["m.typing", "m.receipt"])
            # Several users, so that typing and receipts of different users overlap.
            user = rng.choice(["@carol:remote.test", "@dave:remote.test", "@erin:other.test"])
            content: dict[str, Any] = (
                {"room_id": room_id, "user_id": user, "typing": rng.random() < 0.6}
                if edu_type == "m.typing"
                else {
                    rng.choice(["m.read", "m.read.private"]): {
                        user: {"event_ids": [f"$event{n}"], "data": {"ts": n}}
                    }
                }
            )
            await store.write(
                lambda tx: tx.save_ephemeral(
                    room_id=room_id,  # noqa: B023
                    edu_type=edu_type,  # noqa: B023
                    content=content,  # noqa: B023
                    now_ms=0,
                )
            )
        else:
            device = rng.choice(devices)
            state = rng.choice(["active", "ended", "dormant"])
            await set_peek(store, device, room_id, state)
        tokens.append(await store.read(lambda tx: tx.max_stream_pos()))
        for device in devices:
            snapshot = await snapshot_of(store, device, None, 10)
            window.load_device(device, snapshot.peeks, as_of=snapshot.upto)
            for since in rng.sample(tokens, min(4, len(tokens))):
                limit = rng.choice([0, 1, 3, 10])
                from_memory += await window_matches_store(store, window, device, since, limit)
    assert from_memory > 20  # the comparison really ran
    await store.aclose()
