"""Fault injection for the testbed's outgoing event stream and its peek endpoint.

The ``*_next`` and ``peek_count`` counters are consumed one per use: ``drop_next = 2`` drops
the next two transactions. ``delay_ms``, ``renew_full``, ``relay_illegal`` and the
``peek_status``/``peek_errcode``/``peek_retry_after_ms`` settings stay as set until changed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Faults"]

_ERRCODE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]{0,127}$")


@dataclass
class Faults:
    """What to break, set through the admin API (``PUT /_testbed/v1/faults``).

    Settings (kept until changed):

    * ``delay_ms``: wait this long before sending each transaction.
    * ``backfill_delay_ms``: wait this long before answering each ``GET /backfill``.
    * ``renew_full``: 1 makes a re-PUT of a live peek answer the full state, as Dendrite
      does, whatever the config's ``renew_reply`` says; 0 (the default) leaves it to the
      config.
    * ``peek_status``: the HTTP status of an injected peek failure, 400-599 (500).
    * ``peek_errcode``: its ``errcode``; ``None`` (the default) means ``M_LIMIT_EXCEEDED``
      for 429 and ``M_UNKNOWN`` otherwise (e.g. ``M_NOT_FOUND`` or ``M_UNRECOGNIZED`` with
      404).
    * ``peek_retry_after_ms``: the ``retry_after_ms`` of an injected 429.
    * ``relay_illegal``: 1 lets the admin API make events the authorization rules reject
      (``POST /rooms/{roomId}/illegal``, :mod:`~peekproxy.testbed.illegal`) and push them to
      the room's peekers like any other event; 0 (the default) refuses that request.

    Counters (each use takes one):

    * ``drop_next``: the next N transactions are discarded instead of sent (events lost).
    * ``duplicate_next``: the next N transactions are sent twice with the same txnId (a replay).
    * ``resend_next``: the events of the next N transactions are sent again in a new txnId.
    * ``reorder_next``: the next N pairs of events are delivered in reverse order, each in its
      own transaction.
    * ``withhold_next``: the next N events are never pushed, so the event after each one
      arrives with ``prev_events`` the receiver does not know (it can fetch them with
      ``get_missing_events``).
    * ``forge_next``: the next N events are pushed with a corrupted signature.
    * ``backfill_fail_next``: the next N ``GET /backfill`` requests answer
      ``500 M_UNKNOWN``.
    * ``missing_events_empty_next``: the next N ``POST /get_missing_events`` requests are
      answered with no events (what a server that lost them would say), so withheld events
      become a gap at the receiver.
    * ``event_auth_fail_next``: the next N ``GET /event_auth`` requests answer 404
      ``M_UNRECOGNIZED``, as from a server without that endpoint.
    * ``peek_count``: the next N peek PUTs fail with ``peek_status``/``peek_errcode``.
    """

    delay_ms: int = 0
    backfill_delay_ms: int = 0
    renew_full: int = 0
    drop_next: int = 0
    duplicate_next: int = 0
    resend_next: int = 0
    reorder_next: int = 0
    withhold_next: int = 0
    forge_next: int = 0
    backfill_fail_next: int = 0
    missing_events_empty_next: int = 0
    event_auth_fail_next: int = 0
    peek_status: int = 500
    peek_errcode: str | None = None
    peek_count: int = 0
    peek_retry_after_ms: int = 1000
    relay_illegal: int = 0

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes``: known fields only; non-negative integers, ``peek_status`` an
        error status 400-599, ``peek_errcode`` an error code string or ``None``. Nothing is
        changed when one of them is bad.

        Raises:
            ValueError: unknown field or a bad value.
        """
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
            if name == "peek_errcode":
                if value is not None and not (isinstance(value, str) and _ERRCODE.match(value)):
                    raise ValueError(
                        "peek_errcode must be an error code such as M_NOT_FOUND, or null for "
                        "the default"
                    )
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
            if name == "peek_status" and not 400 <= value <= 599:
                raise ValueError("peek_status must be an HTTP error status, 400-599")
            if name in ("renew_full", "relay_illegal") and value > 1:
                raise ValueError(f"{name} must be 0 or 1")
        for name, value in changes.items():
            setattr(self, name, value)

    def take(self, name: str) -> bool:
        """Consume one use of counter ``name``; True if there was one."""
        count = getattr(self, name)
        if count > 0:
            setattr(self, name, count - 1)
            return True
        return False

    def peek_error(self) -> tuple[int, str]:
        """The status and errcode of an injected peek failure."""
        status = self.peek_status
        default = "M_LIMIT_EXCEEDED" if status == 429 else "M_UNKNOWN"
        return status, self.peek_errcode or default

    def to_json(self) -> dict[str, int | str | None]:
        return asdict(self)
