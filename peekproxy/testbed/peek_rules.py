"""Who may peek a testbed room, how often, which peeks a new event ends, and the record of
peek requests answered.

MSC2444 R3 (``shared/reference/protocol.md``): a peek needs a room version among the
peeker's ``ver`` values, a server ACL that allows the peeker, an unencrypted room and
``world_readable`` history; R4's read endpoints need the ACL and ``world_readable``.
No I/O: the :class:`~peekproxy.testbed.host.Testbed` applies the verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from peekproxy.api.errors import MatrixError
from peekproxy.testbed.peeks import InboundPeek, PeekRegistry
from peekproxy.testbed.rooms import TestbedRoom

__all__ = [
    "PEEK_REQUESTS_KEPT",
    "PeekRequest",
    "TokenBucket",
    "check_acl",
    "check_peekable",
    "check_readable",
    "end_peeks_after",
]

#: How many peek requests :attr:`Testbed.peek_requests` remembers (the oldest go first).
PEEK_REQUESTS_KEPT = 10_000


@dataclass(frozen=True)
class PeekRequest:
    """One authenticated request to the peek endpoint, as answered: ``method`` (``PUT``,
    ``DELETE``, or ``POST`` for an R4 renew), ``status`` (the HTTP status sent, injected
    faults included) and ``at_ms`` (wall clock, ms)."""

    method: str
    origin: str
    room_id: str
    peek_id: str
    status: int
    at_ms: int

    def to_json(self) -> dict[str, str | int]:
        return asdict(self)


class TokenBucket:
    """A per-key rate limit: ``rate`` tokens a second, at most ``burst`` saved up; ``clock``
    gives seconds (monotonic)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when allowed, else seconds until a token is available."""
        now = self.clock()
        tokens, last = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[key] = (tokens - 1, now)
            return 0.0
        self.buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


def check_acl(room: TestbedRoom, origin: str) -> None:
    """403 ``M_FORBIDDEN`` when the room's ``m.room.server_acl`` denies ``origin``."""
    if not room.server_acl_allows(origin):
        raise MatrixError(403, "M_FORBIDDEN", "Forbidden by server ACLs")


def check_peekable(room: TestbedRoom, origin: str, versions: list[str]) -> None:
    """Whether ``origin``, which speaks room ``versions``, may peek ``room``.

    Raises:
        MatrixError: 400 ``M_INCOMPATIBLE_ROOM_VERSION`` (with ``room_version``); 403
            ``M_FORBIDDEN`` denied by the server ACL, encrypted, or not world_readable.
    """
    if room.rules.identifier not in versions:
        raise MatrixError(
            400,
            "M_INCOMPATIBLE_ROOM_VERSION",
            f"the room is version {room.rules.identifier}, not in your ver list",
            room_version=room.rules.identifier,
        )
    check_acl(room, origin)
    if room.is_encrypted():
        raise MatrixError(403, "M_FORBIDDEN", "Cannot peek into an encrypted room")
    if not room.is_world_readable():
        raise MatrixError(
            403,
            "M_FORBIDDEN",
            f"history_visibility is {room.history_visibility()!r}, not world_readable",
        )


def check_readable(room: TestbedRoom, origin: str) -> None:
    """Whether ``origin`` may use R4's read endpoints on ``room``.

    Raises:
        MatrixError: 403 ``M_FORBIDDEN`` denied by the server ACL, or not world_readable.
    """
    check_acl(room, origin)
    if not room.is_world_readable():
        raise MatrixError(403, "M_FORBIDDEN", "room is not world_readable")


def end_peeks_after(
    room: TestbedRoom, pdu: dict[str, Any], registry: PeekRegistry, now_ms: int
) -> list[tuple[InboundPeek, str]]:
    """End the peeks of ``room`` that its new event ``pdu`` (already appended, and delivered
    to them) stops: all of them when the room is no longer world_readable or is now
    encrypted; those of servers a new ``m.room.server_acl`` denies. Returns each ended peek
    (removed from ``registry``) with why it ended."""
    if not room.is_world_readable() or room.is_encrypted():
        return [(peek, "room no longer peekable") for peek in registry.end_room(room.room_id)]
    if pdu.get("type") != "m.room.server_acl":
        return []
    ended: list[tuple[InboundPeek, str]] = []
    for peek in registry.active(now_ms):
        if peek.room_id == room.room_id and not room.server_acl_allows(peek.origin):
            registry.delete(peek.origin, peek.room_id, peek.peek_id, now_ms)
            ended.append((peek, "denied by the server ACL"))
    return ended
