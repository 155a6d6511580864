"""Rooms on the fronted homeserver itself, followed through its client API: a
:class:`~peekproxy.services.following.RoomFollower`.

The homeserver peekproxy fronts has no MSC2444 (Synapse answers every peek path 404), but it
lets a non-member read a world_readable room it is in through its client API
(synapse-harness.md §3, §4.1). peekproxy reads such rooms as one local account of its own
(``upstream.access_token_file``; the token is never logged):

* :meth:`ClientApiFollower.follow`: ``GET /rooms/{roomId}/messages?dir=b&raw`` (the newest
  events as PDUs: the latest one and the history before it, and a stream token), then
  ``GET /rooms/{roomId}/state`` (client format; the homeserver is trusted). A room that is
  not world_readable, or is encrypted, is refused with 403 ``M_FORBIDDEN`` (decision 10);
  a refusal for another reason (the homeserver is not in the room) or an unreachable
  homeserver is a 502, so that other candidate servers can be tried.
* then one task per followed room long-polls ``GET /events?room_id=…&from=…&raw`` (the
  legacy room event stream matrix-js-sdk's ``peekInRoom`` uses) from that token and hands
  the new events to :meth:`peekproxy.services.ingest.Ingest.append_trusted` (DAG order,
  syncs woken, peeks ended by a state event that ends peeking). Errors back off
  (1 s doubling to 60 s); a refusal ends the task: when the room is no longer world_readable
  its peeks end, otherwise the following lapses and is followed again (with a gap) at the
  next renewal.
* :meth:`~ClientApiFollower.renew` has nothing to renew while the task runs; a handle it
  does not know (the task ended, or peekproxy restarted) is refused, so the subscription
  follows the room again with a gap. :meth:`~ClientApiFollower.stop` ends the task.

Handles start with :data:`HANDLE_PREFIX` (MSC2444 peek IDs are alphanumeric), so
:class:`~peekproxy.services.follower_choice.FollowerChoice` knows whose a handle is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import trio

from peekproxy.core.backoff import backoff_delay
from peekproxy.core.client_api_events import pdu_from_raw, room_state
from peekproxy.core.outcomes import new_peek_id
from peekproxy.homeserver.client import HomeserverClient, HomeserverRefused, HomeserverUnavailable
from peekproxy.outage import retry_store_errors
from peekproxy.services.backfill import FIRST_VIEW_LIMIT
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    Fetched,
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
)
from peekproxy.services.settings import now_ms

__all__ = [
    "HANDLE_PREFIX",
    "LONG_POLL_MS",
    "ClientApiFollower",
    "ClientApiSnapshot",
    "TrustedEvents",
    "is_client_api_handle",
]

log = logging.getLogger("peekproxy.peeks")

#: The handles of this follower start so (an MSC2444 peek ID has no ``:``).
HANDLE_PREFIX = "client-api:"
#: The ``timeout`` of one ``/events`` long-poll (ms); the request may take 10 s more.
LONG_POLL_MS = 30_000
LONG_POLL_MARGIN_S = 10.0
#: One request of a new following (``/messages``, ``/state``, the room summary) may take
#: this long (s); the room's lock is held meanwhile.
FOLLOW_TIMEOUT_S = 15.0
#: The interval reported for a following (ms): nothing expires, but a renewal this often
#: notices a task that ended (the room lapses and is followed again).
CHECK_INTERVAL_MS = 600_000
#: Back-off of the long-poll after errors in a row (s): 1 s doubling to 60 s, ±20 %.
LIVE_BACKOFF_S = (1.0, 60.0)


def is_client_api_handle(handle: str | None) -> bool:
    """Whether ``handle`` names a following of :class:`ClientApiFollower`."""
    return handle is not None and handle.startswith(HANDLE_PREFIX)


class TrustedEvents(Protocol):
    """Where the live events go (:class:`peekproxy.services.ingest.Ingest`)."""

    async def append_trusted(self, room_id: str, handle: str, events: list[Fetched]) -> bool:
        """Store ``events``; ``False`` when the room is no longer followed through
        ``handle``."""

    async def end_trusted(self, room_id: str, handle: str, reason: str) -> None:
        """The room is no longer peekable: end its peeks."""


@dataclass(frozen=True)
class ClientApiSnapshot:
    """A room read through the client API (a
    :class:`~peekproxy.services.following.RoomSnapshot`): its state events in the stored
    client shape, its latest event as a PDU; nothing is redacted."""

    room_version: str
    events: dict[str, dict[str, Any]]
    state: dict[tuple[str, str], str]
    latest_event_id: str
    redacted: frozenset[str] = frozenset()


def _room_path(room_id: str, what: str) -> str:
    return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/{what}"


class ClientApiFollower:
    """World_readable rooms of the fronted homeserver, followed through its client API as
    the account of ``token`` (see the module docstring).

    Args:
        homeserver: the client-API shell to the fronted homeserver.
        token: the access token of peekproxy's own local account (never logged).
        clock_ms: the wall clock, ms since the epoch.

    :meth:`attach` names where live events go, and :meth:`run` must be running for
    :meth:`follow` (it owns the tasks).
    """

    def __init__(
        self,
        *,
        homeserver: HomeserverClient,
        token: str,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.homeserver = homeserver
        self._token = token
        self.clock_ms = clock_ms
        self._sink: TrustedEvents | None = None
        self._server_name: str | None = None
        self._nursery: trio.Nursery | None = None
        #: handle → (room ID, the cancel scope of its live task)
        self._live: dict[str, tuple[str, trio.CancelScope]] = {}

    def attach(self, sink: TrustedEvents) -> None:
        """Hand the live events to ``sink`` (set once, at assembly)."""
        self._sink = sink

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the live tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def server_name(self) -> str | None:
        """The homeserver's server name: the server part of the account's user ID
        (``GET /account/whoami``), learnt once. ``None`` while it cannot be learnt (the
        homeserver is unreachable, or refuses the token: logged)."""
        if self._server_name is None:
            try:
                me = await self.homeserver.get_json(
                    "/_matrix/client/v3/account/whoami",
                    token=self._token,
                    timeout_s=FOLLOW_TIMEOUT_S,
                )
            except HomeserverRefused as e:
                log.error("the homeserver refused upstream.access_token_file's token: %s", e)
                return None
            except HomeserverUnavailable as e:
                log.warning("cannot ask the homeserver whose upstream token it is: %s", e)
                return None
            user_id = me.get("user_id") if isinstance(me, dict) else None
            if isinstance(user_id, str) and ":" in user_id:
                self._server_name = user_id.partition(":")[2]
        return self._server_name

    async def directory_entry(self, alias: str) -> Any | None:
        """The homeserver's directory entry (JSON, unchecked) for one of its own aliases,
        read through its client API (``GET /_matrix/client/v3/directory/room/{roomAlias}``);
        ``None`` for an alias of another server (or while the homeserver's name cannot be
        learnt): resolve it over federation.

        Raises:
            PeekError: 404 ``M_NOT_FOUND`` unknown alias; 502 ``M_UNKNOWN`` the homeserver
                cannot be reached or answers no JSON.
        """
        server = await self.server_name()
        if server is None or alias.partition(":")[2] != server:
            return None
        try:
            return await self.homeserver.get_json(
                f"/_matrix/client/v3/directory/room/{quote(alias, safe='')}",
                token=self._token,
                timeout_s=FOLLOW_TIMEOUT_S,
            )
        except HomeserverRefused as e:
            if e.status == 404:
                raise PeekError(404, "M_NOT_FOUND", f"{alias} not found on {server}") from None
            raise PeekError(502, "M_UNKNOWN", f"alias lookup at {server} failed: {e}") from None
        except HomeserverUnavailable as e:
            raise PeekError(502, "M_UNKNOWN", f"alias lookup at {server} failed: {e}") from None

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """Read the room's newest events and state, and start its live task.

        Raises:
            FollowFailed: 403 ``M_FORBIDDEN`` the room is not world_readable or is
                encrypted; 502 ``M_UNKNOWN`` the homeserver is not among ``candidates``,
                cannot be reached, or cannot read the room (it is not in it).
        """
        server = await self.server_name()
        if server is None or server not in candidates:
            raise _failed(502, f"the homeserver cannot be asked about {room_id}")
        try:
            page = await self.homeserver.get_json(
                _room_path(room_id, "messages"),
                token=self._token,
                params={"dir": "b", "limit": str(FIRST_VIEW_LIMIT + 1), "raw": "true"},
                timeout_s=FOLLOW_TIMEOUT_S,
            )
            state = room_state(
                _list(
                    await self.homeserver.get_json(
                        _room_path(room_id, "state"), token=self._token, timeout_s=FOLLOW_TIMEOUT_S
                    )
                )
            )
        except HomeserverRefused as e:
            raise FollowFailed(
                await self._refusal(room_id, server, e), rate_limited=False, abandoned=()
            ) from None
        except HomeserverUnavailable as e:
            raise _failed(502, f"the homeserver {server} cannot be reached: {e}") from None
        if state.unpeekable is not None or state.room_version is None:
            raise _failed(403, f"{room_id} cannot be peeked: {state.unpeekable}")
        since = page.get("start") if isinstance(page, dict) else None
        timeline = [
            found
            for raw in _list(page.get("chunk") if isinstance(page, dict) else None)
            if (found := pdu_from_raw(raw, room_id)) is not None
        ]
        if not isinstance(since, str) or not timeline:
            raise _failed(502, f"the homeserver {server} answered /messages of {room_id} unusably")
        (latest_id, latest), older = timeline[0], timeline[1:]
        events = dict(state.events)
        # The state events also read as PDUs are kept so (the store keeps the first it gets).
        events.update((e, pdu) for e, pdu in timeline if e in events)
        events[latest_id] = latest
        handle = HANDLE_PREFIX + new_peek_id()
        await self._start_live(room_id, handle, since)
        return Followed(
            server=server,
            handle=handle,
            interval_ms=CHECK_INTERVAL_MS,
            at_ms=self.clock_ms(),
            snapshot=ClientApiSnapshot(state.room_version, events, state.state, latest_id),
            history=([(e, pdu, False) for e, pdu in reversed(older)], "end" not in page),
            trusted=True,
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Nothing to renew while the room's live task runs; else ``refused`` (follow
        again, with a gap)."""
        if handle in self._live:
            return Renewed(at_ms=self.clock_ms())
        stopped = "its /events long-poll at the homeserver stopped"
        return RenewalFailed(refused=True, at_ms=self.clock_ms(), error=stopped)

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """End the room's live task (``True``: also when there is none)."""
        live = self._live.pop(handle, None)
        if live is not None:
            live[1].cancel()
        return True

    async def _refusal(self, room_id: str, server: str, refused: HomeserverRefused) -> PeekError:
        """What the homeserver's refusal to let us read ``room_id`` means, from its room
        summary (MSC3266): 403 when the room is not world_readable or is encrypted, else a
        502 (the homeserver is not in the room, or does not say)."""
        try:
            summary = await self.homeserver.get_json(
                f"/_matrix/client/v1/room_summary/{quote(room_id, safe='')}",
                token=self._token,
                timeout_s=FOLLOW_TIMEOUT_S,
            )
        except (HomeserverRefused, HomeserverUnavailable):
            summary = None
        if isinstance(summary, dict) and summary.get("world_readable") is False:
            return PeekError(403, "M_FORBIDDEN", f"{room_id} is not world_readable")
        if isinstance(summary, dict) and summary.get("encryption"):
            return PeekError(403, "M_FORBIDDEN", f"{room_id} is encrypted")
        return PeekError(
            502,
            "M_UNKNOWN",
            f"the homeserver {server} does not let peekproxy read {room_id} "
            f"({refused.status} {refused.errcode}): it is not in the room, or the room is not "
            "world_readable there",
        )

    async def _start_live(self, room_id: str, handle: str, since: str) -> None:
        if self._nursery is None:
            raise _failed(502, "peekproxy is not following rooms through the homeserver yet")
        await self._nursery.start(self._live_task, room_id, handle, since)

    async def _live_task(
        self,
        room_id: str,
        handle: str,
        since: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self._live[handle] = (room_id, scope)
            task_status.started()
            try:
                # A store error (the database away) polls again from ``since`` after the
                # back-off: the events stored already are known and skipped.
                await retry_store_errors(
                    None,
                    f"following {room_id} through the client API",
                    self._poll,
                    room_id,
                    handle,
                    since,
                )
            finally:
                if self._live.get(handle, (None, None))[1] is scope:
                    del self._live[handle]

    async def _poll(self, room_id: str, handle: str, since: str) -> None:
        """Long-poll the room's events from ``since`` until the room is refused or no
        longer followed through ``handle``."""
        assert self._sink is not None, "attach() names where live events go"
        failures = 0
        while True:
            try:
                body = await self.homeserver.get_json(
                    "/_matrix/client/v3/events",
                    token=self._token,
                    params={
                        "room_id": room_id,
                        "from": since,
                        "timeout": str(LONG_POLL_MS),
                        "raw": "true",
                    },
                    timeout_s=LONG_POLL_MS / 1000 + LONG_POLL_MARGIN_S,
                )
                end = body.get("end") if isinstance(body, dict) else None
                if not isinstance(end, str):
                    raise HomeserverUnavailable("/events answered without an end token")
            except HomeserverRefused as e:
                if e.status in (403, 404):
                    await self._refused_live(room_id, handle, e)
                    return
                failures += 1
                await self._back_off(room_id, failures, e)
                continue
            except HomeserverUnavailable as e:
                failures += 1
                await self._back_off(room_id, failures, e)
                continue
            failures, since = 0, end
            events = [
                (found[0], found[1], False)
                for raw in _list(body.get("chunk"))
                if (found := pdu_from_raw(raw, room_id)) is not None
            ]
            if events:
                # Shielded: a stop meanwhile must not cut a store (or a peek ending) short.
                with trio.CancelScope(shield=True):
                    kept = await self._sink.append_trusted(room_id, handle, events)
                if not kept:
                    return

    async def _refused_live(self, room_id: str, handle: str, refused: HomeserverRefused) -> None:
        server = self._server_name or "the homeserver"
        error = await self._refusal(room_id, server, refused)
        if error.status == 403:
            assert self._sink is not None
            with trio.CancelScope(shield=True):
                await self._sink.end_trusted(room_id, handle, error.error)
        else:
            log.warning("following %s through the client API lapsed: %s", room_id, error.error)

    async def _back_off(self, room_id: str, failures: int, error: Exception) -> None:
        delay = backoff_delay(failures, *LIVE_BACKOFF_S, random.random())
        log.warning(
            "events of %s from the homeserver failed (%d in a row, next try in %.1f s): %s",
            room_id,
            failures,
            delay,
            error,
        )
        await trio.sleep(delay)


def _failed(status: int, error: str) -> FollowFailed:
    errcode = "M_FORBIDDEN" if status == 403 else "M_UNKNOWN"
    return FollowFailed(PeekError(status, errcode, error), rate_limited=False, abandoned=())


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
