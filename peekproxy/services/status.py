"""The admin status view of the remote subscriptions (docs/operations.md "Status").

:meth:`SubscriptionStatus.report` answers ``GET /_peekproxy/v1/admin/subscriptions`` (and
so ``peekproxy status``): each room's subscription as this process holds it (with the
back-off, which is not stored), its device peeks and newest event from the store, and its
recent failures. :class:`FailureRecorder` keeps those: it is the room follower the
subscriptions use (:class:`~peekproxy.services.following.RoomFollower`), passing every call
on and recording the failed peeks, renewals and stops in a
:class:`~peekproxy.core.status.RecentFailures` (per process, lost on restart). The entries
are shaped by :mod:`peekproxy.core.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from peekproxy.core.cluster import Lease
from peekproxy.core.status import Failure, RecentFailures, by_urgency, subscription_entry
from peekproxy.services.follower_choice import transport_of
from peekproxy.services.following import (
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
    RoomFollower,
)
from peekproxy.services.settings import now_ms
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import ReadTransaction, Storage

__all__ = ["FailureRecorder", "SubscriptionStatus"]


class FailureRecorder:
    """A :class:`~peekproxy.services.following.RoomFollower` that passes every call on to
    ``follower`` and records its failures in ``failures`` (ms from ``clock_ms``): a follow
    that failed at every candidate (action ``peek``, no one server: the error names each),
    a failed renewal (``renew``), a stop to be tried again (``delete``)."""

    def __init__(
        self,
        follower: RoomFollower,
        failures: RecentFailures,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.follower = follower
        self.failures = failures
        self.clock_ms = clock_ms

    def _record(self, room_id: str, action: str, server: str | None, error: str) -> None:
        self.failures.record(room_id, Failure(self.clock_ms(), action, server, error))

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        try:
            return await self.follower.follow(room_id, candidates)
        except FollowFailed as failed:
            self._record(room_id, "peek", None, failed.error.error)
            raise

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        renewal = await self.follower.renew(room_id, server, handle)
        if isinstance(renewal, RenewalFailed):
            self._record(room_id, "renew", server, renewal.error or "renewal failed")
        return renewal

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        stopped = await self.follower.stop(room_id, server, handle)
        if not stopped:
            self._record(room_id, "delete", server, f"{handle} not stopped; will retry")
        return stopped


class SubscriptionStatus:
    """The status view (see the module docstring): the subscriptions of ``subscriptions``,
    with the failures ``failures`` holds (those its :class:`FailureRecorder` records)."""

    def __init__(
        self,
        *,
        store: Storage,
        subscriptions: Subscriptions,
        failures: RecentFailures,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.subscriptions = subscriptions
        self.failures = failures
        self.clock_ms = clock_ms

    async def report(self, room_id: str | None = None) -> dict[str, Any]:
        """``{"subscriptions": [entry, ...], "now_ts": ms}``: every room ever followed
        (only ``room_id``'s when given; none when it was never followed), failing rooms
        first, then by room ID; each entry as :func:`peekproxy.core.status.subscription_entry`
        builds it (``last_event_ts``: when peekproxy stored the room's newest event, ms)."""
        subs = self.subscriptions.by_room
        chosen = [subs[room_id]] if room_id in subs else [] if room_id else list(subs.values())

        clustered = self.subscriptions.leases is not None

        def read(
            tx: ReadTransaction,
        ) -> tuple[dict[str, tuple[int, int]], dict[str, Any], dict[str, Lease]]:
            leases = tx.leases(room_id) if clustered else {}
            return tx.device_peek_counts(room_id), tx.newest_events(room_id), leases

        devices, newest, leases = await self.store.read(read)
        now = self.clock_ms()
        failures = self.failures
        entries = [
            (
                sub,
                subscription_entry(
                    sub,
                    now_ms=now,
                    transport=transport_of(sub.peek_id),
                    devices=devices.get(sub.room_id, (0, 0)),
                    last_event=newest.get(sub.room_id),
                    failures=failures.of(sub.room_id),
                    follower=_follower(leases.get(sub.room_id), now) if clustered else None,
                ),
            )
            for sub in chosen
        ]
        return {"subscriptions": by_urgency(entries), "now_ts": now}


def _follower(lease: Lease | None, now_ms: int) -> str:
    """Which instance follows a room (``[cluster]``): the lease owner's instance name and
    suffix, or ``"none"`` when no live lease is held."""
    if lease is None or lease.expires_ms <= now_ms:
        return "none"
    return lease.owner
