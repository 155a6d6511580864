"""The services of one daemon, assembled: :func:`build_services` → :class:`Services`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio
from signedjson.types import SigningKey

from peekproxy.core.status import RecentFailures
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.services.client_api_follower import ClientApiFollower, is_client_api_handle
from peekproxy.services.cluster import ClusterLoop
from peekproxy.services.directory import RoomDirectory
from peekproxy.services.event_auth import EventAuth
from peekproxy.services.follower_choice import FollowerChoice
from peekproxy.services.following import RoomFollower
from peekproxy.services.ingest import Ingest
from peekproxy.services.member_reads import MemberReads
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.msc2444 import Msc2444Peeks
from peekproxy.services.notifier import Notifier
from peekproxy.services.observer_join import ObserverJoin
from peekproxy.services.observer_queries import ObserverQueries
from peekproxy.services.reads import HistoryReads
from peekproxy.services.settings import PeekSettings, now_ms
from peekproxy.services.status import FailureRecorder, SubscriptionStatus
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.services.syncing import Syncing
from peekproxy.store import Storage

__all__ = ["PeekSettings", "Services", "build_services"]


@dataclass(frozen=True)
class Services:
    """The peek services of one daemon, assembled by :func:`build_services`, and what they
    share (the store, the federation client and keyring, the settings and the clock)."""

    store: Storage
    client: FederationClient
    keyring: Keyring
    settings: PeekSettings
    clock_ms: Callable[[], int]
    notifier: Notifier
    follower: RoomFollower
    directory: RoomDirectory
    subscriptions: Subscriptions
    ingest: Ingest
    syncing: Syncing
    reads: HistoryReads
    #: Other servers' reads of the rooms joined as the observer (events, state, history).
    members: MemberReads
    #: Other servers' questions about the observer user (devices, keys, profile).
    observer_queries: ObserverQueries
    #: The admin status view of the subscriptions.
    status: SubscriptionStatus
    #: Front mode with ``upstream.access_token_file``: the fronted homeserver's own rooms.
    local_rooms: ClientApiFollower | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the live window at the newest stream row, end the typing left from before
        a restart, resume the subscriptions (renew at once; a lapse while down becomes a
        gap) and restart the devices' idle clocks; then run the subscription tasks, typing
        expiry and the idle reaper until cancelled. ``task_status.started()`` once all of
        that is under way."""
        async with trio.open_nursery() as nursery:
            await self.syncing.open_live_window()
            if self.local_rooms is not None:
                await nursery.start(self.local_rooms.run)
            await nursery.start(self.ingest.run)
            await nursery.start(self.subscriptions.run)
            if self.subscriptions.leases is not None:  # several instances: docs/cluster.md
                await nursery.start(ClusterLoop(self.subscriptions, self.subscriptions.leases).run)
            await nursery.start(self.syncing.run)
            task_status.started()


def build_services(
    *,
    store: Storage,
    client: FederationClient,
    keyring: Keyring,
    settings: PeekSettings,
    clock_ms: Callable[[], int] = now_ms,
    follower: RoomFollower | None = None,
    local_rooms: ClientApiFollower | None = None,
    server_name: str | None = None,
    signing_key: SigningKey | None = None,
) -> Services:
    """The peek services over ``store``, sending through ``client`` (keys from ``keyring``).
    ``follower``: how remote rooms are followed (default: MSC2444 peeks; with
    ``local_rooms`` the fronted homeserver's own rooms through its client API first; with
    ``settings.observer``, ``server_name`` and ``signing_key`` the observer join after
    MSC2444)."""
    notifier = Notifier()
    missing = MissingEvents(store=store, client=client, keyring=keyring)
    auth = EventAuth(store=store, missing=missing)
    if follower is None:
        msc2444 = Msc2444Peeks(
            store=store, client=client, keyring=keyring, missing=missing, clock_ms=clock_ms
        )
        observer = None
        if settings.observer is not None and server_name and signing_key is not None:
            observer = ObserverJoin(
                store=store,
                client=client,
                keyring=keyring,
                missing=missing,
                server_name=server_name,
                signing_key=signing_key,
                settings=settings.observer,
                live=settings.live,
                clock_ms=clock_ms,
            )
        follower = msc2444
        if local_rooms is not None or observer is not None:
            follower = FollowerChoice(remote=msc2444, local=local_rooms, observer=observer)
    directory = RoomDirectory(
        client=client, local_aliases=None if local_rooms is None else local_rooms.directory_entry
    )
    failures = RecentFailures()  # for the status view
    subscriptions = Subscriptions(
        store=store,
        follower=FailureRecorder(follower, failures, clock_ms),
        notifier=notifier,
        settings=settings,
        auth=auth,
        clock_ms=clock_ms,
    )
    ingest = Ingest(
        store=store,
        client=client,
        keyring=keyring,
        missing=missing,
        auth=auth,
        subscriptions=subscriptions,
        notifier=notifier,
        clock_ms=clock_ms,
    )
    if local_rooms is not None:
        local_rooms.attach(ingest)
    syncing = Syncing(
        store=store,
        directory=directory,
        subscriptions=subscriptions,
        notifier=notifier,
        settings=settings,
        clock_ms=clock_ms,
    )

    def server_of(room_id: str) -> str | None:
        # A room followed through the homeserver's client API has no server to backfill
        # from over federation: its /messages pages pass over the gaps.
        sub = subscriptions.get(room_id)
        return sub.server if sub is not None and not is_client_api_handle(sub.peek_id) else None

    reads = HistoryReads(
        store=store,
        client=client,
        keyring=keyring,
        auth=auth,
        server_of=server_of,
        clock_ms=clock_ms,
    )
    members = MemberReads(store=store, subscriptions=subscriptions)
    observer_queries = ObserverQueries(observer=settings.observer)
    return Services(
        store=store,
        client=client,
        keyring=keyring,
        settings=settings,
        clock_ms=clock_ms,
        notifier=notifier,
        follower=follower,
        directory=directory,
        subscriptions=subscriptions,
        ingest=ingest,
        syncing=syncing,
        reads=reads,
        members=members,
        observer_queries=observer_queries,
        status=SubscriptionStatus(
            store=store, subscriptions=subscriptions, failures=failures, clock_ms=clock_ms
        ),
        local_rooms=local_rooms,
    )
