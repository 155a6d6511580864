"""The read operations of a transaction (:class:`ReadTransaction`), grouped by concern.

Positions are stream positions (``int`` > 0, allocated by the storage in commit order, never
reused); ``*_ms`` / ``now_ms`` are Unix times in milliseconds; a PDU is a JSON object as
received over federation; "stored redacted" means the stored PDU must go through the room
version's redaction algorithm before it is shown. Room IDs, event IDs, user IDs and device
IDs are plain ``str``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from peekproxy.core.cluster import Lease
from peekproxy.core.live import StreamChange
from peekproxy.core.paging import Direction, Page, Point
from peekproxy.core.subscription import Subscription
from peekproxy.core.sync import SyncSnapshot

__all__ = [
    "DevicePeekReads",
    "EphemeralReads",
    "FrontPositionReads",
    "HistoryQueries",
    "LeaseReads",
    "ReadTransaction",
    "RoomEventReads",
    "ServerKeyReads",
    "ServerKeyRow",
    "SubscriptionReads",
    "SyncReads",
    "TxnReads",
]

#: One persisted signing key of another server: (server name, key ID, unpadded base64
#: verify key, ``valid_until_ts`` ms, ``expired_ts`` ms or ``None`` while current,
#: ``fetched_ts`` ms).
ServerKeyRow = tuple[str, str, str, int, int | None, int]


class SubscriptionReads(Protocol):
    """Remote subscriptions (``core/subscription.py``): one per room followed."""

    def load_subscriptions(self, room_id: str | None = None) -> list[Subscription]:
        """Every stored subscription (one per remote room followed), in no particular order;
        with ``room_id``: that room's only (an empty list: none stored)."""

    def room_version_of(self, room_id: str) -> str:
        """The room's version as its subscription recorded it, else ``FALLBACK_ROOM_VERSION``."""


class LeaseReads(Protocol):
    """Several instances on one database (docs/cluster.md, :mod:`peekproxy.core.cluster`):
    the subscription leases and each device's last stored sync (times in ms)."""

    def leases(self, room_id: str | None = None) -> dict[str, Lease]:
        """Every room's lease (only ``room_id``'s when given), by room ID (expired ones
        included)."""

    def last_sync(self, user_id: str, device_id: str) -> int | None:
        """The device's last sync as stored by any instance (ms; ``None``: none stored)."""

    def idle_devices(self, synced_before_ms: int) -> list[tuple[str, str, int]]:
        """``(user_id, device_id, synced_ms)`` of each device with an active peek whose stored
        last sync is before ``synced_before_ms``, the longest idle first. Devices with no
        stored sync are not listed (see ``record_unsynced_devices``)."""


