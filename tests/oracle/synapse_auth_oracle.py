"""Synapse's authorization rules as a test oracle: JSON lines in, JSON lines out.

Run only as a subprocess with the Python of Synapse's venv (``tests/synapse_oracle.py``
starts it); peekproxy never imports it. It judges PDUs with ``synapse.event_auth`` of the
pinned Synapse (Makefile ``SYNAPSE_VERSION``) the way federation receipt does
(``handlers/federation_event.py``), leaving out what is not an auth rule
(``validate_event_for_room_version``: sizes and the presence of signatures).

Requests, one JSON object per line:

* ``{"version": true}`` → ``{"synapse": "<matrix-synapse version>"}``;
* ``{"reset": true}`` → ``{"ok": true}``: forget every judged event;
* ``{"room_version": "10", "event": PDU, "auth_events": [PDU, ...]?,
  "state": [event ID or PDU, ...]?}`` → ``{"event_id", "verdict": "accept" | "reject" |
  "crash", "stage": "parse" | "independent" | "dependent" | "state" | "done", "error",
  "msg"}``. The event is parsed as federation parses it (``event_from_pdu_json``), then
  checked against its own ``auth_events`` (receipt step 4) and, with ``state``, against
  that state (steps 5/6). Auth events not sent are looked up among the events judged
  before; a rejected one keeps its rejection (first copy of an ID wins), as Synapse's
  store does. ``crash`` is an exception other than ``SynapseError``: Synapse would drop
  the PDU.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import synapse
from synapse.api.errors import SynapseError
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.event_auth import (
    check_state_dependent_auth_rules,
    check_state_independent_auth_rules,
)
from synapse.events import make_event_from_dict
from synapse.federation.federation_base import event_from_pdu_json

#: event ID → Synapse event; rejected ones carry ``rejected_reason``.
EVENTS: dict[str, Any] = {}


class Store:
    """The ``_EventSourceStore`` protocol over :data:`EVENTS`; never suspends."""

    async def get_events(
        self,
        event_ids: Any,
        redact_behaviour: Any = None,
        get_prev_content: bool = False,
        allow_rejected: bool = False,
    ) -> dict[str, Any]:
        return {i: EVENTS[i] for i in event_ids if i in EVENTS}


STORE = Store()


def run_sync(coro: Any) -> None:
    """Drive a coroutine that awaits no real I/O, without an event loop."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("coroutine suspended")


def judge(req: dict[str, Any]) -> dict[str, Any]:
    rv = KNOWN_ROOM_VERSIONS[req["room_version"]]
    stage = "parse"
    event_id = None
    try:
        # unsigned stripped, depth checked, v6+ strict canonical JSON, v12 "auth_events
        # must not contain the create event". It mutates its argument: pass a copy.
        event = event_from_pdu_json(json.loads(json.dumps(req["event"])), rv)
        event_id = event.event_id
        batch = {}
        for pdu in req.get("auth_events", ()):
            auth_event = make_event_from_dict(pdu, rv)
            batch[auth_event.event_id] = auth_event
        stage = "independent"
        run_sync(check_state_independent_auth_rules(STORE, event, batch or None))
        stage = "dependent"
        check_state_dependent_auth_rules(
            event, [batch.get(i) or EVENTS[i] for i in event.auth_event_ids()]
        )
        if "state" in req:
            stage = "state"
            state = [
                EVENTS[s] if isinstance(s, str) else make_event_from_dict(s, rv)
                for s in req["state"]
            ]
            check_state_dependent_auth_rules(event, state)
    except SynapseError as e:  # AuthError, UnstableSpecAuthError, plain SynapseError(400)
        if event_id is not None and event_id not in EVENTS:
            EVENTS[event_id] = make_event_from_dict(req["event"], rv, rejected_reason="auth_error")
        return {
            "event_id": event_id,
            "verdict": "reject",
            "stage": stage,
            "error": f"{type(e).__name__} {e.code}",
            "msg": str(e.msg)[:300],
        }
    except Exception as e:  # KeyError, ValueError, ...: Synapse raises and drops the PDU
        return {
            "event_id": event_id,
            "verdict": "crash",
            "stage": stage,
            "error": type(e).__name__,
            "msg": repr(e)[:300],
        }
    EVENTS.setdefault(event_id, event)
    return {"event_id": event_id, "verdict": "accept", "stage": "done"}


def answer(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("version"):
        return {"synapse": synapse.__version__}
    if req.get("reset"):
        EVENTS.clear()
        return {"ok": True}
    return judge(req)


def main() -> None:
    logging.disable(logging.CRITICAL)
    for line in sys.stdin:
        sys.stdout.write(json.dumps(answer(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
