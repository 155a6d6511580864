"""FollowerChoice with the observer join: MSC2444 first, the observer join through the
candidates that lack it, and the error when the fallback is off (unit tests with fake
followers; tests/test_observer_follow.py runs it against real Synapse)."""

from __future__ import annotations

import pytest

from peekproxy.services.errors import PeekError
from peekproxy.services.follower_choice import FollowerChoice
from peekproxy.services.following import OBSERVER_HANDLE_PREFIX, FollowFailed
from tests.test_client_api_follower import FakeFollower

ROOM = "!r:a.test"
UNSUPPORTED = PeekError(502, "M_UNKNOWN", "could not peek !r:a.test: a.test: no MSC2444")


def _choice(joins: bool = True) -> tuple[FollowerChoice, FakeFollower, FakeFollower]:
    remote = FakeFollower("peekid01", UNSUPPORTED)
    observer = FakeFollower(OBSERVER_HANDLE_PREFIX + "$join")
    observer.settings.joins = joins
    choice = FollowerChoice(remote=remote, observer=observer)  # type: ignore[arg-type]
    return choice, remote, observer


async def test_the_observer_joins_through_the_servers_that_lack_msc2444() -> None:
    choice, remote, observer = _choice()
    remote.lacking = {"a.test"}
    followed = await choice.follow(ROOM, ["a.test", "down.test"])
    assert followed.handle == OBSERVER_HANDLE_PREFIX + "$join"
    assert remote.calls == [("follow", ["a.test", "down.test"])]
    assert observer.calls == [("follow", ["a.test"])]
    # Renewals and stops go to the follower whose handle it is.
    await choice.stop(ROOM, "a.test", followed.handle)
    await choice.renew(ROOM, "b.test", "peekid01")
    assert observer.calls[-1] == ("stop", followed.handle)
    assert remote.calls[-1] == ("renew", "peekid01")


async def test_no_join_when_msc2444_works_refuses_or_nobody_lacks_it() -> None:
    choice, remote, observer = _choice()
    remote.error = None
    assert (await choice.follow(ROOM, ["a.test"])).handle == "peekid01"
    remote.lacking = {"a.test"}
    remote.error = PeekError(403, "M_FORBIDDEN", "not world_readable")
    with pytest.raises(FollowFailed):
        await choice.follow(ROOM, ["a.test"])
    remote.lacking, remote.error = set(), UNSUPPORTED
    with pytest.raises(FollowFailed):
        await choice.follow(ROOM, ["a.test"])
    assert observer.calls == []


async def test_with_the_fallback_off_the_error_names_the_servers_lacking_msc2444() -> None:
    choice, remote, observer = _choice(joins=False)
    remote.lacking = {"a.test", "b.test"}
    with pytest.raises(FollowFailed) as failed:
        await choice.follow(ROOM, ["a.test", "b.test", "c.test"])
    error = failed.value.error
    assert error.status == 502
    assert error.error.startswith(UNSUPPORTED.error)
    assert "a.test, b.test lack MSC2444 and the observer join is off" in error.error
    assert "[peeks] fallback" in error.error
    assert observer.calls == []


async def test_an_observer_failure_is_what_the_device_gets() -> None:
    choice, remote, observer = _choice()
    remote.lacking = {"a.test"}
    observer.error = PeekError(403, "M_FORBIDDEN", "the room is encrypted")
    with pytest.raises(FollowFailed) as failed:
        await choice.follow(ROOM, ["a.test"])
    assert failed.value.error.status == 403
    assert failed.value.error.error == "the room is encrypted"