class RoomEventReads(Protocol):
    """Room events, the room stream (events and gap rows by stream position) and the
    current state."""

    def known_event_ids(self, event_ids: Iterable[str]) -> set[str]:
        """Which of ``event_ids`` are stored."""

    def judged_events(self, event_ids: Iterable[str]) -> dict[str, tuple[dict[str, Any], str]]:
        """Stored events among ``event_ids``: event ID → (PDU as stored, auth status:
        ``"accepted"``, ``"soft_failed"`` or ``"rejected"``; see
        :meth:`~peekproxy.store.writes.RoomEventWrites.store_unshown`)."""

    def auth_state(
        self, room_id: str, user_ids: Iterable[str]
    ) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
        """The room's current state that the auth rules read (SSAPI §Auth events
        selection): ``m.room.create``, ``m.room.power_levels``, ``m.room.join_rules``, every
        ``m.room.third_party_invite``, and the ``m.room.member`` of each of ``user_ids``;
        (type, state_key) → (event ID, PDU as stored)."""

    def in_stream(self, event_id: str) -> bool:
        """Whether a client sees the event when paging: on a room stream, or in a filled gap
        (not only stored)."""

    def held_event_ids(self, room_id: str, event_ids: Iterable[str]) -> set[str]:
        """Which of ``event_ids`` a client sees when paging ``room_id``: on its stream or in
        one of its filled gaps."""

    def history_floor(self, room_id: str) -> int | None:
        """The ``depth`` of the event the room's stream resumes with after its newest gap (or,
        with no gap, of its first event: the latest event of the first peek), ``None`` for an
        empty stream. History below it is what the gap (or the peek's start) stands for."""

    def newest_event_ids(self, room_id: str, count: int) -> list[str]:
        """The IDs of the room's newest ``count`` events on its stream, newest first."""

    def newest_events(self, room_id: str | None = None) -> dict[str, tuple[str, int]]:
        """Room ID → (event ID, ``received_ts`` ms: when peekproxy stored it) of the newest
        event on each room's stream (only ``room_id``'s when given); rooms without events
        are left out."""

    def current_state_ids(self, room_id: str) -> dict[tuple[str, str], str]:
        """The room's current state: (type, state_key) → event ID."""

    def state_content(self, room_id: str, type: str, state_key: str = "") -> dict[str, Any] | None:
        """The ``content`` of the room's current state event (type, state_key): ``{}`` when it
        is not an object, ``None`` when there is no such state event."""

    def membership(self, room_id: str, user_id: str) -> str | None:
        """The user's ``membership`` in the room's current state (``None``: no member event)."""

    def stream_events(self, room_id: str) -> list[tuple[int, str, str | None]]:
        """The room's stream: (position, kind, event ID) for events and gaps, in order."""

    def event_pdu(self, event_id: str) -> dict[str, Any] | None:
        """A stored event's PDU as received (not redacted), or ``None`` when not stored."""

    def max_stream_pos(self) -> int:
        """The newest stream position (0 for an empty stream)."""

    def find_event(self, event_id: str) -> tuple[str, dict[str, Any], bool] | None:
        """A stored event of any room: (room ID, PDU as received, stored redacted), or
        ``None`` when not stored."""

    def stream_after(
        self, room_id: str, event_id: str, limit: int
    ) -> list[dict[str, Any] | None] | None:
        """The first ``limit`` rows of the room's stream after the event's own row, oldest
        first: the PDU of each event row, ``None`` for each gap row (other rows left out).
        ``None`` when the event is not on the room's stream (not stored, only in a gap fill,
        or of another room)."""


class DevicePeekReads(Protocol):
    """Device peeks (MSC2753): which device peeks which room."""

    def device_peek_state(self, user_id: str, device_id: str, room_id: str) -> str | None:
        """The state of the device's peek of the room (``active``, ``dormant``, ``ended``), or
        ``None`` when the device never peeked it."""

    def device_peek_count(self, room_id: str, state: str = "active") -> int:
        """How many device peeks of the room are in ``state``."""

    def device_peek_counts(self, room_id: str | None = None) -> dict[str, tuple[int, int]]:
        """Room ID → (``active``, ``dormant``) device peeks of each room that has any (only
        ``room_id``'s when given)."""

    def device_peeks_of_device(self, user_id: str, device_id: str) -> int:
        """How many rooms the device peeks (``active`` peeks)."""

    def user_room_peeks(self, user_id: str, room_id: str) -> list[tuple[str, str]]:
        """(device ID, state) of every peek any device of the user made of the room."""

    def device_peeks(self, user_id: str, device_id: str) -> list[tuple[str, str, int]]:
        """(room ID, state, changed position) of every peek the device ever made, by room ID."""

    def active_devices(self) -> list[tuple[str, str]]:
        """(user ID, device ID) of every device with at least one ``active`` peek."""

    def device_peek_totals(self) -> dict[str, int]:
        """How many device peeks are ``active`` and ``dormant`` (a state none is in is
        missing); for the metrics, read at scrape time."""


class FrontPositionReads(Protocol):
    """The sync front (docs/front.md): the peek stream position each homeserver
    ``next_batch`` token handed to a device stands for. Tokens are keyed by their sha256
    (``core.front_sync.token_hash``), never kept in clear."""

    def front_position(self, user_id: str, device_id: str, token_hash: str) -> int | None:
        """The position saved for the device's token, or ``None`` (never saved, or trimmed)."""

    def newest_front_position(self, user_id: str, device_id: str) -> int | None:
        """The position of the device's most recently saved token, or ``None``."""


