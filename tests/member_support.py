"""Helpers of the tests of what peekproxy answers as a member of a room it observes: a
follower that hands out given room views (an observer join's ``join:`` handle for the rooms
it observes), and peekproxy's federation app served in the test process over the peek
services (real store, keyring, subscriptions)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
from signedjson.types import SigningKey

from peekproxy.api.federation import federation_app
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.services.assembly import Services, build_services
from peekproxy.services.following import Fetched, Followed, RenewalFailed, Renewed
from peekproxy.services.settings import ObserverSettings
from peekproxy.store import Storage
from tests.offline import OFFLINE_SETTINGS
from tests.support import serve_app

DEVICE = ("@dev:local.test", "PHONE")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Snapshot:
    """A :class:`peekproxy.services.following.RoomSnapshot`."""

    room_version: str
    events: dict[str, dict[str, Any]]
    redacted: frozenset[str]
    state: dict[tuple[str, str], str]
    latest_event_id: str


@dataclass(frozen=True)
class RoomView:
    """What following a room hands out: its snapshot and the events before the latest."""

    snapshot: Snapshot
    history: list[Fetched]


@dataclass
class Followings:
    """Follows the rooms of ``views`` through ``server``: as the observer (a ``join:`` +
    latest event ID handle) those in ``observed``, by an MSC2444 peek the others. ``stopped``
    is set when a following is stopped (the subscription has let go of it by then)."""

    server: str
    views: dict[str, RoomView]
    observed: set[str]
    stopped: trio.Event = field(default_factory=trio.Event)

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        view = self.views[room_id]
        latest = view.snapshot.latest_event_id
        return Followed(
            server=self.server,
            handle=f"join:{latest}" if room_id in self.observed else "msc2444-peek",
            interval_ms=24 * 3_600_000,
            at_ms=now_ms(),
            snapshot=view.snapshot,
            history=(view.history, True),
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        return Renewed(at_ms=now_ms())

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        self.stopped.set()
        return True


async def serve_member(
    nursery: trio.Nursery,
    *,
    store: Storage,
    client: FederationClient,
    follower: Followings,
    server_name: str,
    signing_key: SigningKey,
    observer: ObserverSettings,
    bind: str = "127.0.0.1:0",
    tls: tuple[Path, Path] | None = None,
    requests: list[tuple[str, str]] | None = None,
) -> tuple[Services, str]:
    """The peek services over ``store`` following rooms with ``follower``, running in
    ``nursery``, each room of its views peeked by :data:`DEVICE`; and peekproxy's federation
    app over them, served at the returned URL (``requests``: gets the method and path of
    each request the app is asked)."""
    keyring = Keyring(client)
    services = build_services(
        store=store,
        client=client,
        keyring=keyring,
        settings=replace(OFFLINE_SETTINGS, observer=observer),
        follower=follower,
    )
    await nursery.start(services.run)
    for room_id in follower.views:
        assert await services.syncing.peek(*DEVICE, room_id) == room_id
    app = federation_app(
        server_name=server_name,
        signing_key=signing_key,
        key_valid_for_ms=3_600_000,
        old_verify_keys={},
        keyring=keyring,
        ingest=services.ingest,
        members=services.members,
        observer=services.observer_queries,
    )

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and requests is not None:
            requests.append((scope["method"], scope["path"]))
        await app(scope, receive, send)

    return services, await serve_app(nursery, recorded, bind=bind, tls=tls)
