"""The write operations of a transaction (:class:`WriteTransaction`), grouped by concern.

Units and shapes as in :mod:`peekproxy.store.reads`. Composite writes (a ``/send``
transaction's events, EDUs and record) are functions a service writes over a
``WriteTransaction``; they commit together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from peekproxy.core.subscription import Subscription
from peekproxy.store.reads import ReadTransaction, ServerKeyRow

__all__ = [
    "DevicePeekWrites",
    "EphemeralWrites",
    "FrontPositionWrites",
    "LeaseWrites",
    "RoomEventWrites",
    "ServerKeyWrites",
    "SubscriptionWrites",
    "TxnWrites",
    "WriteTransaction",
]


class SubscriptionWrites(Protocol):
    """Remote subscriptions."""

    def save_subscription(self, sub: Subscription) -> None:
        """Store ``sub`` (insert or replace the room's subscription; ``*_ms`` fields as ms)."""


class LeaseWrites(Protocol):
    """The subscription leases and devices' last syncs (see
    :class:`~peekproxy.store.reads.LeaseReads`; times in ms). Each is one atomic statement:
    concurrent instances never both own a room."""

    def take_lease(self, room_id: str, owner: str, now_ms: int, expires_ms: int) -> bool:
        """Own ``room_id`` as ``owner`` until ``expires_ms`` if nobody holds its lease,
        ``owner`` does (renewed), or it expired by ``now_ms``
        (:func:`peekproxy.core.cluster.may_take`). Returns whether ``owner`` now holds it."""

    def renew_leases(self, owner: str, expires_ms: int) -> list[str]:
        """Extend every lease ``owner`` holds to ``expires_ms``; returns those rooms, sorted
        (a room taken over by another instance is not among them)."""

    def release_lease(self, room_id: str, owner: str) -> None:
        """Give the room's lease up, if ``owner`` holds it."""

    def request_end(self, room_id: str, reason: str | None) -> bool:
        """Ask the room's owner to end its subscription (protocol.md decision 10; ``None``:
        clear the request). Returns ``False`` when no instance holds a lease of the room."""

    def record_sync(self, user_id: str, device_id: str, now_ms: int) -> None:
        """Store the device's last sync (never moves it back)."""

    def record_unsynced_devices(self, now_ms: int) -> int:
        """Store ``now_ms`` as the last sync of each device with an active peek and no stored
        sync (its idle clock starts now); returns how many."""


class RoomEventWrites(Protocol):
    """Room events, the room stream, current state, gaps and gap fills. Each stream row
    written gets a new position, above every position committed before. The decisions these
    writes make are pure functions of :mod:`peekproxy.core.stream_rules`: an implementation
    reads their inputs, calls them and writes what they decide."""

    def store_snapshot(
        self,
        room_id: str,
        *,
        events: Mapping[str, Mapping[str, Any]],
        redacted: Iterable[str],
        state: Mapping[tuple[str, str], str],
        latest_event_id: str,
        gap: bool,
        now_ms: int,
        history: Sequence[tuple[str, Mapping[str, Any], bool]] | None = None,
        history_complete: bool = False,
    ) -> int:
        """Store a peek response: its events, the room's state (replaced), and on the room's
        stream the latest event, after ``history`` and a gap marker when history is missing.
        Returns the last stream position written.

        ``history``: (event ID, PDU, stored redacted) of events fetched before the latest event,
        oldest first (DAG order); they go on the stream before it (those already there are
        skipped) but never into the current state: the snapshot's state is the state at the
        latest event. ``history_complete``: nothing is missing before them (they reached history
        held on the stream, or the room's first event). A gap marker precedes them when history
        is missing, and always when ``gap`` (a re-peek, decision 4: syncs get ``limited``); a
        marker over complete history is closed at once, so ``/messages`` does not stop there.

        A snapshot older than what the stream already shows changes neither the stream nor the
        state (its events are stored): its latest event is held but no longer the newest (a
        ``/send`` brought newer events while the snapshot was on its way), or it is new but
        deeper in the DAG than the newest event shown. Appending it would put it after its
        descendants, and its state would roll back theirs.

        The rules: :func:`~peekproxy.core.stream_rules.snapshot_step`,
        :func:`~peekproxy.core.stream_rules.snapshot_gap`,
        :func:`~peekproxy.core.stream_rules.not_yet_held`.
        """

    def add_gap_fill(
        self,
        room_id: str,
        gap_pos: int,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        closed: bool,
    ) -> int:
        """Keep backfilled events for the gap at stream position ``gap_pos`` (0: before the
        room's first stream event): (event ID, PDU, stored redacted), **newest first**, all
        older than what the gap holds already. Events a client can already see are skipped
        (:func:`~peekproxy.core.stream_rules.not_yet_held`).
        ``closed``: the history before the gap is now complete. Neither the stream nor the
        current state changes. Returns how many events were added."""

    def replace_state(self, room_id: str, state: Mapping[tuple[str, str], str]) -> None:
        """Make ``state`` ((type, state_key) → event ID) the room's whole current state
        (a snapshot's, or a renewal reply's). An event stored as rejected stays out of it
        (rejected is final); one stored as soft-failed is taken in and shown from then on,
        since the room's server resolved it into the room's state."""

    def append_event(
        self,
        room_id: str,
        event_id: str,
        pdu: Mapping[str, Any],
        *,
        redacted: bool,
        now_ms: int,
    ) -> int | None:
        """Append one event to the room's stream (once: ``None`` when it was already there).
        A state event becomes the room's current state for its (type, state_key).

        An event that arrives late, below the room's
        :meth:`~peekproxy.store.reads.RoomEventReads.history_floor` (its ``depth`` is lower
        than the event after the newest gap), is stored but not appended (``None``): it
        belongs to the history that gap stands for, and appending it would put it after its
        descendants (:func:`~peekproxy.core.stream_rules.older_than_newest`,
        :func:`~peekproxy.core.stream_rules.joins_stream_when_late`)."""

    def store_unshown(
        self,
        room_id: str,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        status: str,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        """Store (event ID, PDU, redacted) ``events`` of one room without showing them: on no
        stream, in no state (receipt checks 4-6, :mod:`peekproxy.core.receipt`).
        ``status``: ``"accepted"`` (an auth event fetched for others: like a snapshot's auth
        chain), ``"soft_failed"`` (stored, never shown) or ``"rejected"`` (never shown nor used
        as an auth event; kept so it is neither fetched again nor taken as missing history).
        ``reasons``: event ID → why (kept for admins). An event already stored keeps its row and
        status."""

    def add_gap(self, room_id: str, now_ms: int) -> int:
        """Mark that history is missing at this point of the room's stream."""

    def append_in_dag_order(
        self,
        room_id: str,
        events: Sequence[tuple[str, Mapping[str, Any], bool]],
        *,
        now_ms: int,
    ) -> tuple[list[str], bool]:
        """Append (event ID, PDU, redacted) ``events`` of one room in DAG order: each after
        its ``prev_events`` (ties by ``depth``, then as given), each once. An event with a
        ``prev_events`` entry that is neither stored nor among ``events`` gets a gap marker
        before it, unless it is a late event that stays off the stream (no gap row after its
        own descendants). Returns the IDs appended to the stream (see :meth:`append_event` for the
        ones that are only stored) and whether a gap was marked."""


class DevicePeekWrites(Protocol):
    """Device peeks; each change is a stream row (it wakes the device's syncs)."""

    def set_device_peek(
        self, user_id: str, device_id: str, room_id: str, state: str, now_ms: int
    ) -> int:
        """Record a device peek's state (``active``, ``dormant``, ``ended``, or ``joined``:
        the user joined the room on the homeserver, and the peek is never shown again);
        returns the stream position of the change."""

    def end_room_peeks(self, room_id: str, now_ms: int) -> int:
        """End every active or dormant device peek of a room; returns how many."""


class FrontPositionWrites(Protocol):
    """The sync front's token positions (see
    :class:`~peekproxy.store.reads.FrontPositionReads`)."""

    def save_front_position(
        self, user_id: str, device_id: str, token_hash: str, position: int, now_ms: int
    ) -> None:
        """Save (or move) the device's token → peek stream position; the device's newest 20
        are kept, the older ones dropped. ``now_ms``: ms since the epoch."""


class EphemeralWrites(Protocol):
    """Ephemeral events; each row written is a stream row."""

    def save_ephemeral(
        self, room_id: str, edu_type: str, content: Mapping[str, Any], now_ms: int
    ) -> list[tuple[str, int, bool]]:
        """Store an ``m.typing`` or ``m.receipt`` EDU's content for one room, one row per user
        (and receipt type), each with its own stream position; a user's row replaces their
        previous one of the same key.

        ``content``: ``m.typing`` ``{"user_id": ..., "typing": bool}`` (the EDU's content);
        ``m.receipt`` ``{receipt_type: {user_id: {"event_ids": [...], "data": {...}}}}`` (the
        EDU's content for this room). Returns (user ID, stream position, typing) per row
        written, in order.
        """

    def stop_typing(self, room_id: str, user_id: str, position: int, now_ms: int) -> bool:
        """Store that ``user_id`` stopped typing in the room (the typing timeout ran out), if
        their latest ``m.typing`` row is still the typing one at stream position ``position``.
        Returns whether a row was written."""


class TxnWrites(Protocol):
    """Inbound ``/send`` transaction records."""

    def save_txn(self, origin: str, txn_id: str, response: Mapping[str, Any], now_ms: int) -> None:
        """Record the answer to ``origin``'s ``/send`` transaction ``txn_id`` (received at
        ``now_ms``, ms), so a retry gets it again: see :meth:`ReadTransaction.txn_response`."""


class ServerKeyWrites(Protocol):
    """Other servers' signing keys."""

    def save_server_keys(self, keys: Iterable[ServerKeyRow]) -> None:
        """Insert or replace each key (by server name and key ID)."""


@runtime_checkable
class WriteTransaction(
    ReadTransaction,
    SubscriptionWrites,
    LeaseWrites,
    RoomEventWrites,
    DevicePeekWrites,
    EphemeralWrites,
    TxnWrites,
    ServerKeyWrites,
    FrontPositionWrites,
    Protocol,
):
    """The named operations of one write transaction: every read operation, plus the
    writes. All of one ``Storage.write`` call commit together or not at all; reads inside
    it see its own writes."""
