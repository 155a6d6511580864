"""Checks on receipt of a PDU, steps 4-6, over a batch of one room's events (SSAPI §Checks
performed on receipt of a PDU).

Pure: the I/O shell (:mod:`peekproxy.services.event_auth`) gathers what the batch cites
(stored events, fetched auth chains, the room's current state) and stores the outcome.

For every event of the batch, auth events first (each event after the batch's events it
cites in ``auth_events`` or ``prev_events``):

4. it must pass the authorization rules judged by its own ``auth_events``
   (:func:`~peekproxy.core.auth_rules.check_event_auth`); an auth event that is rejected, or
   that is itself rejected in this batch, rejects it too; one that is nowhere to be had makes
   it **unknown** (dropped, not recorded: a later delivery may bring its auth chain);
5. where peekproxy holds the state before it — the event's ``prev_events`` are exactly the
   room's newest event, whose state is the current state — it must pass the rules against
   that state, else it is **rejected**;
6. otherwise it must pass them against the room's current state, else it is **soft-failed**:
   stored (a valid event of the DAG, usable as an auth event) but never shown to clients,
   as Synapse does.

Events that pass become the room's newest event in order, and their state the current state
for the events after them (peekproxy does not resolve state across forks: the last event
appended wins, as on the room's stream). Steps 5 and 6 run only for ``live`` batches (a
``/send`` and what it fetched); history (backfill, a peek answer's auth chain) gets step 4.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from peekproxy.core.auth_rules import (
    StateKey,
    check_against_state,
    check_event_auth,
    create_event_id,
)
from peekproxy.core.dag import topological_order
from peekproxy.core.events import event_refs
from peekproxy.core.room_versions import RoomVersion

__all__ = ["Judgement", "cited_auth_ids", "judge_batch"]


@dataclass(slots=True)
class Judgement:
    """What :func:`judge_batch` decided, by event ID.

    * ``accepted``: shown to clients, in the order judged (auth events and parents first);
    * ``soft_failed``: reason per event stored but never shown (step 6);
    * ``rejected``: reason per event never shown nor used as an auth event (steps 4-5);
    * ``unknown``: reason per event dropped because an auth event could not be had.
    """

    accepted: list[str] = field(default_factory=list)
    soft_failed: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)


def cited_auth_ids(event: Mapping[str, Any], rules: RoomVersion) -> list[str]:
    """The IDs of the events ``event``'s auth rules are judged by: its ``auth_events`` and,
    in v12 (rooms/v12, MSC4291), the room's create event implied by its ``room_id``."""
    cited = event_refs(event.get("auth_events"))
    room_id = event.get("room_id")
    implied = rules.auth.create_event_implied and event.get("type") != "m.room.create"
    if implied and isinstance(room_id, str) and room_id.startswith("!"):
        cited.append(create_event_id(room_id))
    return cited


def _order(batch: Mapping[str, Mapping[str, Any]], rules: RoomVersion) -> list[str]:
    """The batch's IDs, each after the batch events it cites (auth and prev events); among
    events ready together, lower ``depth`` first, then as given."""
    return topological_order(
        batch, lambda pdu: [*cited_auth_ids(pdu, rules), *event_refs(pdu.get("prev_events"))]
    )


#: How many events :func:`_supersedes` walks at most.
SUPERSEDES_WALK_MAX = 200


