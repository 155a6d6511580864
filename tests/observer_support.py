"""The observer-join world (issue 13): two real Synapses and peekproxy, all over TLS.

* **A** (the session's ``synapse``) hosts world_readable rooms, each with an alias;
* **B** (``synapse_b``) holds members of those rooms: its users join through B's client API,
  so A and B federate with each other;
* **peekproxy** is a child process named ``localhost:<port>`` (Synapse refuses IP-literal
  server names, research.md §8) with a TLS federation listener and the delegation API, and
  ``[peeks] fallback = "observer_join"``: neither Synapse speaks MSC2444, so peekproxy
  follows a room by joining it as its observer user (``@peekproxy:<its name>``).

Helpers: a shared room (alice on A, bob of B joined), A's view of the observer's
membership, long-polls of peekproxy's delegation ``/sync`` until a condition holds, and
"the event appears in the device's sync within N s" timings.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from peekproxy.demo import LoopbackTls, write_peekproxy_config
from tests.conftest import Spawn
from tests.front_support import WORLD_READABLE, Account, client_api
from tests.nio_session import peeked
from tests.peek_world import SECRET, PeekWorld
from tests.synapse import Synapse, free_tcp_port

#: The observer's localpart (the config default, ``[peeks] observer_localpart``).
OBSERVER_LOCALPART = "peekproxy"

#: Short lifetimes, so that idle drops and leaves happen within a test.
SHORT = {
    "PEEKPROXY_PEEKS__LINGER": "0.2s",
    "PEEKPROXY_PEEKS__OBSERVER_LINGER": "2s",
    # An observer join's renewal asks A whether the observer is still in the room: each
    # second here, so that every test also shows A answering it (else every 30 min).
    "PEEKPROXY_PEEKS__RENEWAL_INTERVAL_MAX": "1s",
}


class ObserverWorld(PeekWorld):
    """Synapse ``a`` and ``b`` and peekproxy (``daemon``; the delegation API through the
    inherited :meth:`peek`, :meth:`unpeek` and :meth:`sync`). ``server_name`` is
    peekproxy's, ``observer`` its observer user's ID."""

    def __init__(self, a: Synapse, b: Synapse, server_name: str) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.server_name = server_name
        self.observer = f"@{OBSERVER_LOCALPART}:{server_name}"


async def observer_world(
    a: Synapse,
    b: Synapse,
    tls_files: tuple[Path, Path, Path],
    tmp_path: Path,
    spawn: Spawn,
    *,
    fallback: str = "observer_join",
    env: dict[str, str] | None = None,
) -> ObserverWorld:
    """Start peekproxy beside ``a`` and ``b`` (``tls_files``: the session CA's localhost
    certificate, as the ``tls_files`` fixture gives it) with ``[peeks] fallback`` set,
    :data:`SHORT` lifetimes and ``env`` (more ``PEEKPROXY_*`` settings, e.g. front mode's
    ``PEEKPROXY_UPSTREAM__HOMESERVER_URL``). Its client listener keeps its port across
    :meth:`ObserverWorld.restart`."""
    port = free_tcp_port()
    tls = LoopbackTls(*tls_files)
    directory = tmp_path / "peekproxy"
    world = ObserverWorld(a, b, f"localhost:{port}")
    world.config = write_peekproxy_config(
        directory, federation_port=port, client_port=free_tcp_port(), tls=tls, secret=SECRET
    )
    world.db_path = directory / "data" / "peekproxy.db"
    world.env = (
        tls.env
        | {
            "PEEKPROXY_PEEKS__FALLBACK": fallback,
            "PEEKPROXY_FEDERATION__BACKOFF_INITIAL": "0.1",
            "PEEKPROXY_LOGGING__LEVEL": "INFO",
        }
        | SHORT
        | (env or {})
    )
    world.daemon = await spawn(world.config, env=world.env)
    return world


@dataclass(frozen=True)
class SharedRoom:
    """A world_readable room on A: its ID and alias, alice (A, its creator) and bob (B,
    joined over federation)."""

    room_id: str
    alias: str
    alice: Account
    bob: Account


async def shared_room(a: Synapse, b: Synapse, name: str) -> SharedRoom:
    """alice (``<name>-alice`` on A) creates a world_readable public room ``#<name>:A``
    named ``name``; bob (``<name>-bob`` on B) joins it through B (a remote join to A)."""
    alice, bob = Account(a, f"{name}-alice"), Account(b, f"{name}-bob")
    created = await alice.call(
        "POST",
        "/createRoom",
        {
            "preset": "public_chat",
            "room_alias_name": name,
            "name": name,
            "initial_state": [WORLD_READABLE],
        },
    )
    alias = f"#{name}:{a.server_name}"
    await bob.call("POST", f"/join/{quote(alias, safe='')}", {})
    return SharedRoom(created["room_id"], alias, alice, bob)


async def membership(account: Account, room_id: str, user_id: str) -> str | None:
    """``user_id``'s membership in ``room_id`` as ``account``'s homeserver has it (the
    current ``m.room.member`` state event), ``None`` when it has none."""
    response = await client_api(
        account.synapse.client,
        account.token,
        "GET",
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/m.room.member/"
        f"{quote(user_id, safe='')}",
    )
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    value: str = response.json()["membership"]
    return value


async def wait_membership(
    account: Account, room_id: str, user_id: str, wanted: str, deadline_s: float = 30.0
) -> float:
    """Poll (every 0.1 s) until ``user_id``'s membership is ``wanted`` on ``account``'s
    homeserver; returns the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    with trio.move_on_after(deadline_s):
        while True:
            if await membership(account, room_id, user_id) == wanted:
                return time.monotonic() - started
            await trio.sleep(0.1)
    now = await membership(account, room_id, user_id)
    raise AssertionError(f"{user_id} in {room_id}: {now!r}, not {wanted!r} after {deadline_s} s")


Sync = dict[str, Any]


async def sync_until(
    world: PeekWorld,
    since: str | None,
    wanted: Callable[[Sync], bool],
    *,
    deadline_s: float = 30.0,
) -> tuple[Sync, str]:
    """Long-poll the delegation ``/sync`` (of the world's default device) until
    ``wanted(answer)`` holds; returns that answer and its ``next_batch``. Fails at the
    deadline."""
    with trio.fail_after(deadline_s):
        while True:
            synced = await world.sync(since=since, timeout_ms=5000)
            if wanted(synced):
                return synced, synced["next_batch"]
            since = synced["next_batch"]


async def time_to_sync(
    world: PeekWorld, since: str, send: Callable[[], Awaitable[object]], room_id: str, body: str
) -> tuple[float, Sync, str]:
    """A long-poll of the delegation ``/sync`` in flight, then ``send()`` (which sends a
    message ``body`` in ``room_id``): the seconds from ``send``'s answer until a sync shows
    the message in ``rooms.peek``, that answer and its ``next_batch``."""
    first: list[Sync] = []

    async def poll() -> None:
        first.append(await world.sync(since=since, timeout_ms=20_000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await trio.sleep(0.05)  # let the long-poll reach peekproxy first
        await send()
        answered = time.monotonic()
    synced = first[0]
    if not peeked(room_id, body)(synced):  # other news first: the next long-polls have it
        synced, _ = await sync_until(world, synced["next_batch"], peeked(room_id, body))
    return time.monotonic() - answered, synced, synced["next_batch"]


def shown(room: Sync) -> list[dict[str, Any]]:
    """A sync room entry's state and timeline events."""
    return [*room.get("state", {}).get("events", []), *room.get("timeline", {}).get("events", [])]
