"""Fault injection for the testbed's outgoing event stream and its peek endpoint.

Counters are consumed one per use: ``drop_next = 2`` drops the next two transactions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Faults"]


@dataclass
class Faults:
    """What to break, set through the admin API (``PUT /_testbed/v1/faults``).

    * ``delay_ms``: wait this long before sending each transaction.
    * ``drop_next``: the next N transactions are discarded instead of sent (events lost).
    * ``duplicate_next``: the next N transactions are sent twice with the same txnId (a replay).
    * ``resend_next``: the events of the next N transactions are sent again in a new txnId.
    * ``reorder_next``: the next N pairs of events are delivered in reverse order, each in its
      own transaction.
    * ``withhold_next``: the next N events are never pushed, so the event after each one
      arrives with ``prev_events`` the receiver does not know (it can fetch them with
      ``get_missing_events``).
    * ``forge_next``: the next N events are pushed with a corrupted signature.
    * ``peek_status`` / ``peek_count``: the next ``peek_count`` peek PUTs answer HTTP
      ``peek_status`` (e.g. 500, or 429 with ``retry_after_ms`` = ``peek_retry_after_ms``).
    """

    delay_ms: int = 0
    drop_next: int = 0
    duplicate_next: int = 0
    resend_next: int = 0
    reorder_next: int = 0
    withhold_next: int = 0
    forge_next: int = 0
    peek_status: int = 500
    peek_count: int = 0
    peek_retry_after_ms: int = 1000

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` (only known, non-negative integer fields).

        Raises:
            ValueError: unknown field or a bad value.
        """
        known = {f.name for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        for name, value in changes.items():
            setattr(self, name, value)

    def take(self, name: str) -> bool:
        """Consume one use of counter ``name``; True if there was one."""
        count = getattr(self, name)
        if count > 0:
            setattr(self, name, count - 1)
            return True
        return False

    def to_json(self) -> dict[str, int]:
        return asdict(self)
