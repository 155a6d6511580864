"""A room builder for the authorization-rule tests (tests/test_auth_rules.py, the
differential tests against Synapse in tests/test_auth_rules_oracle.py and the replayed
regression cases in tests/fixtures/auth-regressions/).

PDUs are built with peekproxy's own code (``compute_event_id``, ``room_id_for_create``):
v1/v2 carry an ``event_id`` field and ``[id, hashes]`` references, v12 rooms take their ID
from the create event, whose ID their events do not cite. Hashes and signatures are
placeholders: the auth rules never read them (receipt steps 2-3 are tested elsewhere).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signedjson.key import decode_signing_key_base64, encode_verify_key_base64, get_verify_key

from peekproxy.core.auth_rules import StateKey, check_against_state, check_event_auth
from peekproxy.core.events import compute_event_id, content_hash_input, room_id_for_create
from peekproxy.core.pdu_format import format_problem
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, EventIdFormat, RoomVersion

REGRESSIONS = Path(__file__).resolve().parent / "fixtures" / "auth-regressions"

ALICE = "@alice:a.test"
BOB = "@bob:b.test"
CAROL = "@carol:b.test"
DAVE = "@dave:c.test"
MALLORY = "@mallory:m.test"
#: Two identity-server signing keys for third-party invites (fixed seeds: reproducible),
#: and their public keys (unpadded base64).
IDENTITY_KEYS = [decode_signing_key_base64("ed25519", "0", seed * 43) for seed in "AB"]
IDENTITY_PUBLIC_KEYS = [encode_verify_key_base64(get_verify_key(key)) for key in IDENTITY_KEYS]
#: Placeholder hashes and signatures (never read by the auth rules).
_HASHES = {"sha256": "AAAA"}


def peekproxy_verdict(
    event_id: str,
    pdu: dict[str, Any],
    rules: RoomVersion,
    auth_events: dict[str, dict[str, Any]],
    rejected: set[str],
    state: dict[StateKey, dict[str, Any]] | None,
) -> str | None:
    """Receipt steps 1 and 4-6 as peekproxy runs them: ``None`` = accepted, else why not."""
    problem = format_problem(pdu, rules, len(content_hash_input(pdu)))
    if problem is not None:
        return f"step 1: {problem}"
    problem = check_event_auth(event_id, pdu, auth_events, rules, rejected=rejected)
    if problem is not None or state is None:
        return problem
    return check_against_state(event_id, pdu, state, rules)


@dataclass
class Judgement:
    """One verdict a :class:`Room` gave, with the state it was judged against."""

    event_id: str
    pdu: dict[str, Any]
    verdict: str | None
    state: list[str] | None


#: When a list, every :class:`Room` created appends itself (to replay its judgements
#: against Synapse: tests/test_auth_rules_oracle.py).
RECORDED_ROOMS: list[Room] | None = None


@dataclass
class Room:
    """One room of one version: accepted events, rejected IDs, and the current state."""

    version: str
    creator: str = ALICE
    create_content: dict[str, Any] | None = None
    rules: RoomVersion = field(init=False)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    state: dict[StateKey, str] = field(default_factory=dict)
    last: list[str] = field(default_factory=list)
    room_id: str | None = None
    create_id: str = ""
    counter: int = 0
    create: dict[str, Any] = field(default_factory=dict)
    judgements: list[Judgement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rules = KNOWN_ROOM_VERSIONS[self.version]
        content = self.create_content
        if content is None:
            content = {"room_version": self.version}
            if not self.rules.auth.implicit_room_creator:
                content["creator"] = self.creator
        self.create_id, self.create = self.build("m.room.create", self.creator, content, "")
        self.commit(self.create_id, self.create, accepted=True)
        if RECORDED_ROOMS is not None:
            RECORDED_ROOMS.append(self)
            verdict = check_event_auth(self.create_id, self.create, {}, self.rules)
            self.judgements.append(Judgement(self.create_id, self.create, verdict, None))

    @property
    def v1_ids(self) -> bool:
        return self.rules.event_id_format is EventIdFormat.EVENT_ID_FIELD

    def refs(self, ids: list[str]) -> list[Any]:
        """``prev_events``/``auth_events`` in this version's format."""
        return [[i, dict(_HASHES)] for i in ids] if self.v1_ids else list(ids)

    def auth_ids(
        self, etype: str, sender: str, content: dict[str, Any], state_key: str | None
    ) -> list[str]:
        """The auth events the selection algorithm picks from the current state (SSAPI
        §Auth events selection); v12 leaves the create event out."""
        keys: list[StateKey] = [("m.room.power_levels", ""), ("m.room.member", sender)]
        if not self.rules.auth.create_event_implied:
            keys.append(("m.room.create", ""))
        if etype == "m.room.member" and isinstance(state_key, str):
            keys.append(("m.room.member", state_key))
            membership = content.get("membership")
            if membership in ("join", "invite", "knock"):
                keys.append(("m.room.join_rules", ""))
            tpi = content.get("third_party_invite")
            signed = tpi.get("signed") if isinstance(tpi, dict) else None
            if membership == "invite" and isinstance(signed, dict):
                token = signed.get("token")
                if isinstance(token, str):
                    keys.append(("m.room.third_party_invite", token))
            authoriser = content.get("join_authorised_via_users_server")
            restricted = self.rules.auth.restricted_join_rule and membership == "join"
            if restricted and isinstance(authoriser, str):
                keys.append(("m.room.member", authoriser))
        return sorted({self.state[k] for k in keys if k in self.state})

    def build(
        self,
        etype: str,
        sender: str,
        content: dict[str, Any],
        state_key: str | None = None,
        *,
        auth: list[str] | None = None,
        prev: list[str] | None = None,
        id_server: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """A PDU and its ID; ``auth``/``prev`` default to the selection algorithm and the
        last accepted event; ``id_server`` is the v1/v2 event ID's server (default the
        sender's); ``extra`` adds or replaces top-level keys."""
        self.counter += 1
        server = sender.split(":", 1)[1]
        pdu: dict[str, Any] = {
            "type": etype,
            "sender": sender,
            "content": content,
            "prev_events": self.refs(self.last if prev is None else prev),
            "auth_events": self.refs(
                self.auth_ids(etype, sender, content, state_key) if auth is None else auth
            ),
            "depth": self.counter,
            "origin_server_ts": 1_700_000_000_000 + self.counter,
            "origin": server,
            "hashes": dict(_HASHES),
            "signatures": {server: {"ed25519:k": "AAAA"}},
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        if self.room_id is not None:
            pdu["room_id"] = self.room_id
        elif not self.rules.format.room_id_is_create_event_hash:
            pdu["room_id"] = "!room:" + server
        if self.v1_ids:
            pdu["event_id"] = f"${self.counter}:{id_server or server}"
        pdu.update(extra or {})
        event_id = compute_event_id(pdu, self.rules)
        if self.room_id is None and etype == "m.room.create":
            self.room_id = room_id_for_create(pdu, self.rules)
        return event_id, pdu

    def commit(self, event_id: str, pdu: dict[str, Any], *, accepted: bool) -> None:
        """Record a verdict: an accepted event joins the DAG (and the state, if it is a
        state event); a rejected one is only remembered as rejected."""
        if event_id in self.events or event_id in self.rejected:
            return  # the first copy of an ID wins, as in Synapse's store
        if not accepted:
            self.rejected.add(event_id)
            return
        self.events[event_id] = pdu
        self.last = [event_id]
        if isinstance(pdu.get("state_key"), str):
            self.state[(pdu["type"], pdu["state_key"])] = event_id

    def state_pdus(self) -> dict[StateKey, dict[str, Any]]:
        return {key: self.events[i] for key, i in self.state.items()}

    def verdict(self, event_id: str, pdu: dict[str, Any]) -> str | None:
        """peekproxy's verdict against the event's auth events and the current state."""
        verdict = peekproxy_verdict(
            event_id, pdu, self.rules, self.events, self.rejected, self.state_pdus()
        )
        if RECORDED_ROOMS is not None:
            state = sorted(self.state.values())
            self.judgements.append(Judgement(event_id, copy.deepcopy(pdu), verdict, state))
        return verdict

    def build_step(self, step: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """:meth:`build` from a step: ``etype``, ``sender``, ``content``, ``state_key``
        (optional) and :meth:`build`'s keyword arguments."""
        rest = dict(step)
        etype, sender, content = rest.pop("etype"), rest.pop("sender"), rest.pop("content")
        return self.build(etype, sender, content, rest.pop("state_key", None), **rest)

    def send_step(self, step: Mapping[str, Any]) -> str | None:
        """:meth:`send` from a step (see :meth:`build_step`)."""
        event_id, pdu = self.build_step(step)
        verdict = self.verdict(event_id, pdu)
        self.commit(event_id, pdu, accepted=verdict is None)
        return verdict

    def send(
        self,
        etype: str,
        sender: str,
        content: dict[str, Any],
        state_key: str | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Build, judge with peekproxy and commit an event; returns the verdict."""
        event_id, pdu = self.build(etype, sender, content, state_key, **kwargs)
        verdict = self.verdict(event_id, pdu)
        self.commit(event_id, pdu, accepted=verdict is None)
        return verdict


def opening(room: Room, levels: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The usual opening of a room, as steps (:meth:`Room.build_step`): the creator Alice
    joins; power levels (Alice 100, or in v12 her creator's level; ban, kick, redact and
    state_default 50; events_default and invite 0; ``levels`` overrides); public join
    rules; Bob joins."""
    users: dict[str, Any] = {} if room.rules.auth.privileged_creators else {ALICE: 100}
    content = {"users": users, "users_default": 0, "ban": 50, "kick": 50, "redact": 50}
    content.update({"state_default": 50, "events_default": 0, "invite": 0, "events": {}})
    content.update(levels or {})
    join = {"membership": "join"}
    return [
        {"etype": "m.room.member", "sender": ALICE, "content": join, "state_key": ALICE},
        {"etype": "m.room.power_levels", "sender": ALICE, "content": content, "state_key": ""},
        {
            "etype": "m.room.join_rules",
            "sender": ALICE,
            "content": {"join_rule": "public"},
            "state_key": "",
        },
        {"etype": "m.room.member", "sender": BOB, "content": dict(join), "state_key": BOB},
    ]


def regression_case(
    room: Room,
    event_id: str,
    pdu: dict[str, Any],
    state: dict[StateKey, str],
    rejected: frozenset[str],
    synapse: dict[str, Any],
) -> dict[str, Any]:
    """A self-contained case for tests/fixtures/auth-regressions/ (replayed by
    :func:`replay_regression`): the event, the events it cites and the room's state (as
    they were when it was judged), the rejected IDs it cites, and Synapse's answer."""
    cited = [r[0] if isinstance(r, list) else r for r in pdu.get("auth_events", [])]
    if room.rules.auth.create_event_implied:
        cited.append(room.create_id)
    needed = set(cited) | set(state.values())
    return {
        "room_version": room.version,
        "event_id": event_id,
        "event": pdu,
        "auth_events": {i: room.events[i] for i in sorted(needed) if i in room.events},
        "rejected": sorted(rejected & set(cited)),
        "state": sorted(state.values()),
        "synapse": synapse,
    }


def replay_regression(case: dict[str, Any]) -> tuple[bool, str | None]:
    """(Synapse accepted, peekproxy's verdict) for a stored regression case."""
    rules = KNOWN_ROOM_VERSIONS[case["room_version"]]
    events: dict[str, dict[str, Any]] = case["auth_events"]
    state = {(events[i]["type"], events[i]["state_key"]): events[i] for i in case["state"]}
    verdict = peekproxy_verdict(
        case["event_id"], case["event"], rules, events, set(case["rejected"]), state
    )
    return case["synapse"]["verdict"] == "accept", verdict


def load_regressions() -> list[tuple[str, dict[str, Any]]]:
    return [(p.stem, json.loads(p.read_text())) for p in sorted(REGRESSIONS.glob("*.json"))]