class EphemeralReads(Protocol):
    """Ephemeral events (``m.typing``, ``m.receipt``)."""

    def typing_now(self) -> list[tuple[str, str, int]]:
        """(room ID, user ID, stream position) of every user whose latest ``m.typing`` says
        they are typing."""


class TxnReads(Protocol):
    """Inbound ``/send`` transaction records."""

    def txn_response(self, origin: str, txn_id: str) -> dict[str, Any] | None:
        """The answer stored for the ``/send`` transaction ``txn_id`` of ``origin`` (the JSON
        body returned the first time), or ``None`` when it is new."""


class ServerKeyReads(Protocol):
    """Other servers' signing keys, persisted by the keyring (``federation/keyring.py``)."""

    def server_keys(self) -> list[ServerKeyRow]:
        """Every persisted key, in no particular order."""


class HistoryQueries(Protocol):
    """History reads of the delegation API: ``/messages``, ``/state``, ``/event``, and whether a
    device peeks a room (the store's side of :class:`peekproxy.services.reads.HistoryReads`).

    ``read_page``'s paging walk (the points, holes and gap fills of
    :mod:`peekproxy.core.paging` turned into a page) lives in the SQLite implementation today
    (``store/sqlite/history.py``, ``HistoryOps``), not in the core: a second implementation
    should first move that walk into ``core/paging.py`` (over rows it reads) and call it from
    both, rather than write it again."""

    def read_page(
        self,
        room_id: str,
        *,
        from_point: Point | None,
        to_point: Point | None,
        direction: Direction,
        limit: int,
        fill_gaps: bool,
    ) -> Page:
        """One page of ``room_id``'s history (the rules are in :mod:`peekproxy.core.paging`).

        Args:
            from_point: the ``from`` token's point; ``None``: the stream's head (``dir=b``) or
                the start of the room's history (``dir=f``).
            to_point: the ``to`` token's point: the page holds only events between ``from`` and
                ``to``; reaching it ends the pagination (no ``end``).
            limit: most events in the page (≥ 1).
            fill_gaps: ``dir=b`` only: name a :class:`Backfill` where the page meets a hole
                before any event; without it (no server to ask, or a round that could not
                help) holes are passed over.

        Raises:
            TokenAhead: ``from_point`` is past the stream's head.
        """

    def read_state(self, room_id: str) -> list[tuple[str, dict[str, Any], bool]]:
        """The room's current state: (event ID, PDU, stored redacted), by (type, state_key)."""

    def read_event(self, room_id: str, event_id: str) -> tuple[dict[str, Any], bool] | None:
        """One stored event of the room: (PDU, stored redacted), or ``None``."""

    def device_is_peeking(self, user_id: str, device_id: str, room_id: str) -> bool:
        """Whether the device's peek of the room is ``active``."""


class SyncReads(Protocol):
    """What ``/sync`` and the live window read."""

    def stream_changes(self, after: int | None) -> tuple[list[StreamChange], int]:
        """The stream rows after position ``after``, oldest first, each with what the live
        window needs (PDU, EDU content, which device peek), and the newest position. With
        ``after=None``: no rows, just the newest position (where a live window starts)."""

    def sync_snapshot(
        self,
        user_id: str,
        device_id: str,
        since: int | None,
        full_state: bool,
        limit: int,
    ) -> SyncSnapshot:
        """Everything one /sync needs, in one read (the fields are documented on
        :class:`~peekproxy.core.sync.SyncSnapshot`): the device's peeks, the newest position,
        the rooms with an active peek, whether anything changed since ``since`` and, if so, a
        :class:`~peekproxy.core.sync.RoomView` of each room to show. Which rooms, and how, is
        decided by :mod:`peekproxy.core.sync_rules` (an implementation calls its functions)."""


@runtime_checkable
class ReadTransaction(
    SubscriptionReads,
    LeaseReads,
    RoomEventReads,
    DevicePeekReads,
    EphemeralReads,
    TxnReads,
    ServerKeyReads,
    HistoryQueries,
    SyncReads,
    FrontPositionReads,
    Protocol,
):
    """The named read operations, all inside one transaction: every operation of one
    ``Storage.read`` call sees the same commit. Operations are synchronous (they run in
    the storage's worker thread); they raise only on a storage fault."""