def _supersedes(newer: str, older: str, usable: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether event ``older`` is in the auth chain of event ``newer``, walked through the
    events at hand (``usable``; at most :data:`SUPERSEDES_WALK_MAX`): then ``newer`` came
    after it. A member event cites the target's previous membership, a power-levels event
    the previous power levels, so state changes chain this way."""
    seen: set[str] = set()
    todo = [newer]
    while todo and len(seen) < SUPERSEDES_WALK_MAX:
        pdu = usable.get(todo.pop())
        for ref in event_refs(pdu.get("auth_events")) if pdu is not None else ():
            if ref == older:
                return True
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return False


def _view(
    current: Mapping[StateKey, tuple[str, Mapping[str, Any]]],
    cited: list[str],
    usable: Mapping[str, Mapping[str, Any]],
    soft_failed: Collection[str],
) -> dict[StateKey, Mapping[str, Any]]:
    """The state an event is judged by in steps 5 and 6: the room's current state, except
    where one of the event's own auth events comes after what that state holds for its
    (type, state_key) — the held event is in its auth chain — or the state holds nothing
    there. peekproxy resolves no state, and after a gap (events that could not be fetched)
    its state lags behind the room: a member who joined again in the gap would make every
    later event of theirs fail. A soft-failed auth event never counts, nor does one the
    held event does not lead to (a join from before a ban peekproxy holds, whatever its
    ``depth`` says), so a banned member stays banned."""
    view = {key: pdu for key, (_, pdu) in current.items()}
    for auth_id in cited:
        auth = usable[auth_id]
        kind, state_key = auth.get("type"), auth.get("state_key")
        if auth_id in soft_failed or not (isinstance(kind, str) and isinstance(state_key, str)):
            continue
        held = current.get((kind, state_key))
        if held is None or (held[0] != auth_id and _supersedes(auth_id, held[0], usable)):
            view[(kind, state_key)] = auth
    return view


def judge_batch(
    batch: Mapping[str, Mapping[str, Any]],
    rules: RoomVersion,
    *,
    stored: Mapping[str, Mapping[str, Any]],
    rejected: Collection[str] = (),
    soft_failed: Collection[str] = (),
    state: Mapping[StateKey, tuple[str, Mapping[str, Any]]] | None = None,
    head: Collection[str] = (),
) -> Judgement:
    """Run receipt steps 4-6 on ``batch`` (event ID → PDU, each past steps 1-3; the
    redacted copy where the content hash did not match).

    Args:
        batch: one room's events, in any order.
        rules: the room's version.
        stored: event ID → PDU of stored events (accepted or soft-failed) the batch may cite.
        rejected: IDs already known to be rejected.
        soft_failed: IDs of ``stored`` events that were soft-failed.
        state: the room's current state ((type, state_key) → (event ID, PDU)) for steps 5
            and 6; ``None`` runs step 4 only (history).
        head: the IDs of the room's newest events, after which ``state`` holds.

    Returns:
        The :class:`Judgement`; every ID of ``batch`` is in exactly one of its parts.
    """
    judgement = Judgement()
    usable: dict[str, Mapping[str, Any]] = dict(stored)
    refused: set[str] = set(rejected)
    soft: set[str] = set(soft_failed)
    current = dict(state) if state is not None else None
    newest = set(head)
    for event_id in _order(batch, rules):
        pdu = batch[event_id]
        cited = cited_auth_ids(pdu, rules)
        lacking = [a for a in cited if a not in usable and a not in refused]
        if lacking:
            judgement.unknown[event_id] = f"auth event {lacking[0]} is unknown"
            refused.add(event_id)
            continue
        reason = check_event_auth(event_id, pdu, usable, rules, rejected=refused)
        if reason is not None:
            judgement.rejected[event_id] = f"not allowed by its auth events: {reason}"
            refused.add(event_id)
            continue
        if current is not None:
            view = _view(current, cited, usable, soft)
            reason = check_against_state(event_id, pdu, view, rules)
            if reason is not None:
                if set(event_refs(pdu.get("prev_events"))) == newest:
                    judgement.rejected[event_id] = f"not allowed by the state before it: {reason}"
                    refused.add(event_id)
                else:
                    judgement.soft_failed[event_id] = (
                        f"not allowed by the room's current state: {reason}"
                    )
                    usable[event_id] = pdu
                    soft.add(event_id)
                continue
            newest = {event_id}
            state_key = pdu.get("state_key")
            if isinstance(state_key, str) and isinstance(pdu.get("type"), str):
                current[(pdu["type"], state_key)] = (event_id, pdu)
        usable[event_id] = pdu
        judgement.accepted.append(event_id)
    return judgement
