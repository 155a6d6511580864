"""The gauges read at scrape time: subscriptions by state and transport, device peeks by
status (docs/operations.md, "Metrics").

They describe what the daemon holds rather than events, so they are not kept up to date on
the paths that change them: the subscriptions are counted from memory
(:attr:`Subscriptions.by_room`) when Prometheus asks (:meth:`ScrapeGauges.refresh`, handed to
:func:`peekproxy.metrics.metrics_app`: synchronous, so that a scrape never waits for the
store), the device peeks with one grouped store read every :data:`DEVICE_PEEKS_EVERY_S`
seconds (:meth:`ScrapeGauges.run`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import trio

from peekproxy.core.subscription import Subscription
from peekproxy.metrics import DEVICE_PEEKS, SUBSCRIPTION_STATES, SUBSCRIPTIONS, TRANSPORTS
from peekproxy.outage import OUTAGE
from peekproxy.services.follower_choice import transport_of
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import Storage, StoreError

__all__ = ["DEVICE_PEEKS_EVERY_S", "ScrapeGauges", "subscription_counts"]

log = logging.getLogger("peekproxy.metrics")

#: How often the device peeks are counted in the store (seconds).
DEVICE_PEEKS_EVERY_S = 5.0


def subscription_counts(subs: Iterable[Subscription]) -> dict[tuple[str, str], int]:
    """(state, transport) → how many of ``subs``; every pair of
    :data:`~peekproxy.metrics.SUBSCRIPTION_STATES` × :data:`~peekproxy.metrics.TRANSPORTS`
    is present (0 when none)."""
    found = Counter((sub.state.value, transport_of(sub.peek_id) or "none") for sub in subs)
    return {(s, t): found[s, t] for s in SUBSCRIPTION_STATES for t in TRANSPORTS}


class ScrapeGauges:
    """Sets ``peekproxy_subscriptions`` before each scrape and ``peekproxy_device_peeks``
    every :data:`DEVICE_PEEKS_EVERY_S` seconds."""

    def __init__(self, *, subscriptions: Subscriptions, store: Storage) -> None:
        self.subscriptions = subscriptions
        self.store = store

    def refresh(self) -> None:
        """Count the subscriptions (in memory) this instance follows: with ``[cluster]``,
        the rooms whose lease it holds, so the series add up across instances
        (docs/cluster.md); the other instances' rooms it only views are not counted."""
        subscriptions = self.subscriptions
        followed = (
            sub for room_id, sub in subscriptions.by_room.items() if subscriptions.owns(room_id)
        )
        for (state, transport), count in subscription_counts(followed).items():
            SUBSCRIPTIONS.labels(state, transport).set(count)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count the device peeks (one grouped store read) now and every
        :data:`DEVICE_PEEKS_EVERY_S` seconds, until cancelled."""
        task_status.started()
        while True:
            try:
                totals = await self.store.read(lambda tx: tx.device_peek_totals())
            except Exception as e:  # a gauge must never end the daemon (a database error, a
                # bug): the gauge keeps its last value, and the next round tries again
                if isinstance(e, StoreError):  # the database away: one line per outage
                    OUTAGE.failed("counting the device peeks for the metrics", e)
                else:
                    log.warning("cannot count the device peeks for the metrics: %s", e)
            else:
                for status in ("active", "dormant"):
                    DEVICE_PEEKS.labels(status).set(totals.get(status, 0))
            await trio.sleep(DEVICE_PEEKS_EVERY_S)
