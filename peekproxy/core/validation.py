"""Validation of an MSC2444 peek response (the 200 answer to ``PUT /peek/{roomId}/{peekId}``).

Pure: no I/O. The keys arrive through a :class:`~peekproxy.core.pdu_signatures.KeyLookup` that
the caller fills beforehand (fetch the keys of
:func:`~peekproxy.core.pdu_signatures.required_signers` for each PDU of
:func:`peek_response_pdus`).

Shapes (protocol.md decision 1, §1.3, §1.4):

* **R3** (Dendrite, what peekproxy speaks): ``state`` (PDUs: the current state),
  ``auth_chain`` (PDUs), ``latest_event`` (a PDU), ``renewal_interval`` (ms;
  :data:`DEFAULT_RENEWAL_INTERVAL_MS` when absent or ``null``) and an optional
  ``room_version`` (``"1"`` when absent or empty, as Dendrite assumes);
* **R4** (parsed leniently): ``latest_event_state_ids`` (``{extremity event ID: [state
  event IDs]}``), ``common_state_ids`` (``[state event IDs]``), ``events`` (PDUs: all of
  those plus their auth events) and ``renewal_interval``. The latest event is the extremity
  with the greatest ``depth`` (the first listed among equals); the state is
  ``common_state_ids`` plus that extremity's list.

The response is checked "just as the one returned by the /send_join API" (MSC2444 R2-R4)
as far as a server without auth rules can: SSAPI §Checks performed on receipt of a PDU
steps 1-3 for every PDU (:func:`~peekproxy.core.pdu.check_pdu`), then the structure
(one ``m.room.create`` of the announced version for the right room, a well-formed state
map whose auth events the response covers). Authorization rules and state resolution are
not run: the remote is trusted to have computed the state correctly, but it cannot forge
events of other servers, or of itself without its key.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from peekproxy.core.events import redact, room_id_for_create
from peekproxy.core.pdu import PduVerdict, check_pdu
from peekproxy.core.pdu_signatures import KeyLookup
from peekproxy.core.receipt import judge_batch
from peekproxy.core.room_versions import RoomVersion, UnknownRoomVersion, room_version

__all__ = [
    "DEFAULT_RENEWAL_INTERVAL_MS",
    "InvalidPeekResponse",
    "RoomNotPeekable",
    "ValidatedPeek",
    "is_empty_renewal",
    "peek_response_pdus",
    "response_room_version",
    "validate_peek_response",
]

_CREATE = ("m.room.create", "")
_HISTORY_VISIBILITY = ("m.room.history_visibility", "")
_ENCRYPTION = ("m.room.encryption", "")
#: The ``renewal_interval`` (ms) assumed when a peek response has none (or ``null``): 10 min,
#: so peekproxy renews every 5 min (half of it, protocol.md decision 3). Every MSC2444
#: revision requires the field; a target that leaves it out has not said how long it keeps a
#: peek, so this is deliberately shorter than MSC2444's 1 h example: a renewal every 5 min
#: per room is cheap, while a peek lapsing unnoticed costs the devices a gap.
DEFAULT_RENEWAL_INTERVAL_MS = 600_000
#: Keys an R4 renewal reply (``POST .../renew``) may carry without carrying any state.
_RENEWAL_ONLY_KEYS = frozenset({"renewal_interval"})


class InvalidPeekResponse(Exception):
    """The peek response cannot be used; the message is the reason, on one line (control
    and other non-printable characters, e.g. from remote strings, are backslash-escaped)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            "".join(
                c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in reason
            )
        )


class RoomNotPeekable(InvalidPeekResponse):
    """The response is valid but shows a room that may not be peeked: its
    ``history_visibility`` is not ``world_readable``, or it is encrypted (protocol.md
    decision 6: the client gets ``403 M_FORBIDDEN``)."""


