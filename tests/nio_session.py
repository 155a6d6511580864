"""A matrix-nio session through peekproxy's sync front (front mode), shared by the
front-mode acceptance tests (tests/test_front_acceptance.py, tests/test_observer_join.py).

nio runs on asyncio: the session runs in a worker thread with its own event loop and reaches
back into trio (peekproxy's log, the testbed) with ``trio.from_thread``. peekproxy does not
serve ``/login``, ``/join`` or ``/send``, so the user has two nio clients on one device:
``direct``, pointed at the homeserver, logs in, joins, leaves and sends; ``front``, pointed at
peekproxy's client listener, gets ``direct``'s access token and device (``restore_login``) and
only syncs. The MSC2753 peek and unpeek go to peekproxy with raw httpx (nio has no peek
call). ``rooms.peek`` is read from the raw JSON of each answer
(``SyncResponse.transport_response``, aiohttp's response, whose body nio has already read).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nio
import trio

from tests.front_support import Account, auth, bodies
from tests.peek_world import PeekWorld
from tests.synapse import Synapse

PASSWORD = "interop-password"  # tests/synapse.py registers every user with it
DEADLINE_S = 45.0
LONG_POLL_MS = 20_000


@dataclass
class Session:
    """The scripted session's parts and what it saw (read by the test in trio)."""

    world: PeekWorld
    synapse: Synapse
    alice: Account  # owns the local world_readable room
    user: str  # the nio user's ID
    remote_room: str  # the testbed room
    trio_token: trio.lowlevel.TrioToken
    front: nio.AsyncClient = field(init=False)
    direct: nio.AsyncClient = field(init=False)
    token: str = ""
    #: Every raw sync answer FRONT got, in order.
    answers: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    # -- FRONT's syncs ---------------------------------------------------------------------

    async def sync(self, timeout_ms: int = 0) -> tuple[nio.SyncResponse, dict[str, Any]]:
        """One nio sync through the front: nio's parsed answer and the raw JSON."""
        response = await self.front.sync(timeout=timeout_ms)
        assert isinstance(response, nio.SyncResponse), response
        raw: dict[str, Any] = await response.transport_response.json()
        self.answers.append(raw)
        return response, raw

    async def sync_until(
        self, wanted: Callable[[dict[str, Any]], bool], what: str
    ) -> tuple[nio.SyncResponse, dict[str, Any]]:
        """Long-poll through the front until ``wanted(raw answer)`` (fails at DEADLINE_S)."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            response, raw = await self.sync(timeout_ms=2000)
            if wanted(raw):
                return response, raw
        raise AssertionError(f"no sync through the front showed {what} in {DEADLINE_S} s")

    async def live(
        self, send: Callable[[], Any], wanted: Callable[[dict[str, Any]], bool], figure: str
    ) -> dict[str, Any]:
        """A long-poll in flight, then ``send()``: the one answer of that long-poll has it."""
        started = time.monotonic()
        polling = asyncio.create_task(self.sync(timeout_ms=LONG_POLL_MS))
        await asyncio.sleep(0)  # the request goes out before the event is sent
        await send()
        _, raw = await polling
        if not wanted(raw):  # the long-poll was answered by other news: the next one has it
            _, raw = await self.sync_until(wanted, figure)
        elapsed = time.monotonic() - started
        assert elapsed < LONG_POLL_MS / 1000, elapsed
        self.figures[figure] = elapsed * 1000
        return raw

    # -- peekproxy's MSC2753 endpoints, and trio's side --------------------------------------

    async def msc2753(self, path: str) -> None:
        async with httpx.AsyncClient(base_url=self.world.daemon.client, timeout=60) as http:
            response = await http.post(
                f"/_matrix/client/v3{path}", json={}, headers=auth(self.token)
            )
        assert response.status_code == 200, response.text

    async def in_trio(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run in the test's trio loop (``await``-ed when it is async)."""
        run = trio.from_thread.run if asyncio.iscoroutinefunction(fn) else trio.from_thread.run_sync
        return await asyncio.to_thread(run, fn, *args, trio_token=self.trio_token)

    async def released(self, room_id: str) -> None:
        """peekproxy's following of ``room_id`` is stopped (no device wants it)."""
        pattern = rb"stopped peek \S+ of " + re.escape(room_id.encode())
        await self.in_trio(self.world.daemon.wait_for_log, pattern)


def in_section(
    section: str, room_id: str, body: str | None = None
) -> Callable[[dict[str, Any]], bool]:
    """The raw answer shows ``room_id`` in ``rooms.<section>`` (with a message ``body``)."""

    def check(raw: dict[str, Any]) -> bool:
        room = raw.get("rooms", {}).get(section, {}).get(room_id)
        return room is not None and (body is None or body in bodies(room))

    return check


def peeked(room_id: str, body: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return in_section("peek", room_id, body)
