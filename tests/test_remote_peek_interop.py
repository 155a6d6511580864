"""Remote peeks against peers that bend MSC2444 (issue 10): a server without the endpoint
asked once for many rooms, a target that leaves out ``renewal_interval``. peekproxy runs as a
child process; the testbed and the Synapse-like server answer over real TLS, found through a
real DNS server (tests/peek_world.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from tests.conftest import Spawn
from tests.peek_world import NO_PEEK, TESTBED, PeekWorld, build_world

pytestmark = pytest.mark.slow


@pytest.fixture
async def world(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> PeekWorld:
    return await build_world(nursery, tls_ca, tmp_path, spawn)


async def test_a_server_without_msc2444_is_not_asked_again_for_each_room(
    world: PeekWorld,
) -> None:
    first, second = world.create_room("11"), world.create_room("11")
    for room_id in (first, second):
        response = await world.peek(room_id, hints=[NO_PEEK])
        assert response.status_code == 200, response.text
        assert world.subscription(room_id)["server"] == TESTBED
    # nopeek.test answered 404 M_UNRECOGNIZED for the first room: not asked for the second.
    assert [r["method"] for r in world.nopeek_requests] == ["PUT"]
    # With no other candidate the device still gets a 502 naming it and why (decision 6).
    failed = await world.peek(f"!elsewhere:{NO_PEEK}")
    assert failed.status_code == 502, failed.text
    body = failed.json()
    assert body["errcode"] == "M_UNKNOWN"
    assert f"{NO_PEEK}: does not support MSC2444 peeking (HTTP 404 M_UNRECOGNIZED)" in body["error"]
    assert "not asked again" in body["error"]
    assert len(world.nopeek_requests) == 1


async def test_a_peek_answer_without_renewal_interval_uses_the_default(
    world: PeekWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = world.testbed.peek_response

    def without_interval(room: Any) -> dict[str, Any]:
        return {k: v for k, v in answer(room).items() if k != "renewal_interval"}

    monkeypatch.setattr(world.testbed, "peek_response", without_interval)
    room_id = world.create_room("10")
    response = await world.peek(room_id, hints=[TESTBED])
    assert response.status_code == 200, response.text
    sub = world.subscription(room_id)
    assert sub["state"] == "active" and sub["server"] == TESTBED
    # The documented default: a 10 min interval, renewed every 5 min (half, decision 3).
    assert sub["remote_interval_ms"] == 600_000
    assert sub["renew_at_ts"] - sub["last_renewed_ts"] == 300_000
    # Live events flow as for any peek.
    event_id = world.send(room_id, "hello")
    await world.wait_delivered(event_id)
    assert world.stream(room_id)[-1] == ("event", "hello")