@dataclass(frozen=True)
class ValidatedPeek:
    """A peek response that passed :func:`validate_peek_response`.

    * ``events``: event ID → the PDU to store, for every PDU in the response (state, auth
      chain, latest event; R4: ``events``). It is the PDU as received (without
      ``unsigned``), or its redacted copy when the content hash did not match. The dicts
      may be shared with the response body.
    * ``state``: ``(type, state_key)`` → event ID: the room's current state.
    * ``latest_event_id``: the newest event (R3 ``latest_event``; R4 the deepest extremity).
    * ``auth_chain_ids``: R3: the IDs of ``auth_chain`` in the order given (repeats removed);
      R4: every event of ``events`` reachable from the state through ``auth_events`` (plus
      the v12 create event), in the order of ``events``.
    * ``renewal_interval_ms``: the remote's ``renewal_interval`` (ms, > 0, not clamped: see
      :func:`~peekproxy.core.outcomes.renewal_delay_ms`), or
      :data:`DEFAULT_RENEWAL_INTERVAL_MS` when the response has none.
    * ``redacted``: the IDs of events stored redacted (content hash mismatch).
    * ``rejected``: event ID → reason for the response's events that the auth rules reject
      judged by their own auth events (receipt step 4, :func:`peekproxy.core.receipt.judge_batch`):
      they are in none of the other fields (a rejected state event leaves its key out of
      ``state``), so they are never stored nor shown.
    """

    room_id: str
    room_version: str
    events: dict[str, dict[str, Any]]
    state: dict[tuple[str, str], str]
    latest_event_id: str
    auth_chain_ids: list[str]
    renewal_interval_ms: int
    redacted: frozenset[str]
    rejected: Mapping[str, str] = field(default_factory=dict)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _list(body: Mapping[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    return value if isinstance(value, list) else []


def _is_r4(body: Mapping[str, Any]) -> bool:
    return "state" not in body and "latest_event_state_ids" in body


def _r4_create_version(body: Mapping[str, Any]) -> str | None:
    """``content.room_version`` of the first ``m.room.create`` in an R4 ``events`` list."""
    for pdu in _list(body, "events"):
        if isinstance(pdu, Mapping) and pdu.get("type") == "m.room.create":
            content = pdu.get("content")
            version = content.get("room_version") if isinstance(content, Mapping) else None
            return version if isinstance(version, str) and version else None
    return None


def response_room_version(body: Mapping[str, Any]) -> str:
    """The response's ``room_version``; ``"1"`` when absent, ``null`` or empty (Dendrite's
    peeker does the same; the field is in no MSC text, protocol.md §1.3).

    R4 responses have no such field (§1.4): when an R4-shaped body (``latest_event_state_ids``
    and no ``state``) lacks it, the version is read from the ``m.room.create`` event in
    ``events`` (its ``content.room_version``; ``"1"`` if there is none). That event is not
    verified here; :func:`validate_peek_response` verifies it under the version found.

    Raises:
        InvalidPeekResponse: ``room_version`` is present but not a string.
    """
    version = body.get("room_version")
    if version is None or version == "":
        if _is_r4(body):
            return _r4_create_version(body) or "1"
        return "1"
    if not isinstance(version, str):
        raise InvalidPeekResponse(f"room_version must be a string, got {_short(version)}")
    return version


def is_empty_renewal(body: Any) -> bool:
    """True when ``body`` is a renewal reply that carries no state, so the local state must
    be kept (protocol.md decision 1; MSC2444 R2/R3: "PUT /peek simply returns {}").

    That is ``{}``, or an object whose only key is ``renewal_interval`` (the R4 ``/renew``
    reply). Anything else (``{"state": []}``, non-objects) is not.
    """
    return isinstance(body, Mapping) and set(body) <= _RENEWAL_ONLY_KEYS


def peek_response_pdus(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every PDU in a peek response of either shape, in order: ``state``, ``auth_chain``,
    ``latest_event``, ``events``. Entries that are not objects are skipped and PDUs listed
    twice are returned twice. Never raises (a non-object body gives ``[]``); for fetching the
    signing keys before :func:`validate_peek_response`.
    """
    if not isinstance(body, Mapping):
        return []
    found = [pdu for pdu in _list(body, "state") if isinstance(pdu, dict)]
    found += [pdu for pdu in _list(body, "auth_chain") if isinstance(pdu, dict)]
    latest = body.get("latest_event")
    if isinstance(latest, dict):
        found.append(latest)
    found += [pdu for pdu in _list(body, "events") if isinstance(pdu, dict)]
    return found


def _ref_ids(refs: object) -> Iterator[str]:
    """Event IDs of ``prev_events``/``auth_events``: strings (v3+) or ``[id, hashes]``
    pairs (v1/v2)."""
    if not isinstance(refs, list):
        return
    for ref in refs:
        if isinstance(ref, str):
            yield ref
        elif isinstance(ref, list) and ref and isinstance(ref[0], str):
            yield ref[0]


@dataclass
class _Checked:
    """The verified PDUs of a response, by event ID."""

    rules: RoomVersion
    room_id: str
    events: dict[str, dict[str, Any]]
    redacted: set[str]

    def add(self, label: str, pdu: Any, keys: KeyLookup) -> str:
        """Check one PDU and record it; returns its event ID.

        Raises:
            InvalidPeekResponse: check_pdu rejects it, it is in another room, or it
                contradicts another copy of the same event.
        """
        verdict = check_pdu(pdu, self.rules, keys)
        if verdict.outcome == "reject" or verdict.pdu is None or verdict.event_id is None:
            name = f"{label} ({verdict.event_id})" if verdict.event_id else label
            raise InvalidPeekResponse(f"{name} failed the PDU checks: {verdict.reason}")
        event_id = verdict.event_id
        self._check_room(label, event_id, verdict.pdu)
        self._store(label, event_id, verdict)
        return event_id

    def _check_room(self, label: str, event_id: str, pdu: dict[str, Any]) -> None:
        if pdu.get("type") == "m.room.create" and self.rules.format.room_id_is_create_event_hash:
            founded = room_id_for_create(pdu, self.rules)
            if founded != self.room_id:
                raise InvalidPeekResponse(
                    f"{label}: m.room.create {event_id} founds room {founded}, not {self.room_id}"
                )
            return
        if pdu.get("room_id") != self.room_id:
            what = "m.room.create " if pdu.get("type") == "m.room.create" else "event "
            raise InvalidPeekResponse(
                f"{label}: {what}{event_id} is in room {_short(pdu.get('room_id'))}, "
                f"not {self.room_id}"
            )

    def _store(self, label: str, event_id: str, verdict: PduVerdict) -> None:
        assert verdict.pdu is not None
        known = self.events.get(event_id)
        redacted = verdict.outcome == "redact"
        if known is None:
            self.events[event_id] = verdict.pdu
            if redacted:
                self.redacted.add(event_id)
            return
        if known == verdict.pdu:
            if not redacted:  # an intact copy equal to a redacted one: nothing was cut
                self.redacted.discard(event_id)
            return
        # Two copies of one event ID that differ. From v3 the ID is the hash of the redacted
        # form, so that form is equal and one copy must have failed the content hash: keep
        # the full one. In v1/v2 (ID from a field) they must still redact to the same event.
        was_redacted = event_id in self.redacted
        if redacted != was_redacted:
            full, partial = (known, verdict.pdu) if redacted else (verdict.pdu, known)
            if _redacted_equal(full, partial, self.rules):
                self.events[event_id] = full
                self.redacted.discard(event_id)
                return
        raise InvalidPeekResponse(f"{label}: two different events have the ID {event_id}")


def _redacted_equal(full: dict[str, Any], partial: dict[str, Any], rules: RoomVersion) -> bool:
    return redact(full, rules) == partial


def _renewal_interval(body: Mapping[str, Any]) -> int:
    interval = body.get("renewal_interval")
    if interval is None:  # absent or null: the remote did not say
        return DEFAULT_RENEWAL_INTERVAL_MS
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise InvalidPeekResponse(
            f"renewal_interval must be a positive integer (ms), got {_short(interval)}"
        )
    return interval


def _rules(body: Mapping[str, Any], supported_versions: Collection[str]) -> RoomVersion:
    identifier = response_room_version(body)
    try:
        rules = room_version(identifier)
    except UnknownRoomVersion:
        raise InvalidPeekResponse(f"unknown room version {_short(identifier)}") from None
    if identifier not in supported_versions:
        raise InvalidPeekResponse(f"room version {identifier} is not supported here")
    return rules


def _check_create_versions(pdus: list[Any], version: str) -> None:
    """Every ``m.room.create`` must be of the announced version (content without
    ``room_version`` means ``"1"``). Done before the PDU checks, whose failure under the
    wrong version's rules would hide the real problem."""
    for pdu in pdus:
        if not isinstance(pdu, Mapping) or pdu.get("type") != "m.room.create":
            continue
        content = pdu.get("content")
        if not isinstance(content, Mapping):
            continue  # check_pdu rejects it
        said = content.get("room_version", "1")
        if said != version:
            raise InvalidPeekResponse(
                f"the m.room.create event says room version {_short(said)} "
                f"but the response says {version}"
            )


def _add_state(
    state: dict[tuple[str, str], str], event_id: str, pdu: Mapping[str, Any], label: str
) -> None:
    state_key = pdu.get("state_key")
    if not isinstance(state_key, str):
        raise InvalidPeekResponse(
            f"{label} ({event_id}, {_short(pdu.get('type'))}) has no state_key: not a state event"
        )
    key = (str(pdu["type"]), state_key)
    other = state.get(key)
    if other is not None and other != event_id:
        raise InvalidPeekResponse(
            f"state has two events for ({key[0]}, {key[1]!r}): {other} and {event_id}"
        )
    state[key] = event_id


def _parse_r3(
    body: Mapping[str, Any], checked: _Checked, keys: KeyLookup
) -> tuple[dict[tuple[str, str], str], str, list[str]]:
    state_pdus = body.get("state")
    auth_pdus = body.get("auth_chain", [])
    latest = body.get("latest_event")
    if not isinstance(state_pdus, list):
        raise InvalidPeekResponse("state must be a list of PDUs")
    if not isinstance(auth_pdus, list):
        raise InvalidPeekResponse("auth_chain must be a list of PDUs")
    if not isinstance(latest, Mapping):
        raise InvalidPeekResponse("latest_event must be a PDU (an object)")
    _check_create_versions([*state_pdus, *auth_pdus, latest], checked.rules.identifier)
    state_ids = [checked.add(f"state[{i}]", pdu, keys) for i, pdu in enumerate(state_pdus)]
    auth_ids = [checked.add(f"auth_chain[{i}]", pdu, keys) for i, pdu in enumerate(auth_pdus)]
    latest_id = checked.add("latest_event", latest, keys)
    state: dict[tuple[str, str], str] = {}
    for i, event_id in enumerate(state_ids):
        _add_state(state, event_id, checked.events[event_id], f"state[{i}]")
    return state, latest_id, list(dict.fromkeys(auth_ids))


def _id_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidPeekResponse(f"{what} must be a list of event IDs")
    return value


def _parse_r4(
    body: Mapping[str, Any], checked: _Checked, keys: KeyLookup
) -> tuple[dict[tuple[str, str], str], str, list[str]]:
    extremities = body.get("latest_event_state_ids")
    if not isinstance(extremities, Mapping) or not extremities:
        raise InvalidPeekResponse("latest_event_state_ids must be a non-empty object")
    common = _id_list(body.get("common_state_ids", []), "common_state_ids")
    pdus = body.get("events")
    if not isinstance(pdus, list):
        raise InvalidPeekResponse("events must be a list of PDUs")
    _check_create_versions(pdus, checked.rules.identifier)
    order = [checked.add(f"events[{i}]", pdu, keys) for i, pdu in enumerate(pdus)]
    events = checked.events
    for extremity in extremities:
        if extremity not in events:
            raise InvalidPeekResponse(f"extremity {_short(extremity)} is not in events")

    def depth(event_id: str) -> int:
        value = events[event_id].get("depth")
        return value if isinstance(value, int) else 0

    latest_id = max(extremities, key=depth)
    chosen = _id_list(extremities[latest_id], f"latest_event_state_ids[{latest_id}]")
    state: dict[tuple[str, str], str] = {}
    for event_id in (*common, *chosen):
        if event_id not in events:
            raise InvalidPeekResponse(f"state event {_short(event_id)} is not in events")
        _add_state(state, event_id, events[event_id], "state event")
    return state, latest_id, _auth_closure(state.values(), events, order, checked.rules)


def _auth_closure(
    starts: Collection[str],
    events: Mapping[str, Mapping[str, Any]],
    order: list[str],
    rules: RoomVersion,
) -> list[str]:
    """The events reachable from ``starts`` through ``auth_events`` (in v12 also the create
    event, referenced implicitly), in the order of ``order``; a start event only if reached."""
    reached: set[str] = set()
    todo = [ref for start in starts for ref in _ref_ids(events[start].get("auth_events"))]
    if rules.format.room_id_is_create_event_hash:
        todo += [e for e in order if events[e].get("type") == "m.room.create"]
    while todo:
        event_id = todo.pop()
        if event_id in reached or event_id not in events:
            continue
        reached.add(event_id)
        todo.extend(_ref_ids(events[event_id].get("auth_events")))
    return [e for e in dict.fromkeys(order) if e in reached]


def _check_auth_coverage(
    state: Mapping[tuple[str, str], str],
    latest_id: str,
    known: Collection[str],
    events: Mapping[str, Mapping[str, Any]],
) -> None:
    for event_id in (*state.values(), latest_id):
        for ref in _ref_ids(events[event_id].get("auth_events")):
            if ref not in known:
                raise InvalidPeekResponse(
                    f"the auth chain does not cover {event_id}: its auth event {ref} "
                    "is neither in the state nor in the auth chain"
                )


def _check_peekable(state: Mapping[tuple[str, str], str], events: Mapping[str, Any]) -> None:
    """MSC2753/MSC2444: only ``world_readable``, unencrypted rooms may be peeked. A missing
    ``m.room.history_visibility`` (or an invalid value) means ``shared``."""
    visibility: object = "shared"
    hv_id = state.get(_HISTORY_VISIBILITY)
    if hv_id is not None:
        visibility = events[hv_id]["content"].get("history_visibility", "shared")
    if visibility != "world_readable":
        raise RoomNotPeekable(f"history_visibility is {_short(visibility)}, not world_readable")
    if _ENCRYPTION in state:
        raise RoomNotPeekable(f"the room is encrypted ({state[_ENCRYPTION]} in state)")


def validate_peek_response(
    body: Any,
    *,
    room_id: str,
    supported_versions: Collection[str],
    keys: KeyLookup,
) -> ValidatedPeek:
    """Validate the 200 answer to ``PUT /_matrix/federation/v1/peek/{room_id}/{peekId}``
    (R3 shape, or R4 leniently; see the module docstring). Check a renewal reply with
    :func:`is_empty_renewal` first: ``{}`` is not a valid full response.

    Args:
        body: the parsed JSON body.
        room_id: the room that was peeked.
        supported_versions: the room versions peekproxy accepts (the ``ver`` list sent).
        keys: the signing keys of every server whose signature a PDU needs.

    Returns:
        The verified events and the room's state.

    Raises:
        InvalidPeekResponse: with the first problem found, checked in this order: not an
            object; ``renewal_interval`` present but not a positive integer (absent or
            ``null``: :data:`DEFAULT_RENEWAL_INTERVAL_MS`); ``room_version``
            not a string, unknown, or not in ``supported_versions``; a malformed shape; an
            ``m.room.create`` whose ``content.room_version`` (absent: ``"1"``) is not the
            response's; a PDU that :func:`~peekproxy.core.pdu.check_pdu` rejects
            (bad format, forged or missing signature), named with its place and ID; a PDU
            of another room (v12: a create event whose hash is not ``room_id``); two
            different events with one ID; a state entry without ``state_key``; two state
            events for one ``(type, state_key)``; no ``m.room.create`` in the state; an
            ``auth_events`` ID of a state event or of the latest event that is in neither
            the state nor the auth chain (R4: ``events``).
            Then the auth rules judge every event by its own auth events (receipt step
            4): a rejected create or latest event fails the response.
        RoomNotPeekable: (a subclass, checked last) the state's ``history_visibility`` is
            not ``world_readable`` (none at all counts as ``shared``), or the state has an
            ``m.room.encryption`` event.

    Content-hash mismatches are not errors: such events are stored redacted and listed in
    ``redacted`` (SSAPI §Checks performed on receipt of a PDU, step 3).
    """
    if not isinstance(body, Mapping):
        raise InvalidPeekResponse("the peek response is not a JSON object")
    interval = _renewal_interval(body)
    rules = _rules(body, supported_versions)
    checked = _Checked(rules, room_id, {}, set())
    if _is_r4(body):
        state, latest_id, auth_ids = _parse_r4(body, checked, keys)
        known: Collection[str] = checked.events
    else:
        state, latest_id, auth_ids = _parse_r3(body, checked, keys)
        known = {*state.values(), *auth_ids}
    if _CREATE not in state:
        raise InvalidPeekResponse("no m.room.create event in the state")
    _check_auth_coverage(state, latest_id, known, checked.events)
    judgement = judge_batch(checked.events, rules, stored={})
    refused = {**judgement.rejected, **judgement.unknown}
    for what, event_id in (
        ("the room's create event", state[_CREATE]),
        ("the latest event", latest_id),
    ):
        if event_id in refused:
            raise InvalidPeekResponse(f"{what} {event_id} is not allowed: {refused[event_id]}")
    state = {key: event_id for key, event_id in state.items() if event_id not in refused}
    _check_peekable(state, checked.events)
    return ValidatedPeek(
        room_id=room_id,
        room_version=rules.identifier,
        events={e: pdu for e, pdu in checked.events.items() if e not in refused},
        state=state,
        latest_event_id=latest_id,
        auth_chain_ids=[e for e in auth_ids if e not in refused],
        renewal_interval_ms=interval,
        redacted=frozenset(checked.redacted) - refused.keys(),
        rejected=refused,
    )
