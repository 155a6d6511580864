"""The cluster loop of one instance among several on one database (docs/cluster.md).

Every third of the lease (:func:`peekproxy.core.cluster.renew_every_ms`) it renews this
instance's leases (a room lost, or not renewed in time, is no longer acted on: fencing),
refreshes the local view of every stored subscription, matches each owned room's
``wanted`` to the device peeks of the whole cluster, acts on the end requests other
instances left for its rooms, and takes over the rooms that need a follower and whose
lease expired (their owner died): :meth:`Subscriptions.adopt` resumes them as a restart
does.
"""

from __future__ import annotations

import logging

import trio

from peekproxy.core.cluster import Lease, may_take, needs_follower, renew_every_ms
from peekproxy.core.subscription import Subscription
from peekproxy.outage import OUTAGE
from peekproxy.services.leases import Leases
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import ReadTransaction, StoreError

__all__ = ["ClusterLoop"]

log = logging.getLogger("peekproxy.peeks")


class ClusterLoop:
    """See the module docstring; run with :meth:`run` (only with ``[cluster]``)."""

    def __init__(self, subscriptions: Subscriptions, leases: Leases) -> None:
        self.subscriptions = subscriptions
        self.leases = leases

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Look every third of the lease until cancelled; a store error is noted
        (:data:`~peekproxy.outage.OUTAGE`: one WARNING per outage, one INFO when a look
        succeeds again) and the next look tried (the leases run out meanwhile: this instance
        stops acting)."""
        task_status.started()
        every_s = renew_every_ms(self.leases.lease_ms) / 1000
        log.info(
            "cluster: this instance takes leases as %s (lease %d ms)",
            self.leases.me,
            self.leases.lease_ms,
        )
        while True:
            await trio.sleep(every_s)
            try:
                await self.tick()
            except StoreError as e:  # one WARNING per outage, as every other store user
                OUTAGE.failed("the cluster loop", e)
            else:
                OUTAGE.recovered()

    async def tick(self) -> None:
        """One look (see the module docstring)."""
        await self.leases.renew()

        def read(
            tx: ReadTransaction,
        ) -> tuple[list[Subscription], dict[str, Lease], dict[str, tuple[int, int]]]:
            return tx.load_subscriptions(), tx.leases(), tx.device_peek_counts()

        stored, leases, counts = await self.subscriptions.store.read(read)
        subscriptions = self.subscriptions
        for sub in stored:
            room_id = sub.room_id
            active = counts.get(room_id, (0, 0))[0]
            lease = leases.get(room_id)
            if subscriptions.owns(room_id):
                if lease is not None and lease.end_reason is not None:
                    await subscriptions.end_peeking(room_id, lease.end_reason)
                    await subscriptions.store.write(lambda tx: tx.request_end(room_id, None))  # noqa: B023
                elif bool(active) != getattr(subscriptions.get(room_id), "wanted", bool(active)):
                    await subscriptions.match_wanted(room_id)
                continue
            subscriptions.by_room[room_id] = sub  # the view of a room followed elsewhere
            now = subscriptions.clock_ms()
            if needs_follower(sub, active) and may_take(lease, self.leases.me, now):
                await subscriptions.adopt(room_id)
