"""Room history fetched from the target's ``GET /_matrix/federation/v1/backfill``.

Two users (the design is in :mod:`peekproxy.core.paging` and ``docs/peeking.md``):

* a new peek (and a re-peek after an idle drop or a lapse) fetches up to
  :data:`FIRST_VIEW_LIMIT` events before the snapshot's ``latest_event`` and puts them on the
  room stream before it, so that the first ``/sync`` shows the newest events as a join would;
* ``/messages`` fills a gap of the stream (or what precedes its first event) one round at a
  time, storing what it fetched keyed to that gap (:func:`fill_gap`).

Every PDU is verified like a ``/send`` PDU (:func:`peekproxy.core.pdu.check_pdu`, the
signers' keys through the keyring): a rejected PDU is dropped, a content-hash mismatch is
kept redacted; then the auth rules judge each by its own auth events (receipt step 4,
:class:`peekproxy.services.event_auth.EventAuth`): what they reject is stored as rejected and
never shown. Requests are bounded by a timeout; a failure is a :class:`BackfillFailed`
that says whether trying again later may help.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from peekproxy.core.events import event_refs, in_room
from peekproxy.core.pdu import check_pdu
from peekproxy.core.room_versions import UnknownRoomVersion, room_version
from peekproxy.federation.client import FederationClient, FederationError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.services.event_auth import EventAuth
from peekproxy.services.following import Fetched
from peekproxy.store import Storage, WriteTransaction

__all__ = [
    "BACKFILL_TIMEOUT_S",
    "FIRST_VIEW_LIMIT",
    "FIRST_VIEW_TIMEOUT_S",
    "MAX_BACKFILL_LIMIT",
    "BackfillFailed",
    "Backfilled",
    "fetch_backfill",
    "fill_gap",
    "first_view",
    "new_history",
]

log = logging.getLogger("peekproxy.history")

#: Events fetched before ``latest_event`` for the first view of a peeked room: enough for a
#: timeline limit of up to 50 (clients ask 10-50; the delegation API's default is 10).
FIRST_VIEW_LIMIT = 50
#: How long a new peek waits for that fetch; a failure or timeout does not fail the peek.
FIRST_VIEW_TIMEOUT_S = 5.0
#: How long a ``/messages`` request waits for one ``/backfill`` round.
BACKFILL_TIMEOUT_S = 10.0
#: The most events one ``/backfill`` request asks for.
MAX_BACKFILL_LIMIT = 100


class BackfillFailed(Exception):
    """A ``/backfill`` request gave nothing usable. ``retryable``: the server could not be
    asked (network, timeout, 5xx, 429); otherwise it refused or answered unusably."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Backfilled:
    """One verified PDU from ``/backfill``: stored redacted when ``redacted``."""

    event_id: str
    pdu: dict[str, Any]
    redacted: bool
    depth: int

    @property
    def prev_events(self) -> list[str]:
        return event_refs(self.pdu.get("prev_events"))


async def fetch_backfill(
    client: FederationClient,
    keyring: Keyring,
    *,
    server: str,
    room_id: str,
    version: str,
    anchors: Sequence[str],
    limit: int,
    timeout: float,
) -> list[Backfilled]:
    """``GET /backfill/{roomId}?v=<anchors>&limit=<limit>`` at ``server``: the verified PDUs
    of the room (the anchors themselves included, as ``/backfill`` answers), newest first
    (``depth`` descending, then the answer's order).

    Raises:
        BackfillFailed: the request failed (network, timeout, an error status, not JSON),
            the room version is unknown, or PDUs other than the anchors came back and none
            passed the checks.
    """
    try:
        rules = room_version(version)
    except UnknownRoomVersion:
        raise BackfillFailed(f"unknown room version {version!r}", retryable=False) from None
    try:
        answer = await client.get_json(
            server,
            f"/_matrix/federation/v1/backfill/{path_segment(room_id)}",
            query={"v": list(anchors), "limit": str(max(1, min(limit, MAX_BACKFILL_LIMIT)))},
            timeout=timeout,
        )
    except FederationError as e:
        log.info("backfill of %s from %s failed: %s", room_id, server, e)
        raise BackfillFailed(str(e), retryable=e.retryable) from None
    except ValueError as e:
        raise BackfillFailed(f"{server}: not JSON: {e}", retryable=False) from None
    pdus = answer.get("pdus") if isinstance(answer, dict) else None
    if not isinstance(pdus, list):
        raise BackfillFailed(f"{server}: the answer has no pdus list", retryable=False)
    pdus = [p for p in pdus if isinstance(p, dict)]
    for problem in await keyring.fetch_signer_keys(pdus, rules):
        log.info("keys for backfilled PDUs: %s", problem)
    found: list[tuple[int, int, Backfilled]] = []
    seen: set[str] = set()
    rejected = 0
    for index, pdu in enumerate(pdus):
        verdict = check_pdu(pdu, rules, keyring.lookup)
        if verdict.outcome == "reject" or verdict.pdu is None or verdict.event_id is None:
            log.info("dropped a backfilled PDU of %s: %s", room_id, verdict.reason)
            rejected += 1
            continue
        if not in_room(verdict.pdu, room_id, rules) or verdict.event_id in seen:
            rejected += 1
            continue
        seen.add(verdict.event_id)
        depth = verdict.pdu.get("depth")
        event = Backfilled(
            verdict.event_id,
            verdict.pdu,  # the redacted copy when the content hash did not match
            verdict.outcome == "redact",
            depth if type(depth) is int else 0,
        )
        found.append((-event.depth, index, event))
    if rejected and not (seen - set(anchors)):  # not "nothing older exists"
        raise BackfillFailed(f"{server}: no backfilled PDU passed the checks", retryable=False)
    found.sort(key=lambda item: item[:2])
    return [event for _, _, event in found]


