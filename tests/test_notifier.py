"""Notifier.holding: a /send's wake-ups wait until its answer is out (issue 17)."""

from __future__ import annotations

import pytest
import trio

from peekproxy.services.notifier import Notifier

ROOM, OTHER = "!a:remote.test", "!b:remote.test"
DEVICE = ("@alice:local.test", "PHONE")


async def test_held_wakes_wake_nobody_until_released() -> None:
    notifier = Notifier()
    room_waiter = notifier.register([ROOM], ("@bob:local.test", "B"))
    device_waiter = notifier.register([OTHER], DEVICE)
    with notifier.holding() as held:
        notifier.notify_room(ROOM)
        notifier.notify_device(DEVICE)

        async def child() -> None:  # a task the holder starts holds too
            notifier.notify_room(OTHER)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
    assert not room_waiter.is_set() and not device_waiter.is_set()
    assert held.rooms == {ROOM, OTHER} and held.devices == {DEVICE}
    held.release()
    assert room_waiter.is_set() and device_waiter.is_set()
    # Released once; outside the block notifications go straight through.
    late = notifier.register([ROOM], DEVICE)
    notifier.notify_room(ROOM)
    assert late.is_set()


async def test_now_and_another_notifier_are_not_held() -> None:
    notifier, other = Notifier(), Notifier()
    waiter = notifier.register([ROOM], DEVICE)
    elsewhere = other.register([ROOM], DEVICE)
    with notifier.holding() as held:
        other.notify_room(ROOM)
        assert elsewhere.is_set()
        notifier.notify_room(ROOM, now=True)
        assert waiter.is_set()
    held.release()


async def test_a_failing_holder_releases_at_once() -> None:
    notifier = Notifier()
    waiter = notifier.register([ROOM], DEVICE)
    with pytest.raises(RuntimeError), notifier.holding():
        notifier.notify_room(ROOM)
        raise RuntimeError("the transaction failed")
    assert waiter.is_set()


async def test_the_answer_releases_even_when_sending_it_fails() -> None:
    from peekproxy.api.federation import AnswerThen

    released: list[bool] = []

    async def gone(message: object) -> None:
        raise OSError("the peer went away")

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    answer = AnswerThen({"pdus": {}}, then=lambda: released.append(True))
    with pytest.raises(OSError):
        await answer({"type": "http"}, receive, gone)
    assert released == [True]
