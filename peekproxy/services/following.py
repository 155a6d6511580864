"""The seam between remote subscriptions and how a remote room is followed.

:class:`peekproxy.services.subscriptions.Subscriptions` keeps one subscription per remote
room (wanted or not, its back-off, its renewal plan in :func:`peekproxy.core.subscription.plan`)
and asks a :class:`RoomFollower` to do the following itself:

* :meth:`RoomFollower.follow`: start following a room through one of its candidate servers
  and give back its first snapshot (state, latest event, the history before it);
* :meth:`RoomFollower.renew`: keep a following alive, perhaps with a newer snapshot;
* :meth:`RoomFollower.stop`: end a following the remote server may still hold.

Followers: the MSC2444 peek (:class:`peekproxy.services.msc2444.Msc2444Peeks`); in front
mode, rooms of the fronted homeserver itself read through its client API
(:class:`peekproxy.services.client_api_follower.ClientApiFollower`), the two combined by
:class:`peekproxy.services.follower_choice.FollowerChoice`. An observer join (join the room
as a server, receive its events by ordinary federation) is the next.

What a follower hands out is opaque to the subscriptions: a following is named by the server
that holds it and a ``handle`` (MSC2444: the peek ID) that the subscription persists and gives
back to :meth:`~RoomFollower.renew` and :meth:`~RoomFollower.stop`. Renewal *timing* stays
in the pure subscription plan: a follower only says, per following, how long the remote keeps
it without a renewal (``interval_ms``); a follower with nothing to renew answers
:meth:`~RoomFollower.renew` with an empty :class:`Renewed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from peekproxy.services.errors import PeekError

__all__ = [
    "OBSERVER_HANDLE_PREFIX",
    "Fetched",
    "FollowFailed",
    "Followed",
    "RenewalFailed",
    "Renewed",
    "RoomFollower",
    "RoomSnapshot",
    "is_observer_handle",
]

#: The handles of rooms followed by an observer join start so (the rest is the join event ID).
OBSERVER_HANDLE_PREFIX = "join:"


def is_observer_handle(handle: str | None) -> bool:
    """Whether ``handle`` names an observer join (the room is joined as the observer user:
    every server in the room may send its events, and members may ask for them)."""
    return handle is not None and handle.startswith(OBSERVER_HANDLE_PREFIX)


#: (event ID, PDU, redacted) of an event fetched and verified, ready to be stored.
Fetched = tuple[str, dict[str, Any], bool]


class RoomSnapshot(Protocol):
    """A verified view of a remote room at one event (e.g.
    :class:`peekproxy.core.validation.ValidatedPeek`)."""

    @property
    def room_version(self) -> str: ...
    @property
    def events(self) -> Mapping[str, dict[str, Any]]:
        """Event ID → verified PDU: the state, the auth chain and the latest event."""

    @property
    def redacted(self) -> frozenset[str]:
        """The event IDs of ``events`` kept redacted (their content hash did not match)."""

    @property
    def state(self) -> Mapping[tuple[str, str], str]:
        """(type, state key) → event ID: the room's state at ``latest_event_id``."""

    @property
    def latest_event_id(self) -> str: ...


@dataclass(frozen=True)
class Followed:
    """A room now followed through ``server``.

    ``handle``: the follower's name for this following (MSC2444: the peek ID);
    ``interval_ms``: how long the server keeps it without a renewal (ms), counted from
    ``at_ms`` (when the server answered, ms since the epoch);
    ``history``: the events before the snapshot's latest event, oldest first, and whether
    nothing is missing before them; ``None`` when there is nothing to add;
    ``abandoned``: (server, handle) of earlier attempts the servers may still hold, to stop;
    ``trusted``: the events come from the homeserver peekproxy fronts, not over federation
    (no receipt checks, and so no auth rules, apply).
    """

    server: str
    handle: str
    interval_ms: int
    at_ms: int
    snapshot: RoomSnapshot
    history: tuple[list[Fetched], bool] | None
    abandoned: tuple[tuple[str, str], ...] = ()
    trusted: bool = False


class FollowFailed(Exception):
    """Every candidate failed. ``error`` is what the device gets (403: the room is not
    peekable, it ends; 429 with ``rate_limited``: every candidate limited us; else
    a 502/504 summary naming each candidate); ``abandoned`` as in :class:`Followed`."""

    def __init__(
        self, error: PeekError, *, rate_limited: bool, abandoned: tuple[tuple[str, str], ...]
    ) -> None:
        super().__init__(str(error))
        self.error, self.rate_limited, self.abandoned = error, rate_limited, abandoned


@dataclass(frozen=True)
class Renewed:
    """A following renewed (``at_ms``: when the server answered, ms since the epoch).
    ``interval_ms``: the server's new interval (``None``: as before); ``snapshot``: a newer
    view of the room, with ``fill`` (the events between the stored room and its latest
    event), or ``None`` when the renewal brought no view."""

    at_ms: int
    interval_ms: int | None = None
    snapshot: RoomSnapshot | None = None
    fill: Sequence[Fetched] = ()


@dataclass(frozen=True)
class RenewalFailed:
    """A renewal failed; ``refused``: the server no longer holds the following (it lapsed:
    follow again, with a gap), else it may be tried again after a back-off. ``at_ms``: when
    it failed (ms since the epoch); ``error``: why (for the status view's recent failures)."""

    refused: bool
    at_ms: int
    error: str = ""


class RoomFollower(Protocol):
    """How remote rooms are followed (see the module docstring)."""

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """Follow ``room_id`` through the first of ``candidates`` that lets us, and fetch
        its first snapshot (every PDU checked).

        Raises:
            FollowFailed: no candidate did.
        """

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Keep the following ``handle`` of ``room_id`` at ``server`` alive."""

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """End the following ``handle`` at ``server``; ``True`` when it is gone (also when the
        server no longer knew it), ``False`` to try again later."""