def new_history(
    fetched: Sequence[Backfilled], *, anchors: Collection[str], held: Collection[str]
) -> tuple[list[Backfilled], bool]:
    """What a ``/backfill`` answer adds before ``anchors``: the events not ``held`` yet,
    newest first, and whether the history before the anchors is now complete.

    Complete ("reached") means the answer met an event already held (the history before the
    gap), or the room's first event (no ``prev_events``: ``m.room.create``), or held nothing
    older than the anchors at all. Events at or below the depth of a held event it met are
    left out: they belong before it, to history already held (or to another gap).
    """
    anchor_set = set(anchors)
    held_set = set(held)
    older = [e for e in fetched if e.event_id not in anchor_set]
    met = [e.depth for e in older if e.event_id in held_set]
    floor = max(met) if met else None
    new = [e for e in older if e.event_id not in held_set and (floor is None or e.depth > floor)]
    reached = floor is not None or not older or any(not e.prev_events for e in new)
    return new, reached


async def fill_gap(
    store: Storage,
    client: FederationClient,
    keyring: Keyring,
    auth: EventAuth,
    *,
    server: str,
    room_id: str,
    version: str,
    gap_pos: int,
    anchor: str,
    room_left: int,
) -> bool:
    """One backfill round for the gap at ``gap_pos`` (0: before the room's first stream
    event): fetch what precedes ``anchor`` (its oldest fetched event, else the first stream
    event after the gap), store it keyed to the gap in DAG order, and close the gap once the
    answer reached held history. What the auth rules do not allow (receipt step 4, judged by
    ``auth``) is stored as such, never shown. Returns whether anything changed (events
    stored or the gap closed); ``False`` when the server answered but had nothing new to give.

    Raises:
        BackfillFailed: the server could not be asked, or refused.
    """
    fetched = await fetch_backfill(
        client,
        keyring,
        server=server,
        room_id=room_id,
        version=version,
        anchors=[anchor],
        limit=room_left + 1,  # /backfill includes the anchor itself
        timeout=BACKFILL_TIMEOUT_S,
    )
    ids = [e.event_id for e in fetched]
    held = await store.read(lambda tx: tx.held_event_ids(room_id, ids))
    new, reached = new_history(fetched, anchors=[anchor], held=held)
    if not new and not reached:
        return False
    judged = await auth.judge(
        room_id,
        room_version(version),
        [(e.event_id, e.pdu, e.redacted) for e in new],
        server=server,
        live=False,
    )
    shown = {event_id for event_id, _, _ in judged.shown}

    def write(tx: WriteTransaction) -> None:
        judged.store(tx, room_id)
        tx.add_gap_fill(
            room_id,
            gap_pos,
            [(e.event_id, e.pdu, e.redacted) for e in new if e.event_id in shown],
            closed=reached,
        )

    await store.write(write)
    log.info(
        "backfilled %d events of %s into the gap at %d%s",
        len(new),
        room_id,
        gap_pos,
        " (closed)" if reached else "",
    )
    return True


async def first_view(
    store: Storage,
    client: FederationClient,
    keyring: Keyring,
    room_id: str,
    server: str,
    latest: str,
    version: str,
) -> tuple[list[Fetched], bool] | None:
    """Up to :data:`FIRST_VIEW_LIMIT` events before ``latest`` (the snapshot's latest event;
    room version ``version``) from
    ``server``'s ``/backfill`` (bounded by :data:`FIRST_VIEW_TIMEOUT_S`, its signers' keys
    included), oldest first, without those a client already sees, and whether nothing is
    missing before them (a new MSC2444 peek or observer join: the first view). ``None``
    when the latest event is already held (nothing to add); a failed fetch gives
    ``([], False)`` (a gap). The auth rules judge these events when the snapshot is stored
    (:class:`peekproxy.services.subscriptions.Subscriptions`), the snapshot's events at
    hand."""
    if await store.read(lambda tx: tx.held_event_ids(room_id, [latest])):
        return None
    fetched: list[Backfilled] | None = None
    # One deadline for the whole fetch, its signers' keys included: the room's lock is
    # held meanwhile, and /send of the room waits for it (Subscriptions.wait_for_setups).
    with trio.move_on_after(FIRST_VIEW_TIMEOUT_S):
        try:
            fetched = await fetch_backfill(
                client,
                keyring,
                server=server,
                room_id=room_id,
                version=version,
                anchors=[latest],
                limit=FIRST_VIEW_LIMIT + 1,  # /backfill includes the anchor
                timeout=FIRST_VIEW_TIMEOUT_S,
            )
        except BackfillFailed as e:
            log.info("no history before the latest event of %s (%s): a gap", room_id, e)
            return [], False
    if fetched is None:
        log.info("no history before the latest event of %s (timed out): a gap", room_id)
        return [], False
    ids = [e.event_id for e in fetched]
    held = await store.read(lambda tx: tx.held_event_ids(room_id, ids))
    new, complete = new_history(fetched, anchors=[latest], held=held)
    return [(e.event_id, e.pdu, e.redacted) for e in reversed(new)], complete
