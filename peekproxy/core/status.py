"""What the admin status view tells about each remote subscription (pure).

:class:`RecentFailures` is the small in-memory record of the last failures per room of the
subscriptions' room follower (:class:`peekproxy.services.status.FailureRecorder`; per
process, lost on restart);
:func:`subscription_entry` shapes one room's entry of ``GET
/_peekproxy/v1/admin/subscriptions`` (docs/operations.md "Status") and :func:`by_urgency`
orders them, failing rooms first. Times are ms since the epoch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from peekproxy.core.subscription import Subscription, SubState

__all__ = [
    "FAILURES_PER_ROOM",
    "FAILURE_ROOMS",
    "Failure",
    "RecentFailures",
    "backoff_until_ms",
    "by_urgency",
    "is_failing",
    "subscription_entry",
]

#: Failures kept per room (the newest), and rooms kept (those that failed last).
FAILURES_PER_ROOM = 5
FAILURE_ROOMS = 1_000


@dataclass(frozen=True)
class Failure:
    """One failed action of a room's subscription.

    ``ts``: when it failed (ms); ``action``: ``peek`` (a first peek or a re-peek through the
    candidates), ``renew`` or ``delete`` (stopping an old peek, or the observer's leave);
    ``server``: the server asked (``None`` for a peek through several candidates: ``error``
    names each); ``error``: what went wrong.
    """

    ts: int
    action: str
    server: str | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"ts": self.ts, "action": self.action, "server": self.server, "error": self.error}


class RecentFailures:
    """The newest ``per_room`` failures of each of the ``rooms`` rooms that failed last
    (older rooms are forgotten first), in memory only."""

    def __init__(self, *, per_room: int = FAILURES_PER_ROOM, rooms: int = FAILURE_ROOMS) -> None:
        self.per_room = per_room
        self.rooms = rooms
        self._by_room: OrderedDict[str, deque[Failure]] = OrderedDict()

    def record(self, room_id: str, failure: Failure) -> None:
        """Keep ``failure`` as the room's newest (the room becomes the last to forget)."""
        kept = self._by_room.pop(room_id, None)
        if kept is None:
            kept = deque(maxlen=self.per_room)
        kept.append(failure)
        self._by_room[room_id] = kept
        while len(self._by_room) > self.rooms:
            self._by_room.popitem(last=False)

    def of(self, room_id: str) -> list[Failure]:
        """The room's kept failures, oldest first."""
        return list(self._by_room.get(room_id, ()))

    def __len__(self) -> int:
        return len(self._by_room)


def backoff_until_ms(sub: Subscription, now_ms: int) -> int | None:
    """Until when the room waits after failures (ms), or ``None`` when it does not: a
    re-peek's back-off (``retry_at_ms``), a renewal retried after failures (``renew_at_ms``
    while ``failures``), else a failed DELETE's retry (``delete_retry_at_ms``); only a
    moment still ahead of ``now_ms`` counts."""
    candidates = [sub.retry_at_ms, sub.delete_retry_at_ms]
    if sub.state is SubState.ACTIVE and sub.failures:
        candidates.append(sub.renew_at_ms)
    ahead = [t for t in candidates if t is not None and t > now_ms]
    return max(ahead, default=None)


def is_failing(sub: Subscription) -> bool:
    """Whether the room needs an admin's eye: lapsed, failed, or failures in a row."""
    return sub.failures > 0 or (sub.wanted and sub.state in (SubState.LAPSED, SubState.FAILED))


def subscription_entry(
    sub: Subscription,
    *,
    now_ms: int,
    transport: str | None,
    devices: tuple[int, int],
    last_event: tuple[str, int] | None,
    failures: Iterable[Failure],
    follower: str | None = None,
) -> dict[str, Any]:
    """One room's entry of the status answer (docs/operations.md "Status" lists the keys).

    ``transport``: ``msc2444``, ``observer_join``, ``client_api`` or ``None`` (no following
    now); ``devices``: (active, dormant) device peeks; ``last_event``: (event ID, ms when
    peekproxy stored it) of the newest event on the room's stream; ``follower``: with
    ``[cluster]``, the lease owner that follows the room (``<instance_name>/<suffix>``, or
    ``"none"``), else ``None``.
    """
    event_id, event_ts = last_event if last_event is not None else (None, None)
    return {
        "room_id": sub.room_id,
        "transport": transport,
        "target": sub.server,
        "peek_id": sub.peek_id if transport == "msc2444" else None,
        "state": sub.state.value,
        "wanted": sub.wanted,
        "room_version": sub.room_version,
        "last_renewal_ts": sub.last_renewed_ms,
        "renewal_interval_ms": sub.remote_interval_ms,
        "next_renewal_ts": sub.renew_at_ms if sub.state is SubState.ACTIVE else None,
        "last_event_ts": event_ts,
        "last_event_id": event_id,
        "devices": {"active": devices[0], "dormant": devices[1]},
        "failures_in_a_row": sub.failures,
        "backoff_until_ts": backoff_until_ms(sub, now_ms),
        "ended_reason": sub.ended_reason,
        "pending_deletes": len(sub.pending_deletes),
        "recent_failures": [f.to_json() for f in failures],
        "follower": follower,
    }


def by_urgency(entries: Iterable[tuple[Subscription, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The entries, failing rooms (:func:`is_failing`) first, then wanted ones, each group
    by room ID."""
    ordered = sorted(entries, key=lambda e: (not is_failing(e[0]), not e[0].wanted, e[0].room_id))
    return [entry for _, entry in ordered]
