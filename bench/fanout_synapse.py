"""Synapse beside peekproxy in bench/fanout.py: one user on N devices long-polling a joined room.

A real Synapse (tests/synapse.py's ``running_synapse``, the venv the tests install; SQLite,
``bcrypt_rounds: 4``, rate limits lifted) holds a public room of two users: the *speaker*
sends one ``m.room.message`` per round; the *owner* is logged in on N devices (registration
gives the first, ``POST /login`` the others, 8 at a time), every one long-polling
``GET /_matrix/client/v3/sync?since=<token>&timeout=60000`` (no filter). The first round's
``since`` is one token taken after the logins settled (one filtered sync of the first device,
every device's streams start there); each next round's is the device's own ``next_batch``.
The figure is each device's latency from the speaker's ``PUT .../send`` going out until its
sync answered with that event (its ID is checked in ``rooms.join``).

Synapse logs to ``homeserver.log`` in its directory (only its "now listening" lines reach
stdout), so its log costs the bench process nothing during a fan-out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
import trio
from fanout_client import Poll, fan_out_rounds, quiet

from tests.synapse import Synapse

__all__ = ["SynapseRoom", "log_config", "prepare_room", "synapse_fan_out"]

_PASSWORD = "interop-password"  # what tests/synapse.py's Synapse.register sets


def _small_filter(room: SynapseRoom) -> str:
    """A filter keeping a first sync small, unique to this call: Synapse keeps each sync
    answer for 2 minutes and answers the same request (same device, filter, ``since``)
    from it, stale ``next_batch`` included."""
    timeline = {"limit": 1, "not_types": [f"bench.fanout.{len(room.devices)}.{room.sent}"]}
    return json.dumps({"room": {"timeline": timeline}, "presence": {"types": []}})


def log_config(directory: Path) -> str:
    """Synapse's logging config: everything at INFO into ``directory/homeserver.log``, the
    ``synapse.app._base`` lines ("now listening") also on stdout."""
    return f"""version: 1
formatters: {{precise: {{format: '%(asctime)s %(name)s %(levelname)s %(request)s %(message)s'}}}}
handlers:
  console: {{class: logging.StreamHandler, formatter: precise}}
  file: {{class: logging.FileHandler, formatter: precise, filename: '{directory}/homeserver.log'}}
loggers:
  synapse.app._base: {{level: INFO, handlers: [console]}}
root: {{level: INFO, handlers: [file]}}
disable_existing_loggers: false
"""


@dataclass
class SynapseRoom:
    """The room and its users on one running Synapse; ``devices`` holds the access token of
    each of the owner's devices (it only grows)."""

    synapse: Synapse
    room_id: str
    speaker: str
    devices: list[str] = field(default_factory=list)
    sent: int = 0

    @property
    def port(self) -> int:
        """The port of Synapse's plain-HTTP client listener."""
        port = urlsplit(self.synapse.client).port
        assert port is not None
        return port


async def prepare_room(synapse: Synapse) -> SynapseRoom:
    """Register the speaker and the owner (its first device), the speaker creates a public
    room, the owner joins it.

    Raises:
        httpx.HTTPStatusError: Synapse refused a step.
    """
    speaker = await trio.to_thread.run_sync(synapse.register, "speaker")
    owner = await trio.to_thread.run_sync(synapse.register, "owner")
    async with httpx.AsyncClient(base_url=synapse.client, timeout=60) as http:
        created = await http.post(
            "/_matrix/client/v3/createRoom",
            json={"preset": "public_chat", "name": "fan-out"},
            headers={"Authorization": f"Bearer {speaker}"},
        )
        created.raise_for_status()
        room_id: str = created.json()["room_id"]
        joined = await http.post(
            f"/_matrix/client/v3/join/{quote(room_id, safe='')}",
            json={},
            headers={"Authorization": f"Bearer {owner}"},
        )
        joined.raise_for_status()
    return SynapseRoom(synapse, room_id, speaker, [owner])


async def _log_in(room: SynapseRoom, devices: int, concurrency: int = 8) -> None:
    """Log the owner in until it has ``devices`` devices, ``concurrency`` logins at a time."""
    limiter = trio.CapacityLimiter(concurrency)
    body = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "owner"},
        "password": _PASSWORD,
    }

    async def one(http: httpx.AsyncClient) -> None:
        async with limiter:
            response = await http.post("/_matrix/client/v3/login", json=body)
            response.raise_for_status()
        room.devices.append(response.json()["access_token"])

    started = time.perf_counter()
    missing = devices - len(room.devices)
    async with (
        httpx.AsyncClient(base_url=room.synapse.client, timeout=120) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(missing):
            nursery.start_soon(one, http)
    if missing > 0:
        print(
            f"  {missing} logins in {time.perf_counter() - started:.1f} s "
            f"(the owner now has {len(room.devices)} devices)",
            flush=True,
        )


async def synapse_fan_out(room: SynapseRoom, devices: int, rounds: int) -> list[float]:
    """Log the owner in on ``devices`` devices (more if needed), take one ``since`` token,
    then ``rounds`` fan-outs of one speaker event to every device: each answer's latency in
    ms after the speaker's send went out, all rounds pooled, sorted.

    Raises:
        AssertionError: a sync answered without the round's event.
    """
    await _log_in(room, devices)
    pid = room.synapse.process.pid
    await quiet([pid])
    headers = {"Authorization": f"Bearer {room.devices[0]}"}
    async with httpx.AsyncClient(base_url=room.synapse.client, timeout=60) as http:
        first = await http.get(
            "/_matrix/client/v3/sync",
            params={"filter": _small_filter(room), "timeout": "0"},
            headers=headers,
        )
        first.raise_for_status()
        token: str = first.json()["next_batch"]
        event: dict[str, str] = {}

        async def trigger() -> float:
            room.sent += 1
            fired_at = time.perf_counter()
            response = await http.put(
                f"/_matrix/client/v3/rooms/{quote(room.room_id, safe='')}/send/"
                f"m.room.message/fanout{room.sent}",
                json={"msgtype": "m.text", "body": "fan out"},
                headers={"Authorization": f"Bearer {room.speaker}"},
            )
            response.raise_for_status()
            event["id"] = response.json()["event_id"]
            return fired_at

        def follow(poll: Poll, body: bytes) -> Poll:
            answer: dict[str, Any] = json.loads(body)
            timeline = answer["rooms"]["join"][room.room_id]["timeline"]["events"]
            assert event["id"] in [e["event_id"] for e in timeline], body[:300]
            query = urlencode({"since": answer["next_batch"], "timeout": "60000"})
            return (poll[0], f"/_matrix/client/v3/sync?{query}", poll[2])

        query = urlencode({"since": token, "timeout": "60000"})
        polls: list[Poll] = [
            (room.port, f"/_matrix/client/v3/sync?{query}", [("authorization", f"Bearer {t}")])
            for t in room.devices[:devices]
        ]
        return await fan_out_rounds(polls, rounds, trigger, follow, [pid])
