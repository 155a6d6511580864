"""Inbound ``PUT /_matrix/federation/v1/send/{txnId}`` (SSAPI §Transactions).

Every PDU of a followed room is checked (:func:`peekproxy.core.pdu.check_pdu`, its signers'
keys through the keyring), the ``prev_events`` we lack fetched from the origin
(``get_missing_events``), the whole batch put through the auth rules (receipt steps 4-6,
:mod:`peekproxy.services.event_auth`: rejected and soft-failed events are stored but never
shown), and what passed stored in DAG order, each room on its own (rooms in parallel);
``m.typing`` / ``m.receipt`` EDUs are stored per user, then the transaction's
answer (idempotency per origin and transaction ID). The transaction is answered once all of
it is stored. A state event that ends peeking (decision 10) ends the room's peeks.
The events of rooms followed through the fronted homeserver's client API take the same path
without the checks (:meth:`Ingest.append_trusted`).

Rooms joined as the observer (docs/observer-join.md) hear from every server in the room: PDUs
are taken from any origin (as for every followed room), but not from a server the room's
current ``m.room.server_acl`` denies (``"Server is banned from room"``), nor its EDUs; a kick
or ban of the observer, or an ACL that denies our own server, ends the room's peeks.

Typing expiry: a remote user stops typing :data:`TYPING_TIMEOUT_MS` after the last
``typing: true`` (a stored ``typing: false`` row, which wakes the room's syncs).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

import trio

from peekproxy.core.ephemeral import per_user_edus
from peekproxy.core.events import best_effort_event_id, event_refs
from peekproxy.core.metric_labels import pushed_pdu_outcomes
from peekproxy.core.nul import has_nul, pdu_nul_problem
from peekproxy.core.pdu import check_pdu
from peekproxy.core.peekability import (
    acl_denial_reason,
    ending_reason,
    observer_removed_reason,
)
from peekproxy.core.room_versions import room_version
from peekproxy.core.server_acl import server_allowed
from peekproxy.federation.client import FederationClient
from peekproxy.federation.keyring import Keyring
from peekproxy.logs import bind_log_fields
from peekproxy.metrics import SEND_PDUS, SEND_TRANSACTIONS
from peekproxy.outage import retry_store_errors
from peekproxy.services.errors import PeekError
from peekproxy.services.event_auth import EventAuth, Judged
from peekproxy.services.following import Fetched
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.notifier import Notifier
from peekproxy.services.settings import now_ms
from peekproxy.services.subscriptions import SETUP_WAIT_S, Subscriptions
from peekproxy.store import ReadTransaction, Storage, StoreError, WriteTransaction

__all__ = ["MAX_EDUS", "MAX_PDUS", "TYPING_TIMEOUT_MS", "Ingest"]

log = logging.getLogger("peekproxy.peeks")

MAX_PDUS, MAX_EDUS = 50, 100
#: A remote user stops typing this long after the last ``m.typing`` saying they type (the
#: EDU's ``timeout`` is not sent over federation). Synapse's receiving side uses the same
#: 60 s (``FEDERATION_TIMEOUT``) and its sending side repeats ``typing: true`` every 40 s.
TYPING_TIMEOUT_MS = 60_000


class Ingest:
    """``/send`` transactions from other servers, and typing expiry."""

    def __init__(
        self,
        *,
        store: Storage,
        client: FederationClient,
        keyring: Keyring,
        missing: MissingEvents,
        auth: EventAuth,
        subscriptions: Subscriptions,
        notifier: Notifier,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.client = client
        self.keyring = keyring
        self.missing = missing
        self.auth = auth
        self.subscriptions = subscriptions
        self.notifier = notifier
        self.clock_ms = clock_ms
        #: /send is serialized per (origin, txnId) (idempotency) and per room (append order).
        self._txn_locks: dict[tuple[str, str], trio.Lock] = {}
        self._ingest_locks: dict[str, trio.Lock] = {}
        #: (expires at ms, room, user, stream position) per ``typing: true`` row stored.
        self._typing_heap: list[tuple[int, str, str, int]] = []
        self._typing_changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End the typing left from before a restart, then expire typing until cancelled."""
        now = self.clock_ms()
        # Typing does not outlive a restart (its expiry timers are in memory): whoever was
        # typing has stopped; a remote that still types says so again within 40 s.
        await self.store.write(
            lambda tx: [tx.stop_typing(r, u, p, now) for r, u, p in tx.typing_now()]
        )
        task_status.started()
        await retry_store_errors(self.store.ping, "typing expiry", self._expire_typing)

    async def receive(self, origin: str, txn_id: str, body: Any) -> dict[str, Any]:
        """Handle ``PUT /_matrix/federation/v1/send/{txnId}`` from ``origin`` (verified).

        Idempotent per (origin, txn_id): a replay gets the stored answer and stores nothing.
        Answers ``{"pdus": {event_id: {} | {"error": reason}}}`` once everything accepted
        is stored.

        A PDU whose indexed strings hold U+0000 (:func:`peekproxy.core.nul.pdu_nul_problem`)
        gets a per-PDU error and is stored nowhere; the rest of the transaction is stored.

        Raises:
            PeekError: 400 for a malformed transaction (not an object, > 50 PDUs, > 100 EDUs,
                U+0000 in ``txn_id``).
        """
        if has_nul(txn_id):
            SEND_TRANSACTIONS.labels("malformed").inc()
            raise PeekError(400, "M_INVALID_PARAM", "the transaction ID contains U+0000")
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("pdus", []), list)
            or not isinstance(body.get("edus", []), list)
        ):
            SEND_TRANSACTIONS.labels("malformed").inc()
            raise PeekError(400, "M_BAD_JSON", "a transaction needs pdus (and edus) lists")
        pdus, edus = body.get("pdus", []), body.get("edus", [])
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            SEND_TRANSACTIONS.labels("malformed").inc()
            raise PeekError(
                400,
                "M_BAD_JSON",
                f"a transaction may hold at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs",
            )
        self.client.heard_from(origin)  # it is up: fetching what its events lack may go on
        log.debug("transaction %s: %d PDUs, %d EDUs", txn_id, len(pdus), len(edus))
        key = (origin, txn_id)
        lock = self._txn_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                stored = await self.store.read(lambda tx: tx.txn_response(origin, txn_id))
                if stored is not None:
                    SEND_TRANSACTIONS.labels("duplicate").inc()
                    return stored
                answer = await self._ingest_locked(origin, txn_id, pdus, edus)
                SEND_TRANSACTIONS.labels("accepted").inc()
                return answer
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._txn_locks.pop(key, None)

    async def _ingest_locked(
        self, origin: str, txn_id: str, pdus: list[Any], edus: list[Any]
    ) -> dict[str, Any]:
        results: dict[str, dict[str, str]] = {}
        by_room: dict[str, list[dict[str, Any]]] = {}
        # First: a PDU with U+0000 in a string the store looks up (room ID, references...)
        # is refused before any query (PostgreSQL's TEXT cannot hold it; SQLite alike).
        kept = []
        for pdu in pdus:
            problem = pdu_nul_problem(pdu)
            if problem is None:
                kept.append(pdu)
                continue
            event_id = best_effort_event_id(pdu)
            if event_id is not None:
                results[event_id] = {"error": problem}
            log.info("rejected PDU %r from %s: %s", event_id, origin, problem)
            SEND_PDUS.labels("invalid").inc()
        pdus = kept
        # Wait for the peeks being set up of these PDUs' rooms (their targets push events as
        # soon as they answered the PUT).
        pdu_rooms = {
            p["room_id"] for p in pdus if isinstance(p, dict) and isinstance(p.get("room_id"), str)
        }
        await self.subscriptions.wait_for_setups(pdu_rooms)
        # Several instances: rooms another one follows are looked up in the store.
        await self.subscriptions.refresh(
            sorted(pdu_rooms | {room_id for edu in edus for room_id, *_ in per_user_edus(edu)})
        )
        for pdu in pdus:
            room_id = pdu.get("room_id") if isinstance(pdu, dict) else None
            sub = self.subscriptions.get(room_id) if isinstance(room_id, str) else None
            if sub is None or not sub.accepts_events:
                event_id = best_effort_event_id(pdu)
                if event_id is not None:
                    results[event_id] = {"error": "this server is not peeking that room"}
                SEND_PDUS.labels("not_peeked").inc()
                continue
            assert isinstance(room_id, str)
            by_room.setdefault(room_id, []).append(pdu)

        unpeekable: dict[str, str] = {}
        # The caller holds this transaction's wake-ups until its answer is sent (see
        # Notifier.holding); a room stored while others of the transaction are still
        # pending (waiting for get_missing_events, say) is shown at once.
        pending = len(by_room)

        async def one_room(room_id: str, room_pdus: list[dict[str, Any]]) -> None:
            nonlocal pending
            bind_log_fields(room_id=room_id)  # this room's own task
            # Rooms are independent: one waiting for get_missing_events holds up no other.
            lock = self._ingest_locks.setdefault(room_id, trio.Lock())
            async with lock:
                changed = await self._ingest_room(origin, room_id, room_pdus, results, unpeekable)
            pending -= 1
            if changed and pending:
                self.notifier.notify_room(room_id, now=True)

        async with trio.open_nursery() as nursery:
            for room_id, room_pdus in by_room.items():
                nursery.start_soon(one_room, room_id, room_pdus)
        ephemeral = self._accepted_ephemeral(origin, edus)
        response = {"pdus": results}
        now = self.clock_ms()

        observed_rooms = {
            room_id for room_id, *_ in ephemeral if self.subscriptions.observed(room_id)
        }

        def write(tx: WriteTransaction) -> tuple[set[str], list[tuple[str, str, int]]]:
            edu_rooms: set[str] = set()
            typing: list[tuple[str, str, int]] = []
            for room_id, edu_type, user_id, content, relayed in ephemeral:
                # A relayed EDU counts only for a user joined to the room, as the state
                # stands after this transaction's PDUs.
                if relayed and tx.membership(room_id, user_id) != "join":
                    log.debug("ignored %s of %s relayed by %s", edu_type, user_id, origin)
                    continue
                if room_id in observed_rooms and not server_allowed(
                    tx.state_content(room_id, "m.room.server_acl"), origin
                ):
                    continue  # an observed room's ACL denies the sender's server
                for _, position, is_typing in tx.save_ephemeral(room_id, edu_type, content, now):
                    edu_rooms.add(room_id)
                    if is_typing:
                        typing.append((room_id, user_id, position))
            tx.save_txn(origin, txn_id, response, now)
            return edu_rooms, typing

        edu_rooms, typing = await self.store.write(write)
        self._typing_started(typing, now)
        for room_id in edu_rooms:
            self.notifier.notify_room(room_id)
        for room_id, reason in unpeekable.items():
            await self.subscriptions.end_peeking(room_id, reason)
        return response

    def _accepted_ephemeral(
        self, origin: str, edus: list[Any]
    ) -> list[tuple[str, str, str, dict[str, Any], bool]]:
        """The per-user ``m.typing`` / ``m.receipt`` contents of a transaction's EDUs that
        peekproxy keeps: (room ID, EDU type, user ID, content, relayed).

        A server speaks for its own users; the room's current peek target (the server its
        subscription peeks through) also relays EDUs of other servers' users, as it relays
        their events (MSC2444: the target sends what it sees "as if it were joined") —
        ``relayed`` ones count only for users joined to the room (checked when stored).
        Everything else is ignored: rooms not peeked, other servers' users from a server
        that is not the target, malformed EDUs, other EDU types.
        """
        kept = []
        for edu in edus:
            for room_id, edu_type, user_id, content in per_user_edus(edu):
                sub = self.subscriptions.get(room_id)
                if sub is None or not sub.accepts_events:
                    continue
                if user_id.partition(":")[2] == origin:
                    kept.append((room_id, edu_type, user_id, content, False))
                elif origin == sub.server:
                    kept.append((room_id, edu_type, user_id, content, True))
        return kept

    def _typing_started(self, typing: list[tuple[str, str, int]], now_ms: int) -> None:
        """Each (room, user, stream position) of a stored ``typing: true`` ends after
        ``TYPING_TIMEOUT_MS`` unless a newer ``m.typing`` of the user replaced it."""
        if not typing:
            return
        for room_id, user_id, position in typing:
            heapq.heappush(
                self._typing_heap, (now_ms + TYPING_TIMEOUT_MS, room_id, user_id, position)
            )
        self._typing_changed.set()
        self._typing_changed = trio.Event()

    async def _expire_typing(self) -> None:
        """Store ``typing: false`` for each user whose typing timed out (their ``m.typing``
        row was not replaced since), so that syncs show them stopping."""
        heap = self._typing_heap
        while True:
            now = self.clock_ms()
            due = []
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap))
            if due:

                def expire(
                    tx: WriteTransaction, due: list[tuple[int, str, str, int]] = due, now: int = now
                ) -> set[str]:
                    return {r for _, r, u, p in due if tx.stop_typing(r, u, p, now)}

                try:
                    expired = await self.store.write(expire)
                except StoreError:
                    for item in due:  # not expired yet: again once the store answers
                        heapq.heappush(heap, item)
                    raise
                for room_id in expired:
                    self.notifier.notify_room(room_id)
                continue
            changed = self._typing_changed
            if not heap:
                await changed.wait()
            else:
                with trio.move_on_after(max(0.0, (heap[0][0] - now) / 1000)):
                    await changed.wait()

    async def _ingest_room(
        self,
        origin: str,
        room_id: str,
        room_pdus: list[dict[str, Any]],
        results: dict[str, dict[str, str]],
        unpeekable: dict[str, str],
    ) -> bool:
        """Check one room's PDUs of a transaction, fetch the ``prev_events`` we lack from
        ``origin``, and store them in DAG order (a gap before what could not be fetched).
        Returns whether anything was stored (the caller wakes the room's syncs)."""
        sub = self.subscriptions.get(room_id)
        assert sub is not None and sub.room_version is not None
        rules = room_version(sub.room_version)
        observer = self.subscriptions.settings.observer
        observed = self.subscriptions.observed(room_id)
        refs = [ref for p in room_pdus for ref in event_refs(p.get("prev_events"))]
        pushed = {e for p in room_pdus if (e := best_effort_event_id(p)) is not None}

        def read(tx: ReadTransaction) -> tuple[set[str], dict[str, Any] | None]:
            acl = tx.state_content(room_id, "m.room.server_acl") if observed else None
            return tx.known_event_ids(event_ids=[*refs, *pushed]), acl

        known, acl = await self.store.read(read)
        held = known & pushed  # stored before: duplicates
        # An observed room hears from every server in it: the room's ACL is ours to apply.
        if observed and not server_allowed(acl, origin):
            for pdu in room_pdus:
                if (event_id := best_effort_event_id(pdu)) is not None:
                    results[event_id] = {"error": "Server is banned from room"}
            log.info(
                "dropped %d PDUs of %s from %s: denied by its server ACL",
                len(room_pdus),
                room_id,
                origin,
            )
            SEND_PDUS.labels("acl_denied").inc(len(room_pdus))
            return False
        await self.missing.signer_keys(room_pdus, sub.room_version)
        batch: list[tuple[str, dict[str, Any], bool]] = []
        for pdu in room_pdus:
            verdict = check_pdu(pdu, rules, self.keyring.lookup)
            event_id = verdict.event_id
            if verdict.outcome == "reject" or verdict.pdu is None or event_id is None:
                if event_id is not None:
                    results[event_id] = {"error": verdict.reason}
                log.info("rejected PDU %s from %s: %s", event_id, origin, verdict.reason)
                SEND_PDUS.labels("invalid").inc()
                continue
            batch.append((event_id, verdict.pdu, verdict.outcome == "redact"))
            known.add(event_id)
            results[event_id] = {}
        lacking = [
            event_id
            for event_id, pdu, _ in batch
            if any(p not in known for p in event_refs(pdu.get("prev_events")))
        ]
        fetched = []
        if lacking:
            fetched = await self.missing.fetch(origin, room_id, lacking, rules, known=known)
        judged = await self.auth.judge(room_id, rules, [*fetched, *batch], server=origin, live=True)
        for event_id in judged.rejected_or_dropped():
            if event_id in results:
                results[event_id] = {"error": judged.reasons[event_id]}
        unshown = {status: {e for e, _, _ in events} for status, events in judged.unshown.items()}
        for outcome, count in pushed_pdu_outcomes(
            (e for e, _, _ in batch), held=held, unshown=unshown, dropped=judged.dropped
        ).items():
            SEND_PDUS.labels(outcome).inc(count)
        # The events fetched before the pushed ones count too (a lost transaction's
        # history_visibility change comes back so); events not shown count for nothing.
        pdus = [pdu for _, pdu, _ in judged.shown]
        reason = ending_reason(pdus)
        if not reason and observer is not None and observed:
            reason = observer_removed_reason(pdus, observer.user_id) or acl_denial_reason(
                pdus, observer.server_name
            )
        if reason:
            unpeekable[room_id] = reason
        return await self._append(room_id, judged.shown, judged)

    async def _append(
        self, room_id: str, events: list[Fetched], judged: Judged | None = None
    ) -> bool:
        """Append a room's (event ID, PDU, redacted) ``events`` in DAG order (a gap before
        what lacks a ``prev_events`` entry), after storing the ``judged`` events that are not
        shown; whether there was anything to append."""
        now = self.clock_ms()

        def write(tx: WriteTransaction) -> None:
            if judged is not None:
                judged.store(tx, room_id)
            tx.append_in_dag_order(room_id, events, now_ms=now)

        await self.store.write(write)
        return bool(events)

    async def append_trusted(self, room_id: str, handle: str, events: list[Fetched]) -> bool:
        """Store events of ``room_id`` that a trusted follower read (the homeserver
        peekproxy fronts, :mod:`peekproxy.services.client_api_follower`; no PDU checks) as a
        ``/send`` stores checked ones: in DAG order after the room's lock (a gap before what
        lacks a ``prev_events`` entry), the room's syncs woken, and its peeks ended when one
        of them ends peeking (protocol.md decision 10).

        Waits for the following of ``handle`` being set up: the room's lock is held until
        its snapshot is stored (even while the room's old following still takes events).
        Returns ``False``, storing nothing, when the room is not followed through ``handle``
        (the follower then stops)."""
        sub = self.subscriptions.get(room_id)
        if sub is None or sub.peek_id != handle:
            with trio.move_on_after(SETUP_WAIT_S):
                async with self.subscriptions.room_lock(room_id):
                    sub = self.subscriptions.get(room_id)
        if sub is None or not sub.accepts_events or sub.peek_id != handle:
            return False
        async with self._ingest_locks.setdefault(room_id, trio.Lock()):
            changed = await self._append(room_id, events)
        if changed:
            self.notifier.notify_room(room_id)
        reason = ending_reason(pdu for _, pdu, _ in events)
        if reason:
            await self.subscriptions.end_peeking(room_id, reason)
        return True

    async def end_trusted(self, room_id: str, handle: str, reason: str) -> None:
        """A trusted follower learnt that ``room_id`` is no longer peekable (``reason``)
        without an event saying so: its peeks end (decision 10), if the room is still
        followed through ``handle``."""
        sub = self.subscriptions.get(room_id)
        if sub is not None and sub.peek_id == handle:
            await self.subscriptions.end_peeking(room_id, reason)
