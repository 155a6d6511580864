"""The admin status view of the remote subscriptions (docs/operations.md "Status").

:meth:`SubscriptionStatus.subscriptions` answers ``GET /_peekproxy/v1/admin/subscriptions``
(and so ``peekproxy status``): each room's subscription as this process holds it (with the
back-off, which is not stored), its device peeks and newest event from the store, and its
recent failures from :attr:`peekproxy.services.subscriptions.Subscriptions.failures` (per
process, lost on restart). The entries are shaped by :mod:`peekproxy.core.status`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peekproxy.core.status import by_urgency, subscription_entry
from peekproxy.services.client_api_follower import is_client_api_handle
from peekproxy.services.following import is_observer_handle
from peekproxy.services.settings import now_ms
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import ReadTransaction, Storage

__all__ = ["SubscriptionStatus", "transport_of"]


def transport_of(handle: str | None) -> str | None:
    """How a following named ``handle`` reaches the room: ``observer_join``,
    ``client_api`` (the fronted homeserver's client API), ``msc2444``; ``None`` when the
    room is followed by nothing now."""
    if handle is None:
        return None
    if is_observer_handle(handle):
        return "observer_join"
    if is_client_api_handle(handle):
        return "client_api"
    return "msc2444"


class SubscriptionStatus:
    """The status view (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Storage,
        subscriptions: Subscriptions,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.subscriptions = subscriptions
        self.clock_ms = clock_ms

    async def report(self, room_id: str | None = None) -> dict[str, Any]:
        """``{"subscriptions": [entry, ...], "now_ts": ms}``: every room ever followed
        (only ``room_id``'s when given; none when it was never followed), failing rooms
        first, then by room ID; each entry as :func:`peekproxy.core.status.subscription_entry`
        builds it (``last_event_ts``: when peekproxy stored the room's newest event, ms)."""
        subs = self.subscriptions.by_room
        chosen = [subs[room_id]] if room_id in subs else [] if room_id else list(subs.values())

        def read(tx: ReadTransaction) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
            return tx.device_peek_counts(room_id), tx.newest_events(room_id)

        devices, newest = await self.store.read(read)
        now = self.clock_ms()
        failures = self.subscriptions.failures
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
                ),
            )
            for sub in chosen
        ]
        return {"subscriptions": by_urgency(entries), "now_ts": now}
