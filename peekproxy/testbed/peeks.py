"""Inbound MSC2444 peeks held by the testbed (pure: time is passed in, in ms).

A peek is identified by ``(origin, room_id, peek_id)``. It lives until it is DELETEd or
until ``renewal_interval_ms`` passes without a renewal (MSC2444: "The target server should
expire any peek which is not renewed before the renewal_interval elapses").
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["InboundPeek", "PeekRegistry"]


@dataclass
class InboundPeek:
    origin: str
    room_id: str
    peek_id: str
    renewal_interval_ms: int
    created_ms: int
    renewed_ms: int

    @property
    def expires_ms(self) -> int:
        return self.renewed_ms + self.renewal_interval_ms

    def to_json(self) -> dict[str, object]:
        return {
            "origin": self.origin,
            "room_id": self.room_id,
            "peek_id": self.peek_id,
            "renewal_interval": self.renewal_interval_ms,
            "created_ts": self.created_ms,
            "renewed_ts": self.renewed_ms,
            "expires_ts": self.expires_ms,
        }


@dataclass
class PeekRegistry:
    """Active inbound peeks. Call :meth:`expire` before answering anything time-dependent."""

    peeks: dict[tuple[str, str, str], InboundPeek] = field(default_factory=dict)

    def expire(self, now_ms: int) -> list[InboundPeek]:
        """Drop and return the peeks whose renewal interval has passed."""
        gone = [p for p in self.peeks.values() if p.expires_ms <= now_ms]
        for peek in gone:
            del self.peeks[(peek.origin, peek.room_id, peek.peek_id)]
        return gone

    def get(self, origin: str, room_id: str, peek_id: str, now_ms: int) -> InboundPeek | None:
        self.expire(now_ms)
        return self.peeks.get((origin, room_id, peek_id))

    def start(
        self, origin: str, room_id: str, peek_id: str, now_ms: int, interval_ms: int
    ) -> InboundPeek:
        """Start (or restart) a peek."""
        peek = InboundPeek(origin, room_id, peek_id, interval_ms, now_ms, now_ms)
        self.peeks[(origin, room_id, peek_id)] = peek
        return peek

    def renew(self, origin: str, room_id: str, peek_id: str, now_ms: int) -> InboundPeek | None:
        """Renew an active peek; ``None`` when it is unknown or has lapsed."""
        peek = self.get(origin, room_id, peek_id, now_ms)
        if peek is not None:
            peek.renewed_ms = now_ms
        return peek

    def delete(self, origin: str, room_id: str, peek_id: str, now_ms: int) -> bool:
        self.expire(now_ms)
        return self.peeks.pop((origin, room_id, peek_id), None) is not None

    def end_room(self, room_id: str) -> list[InboundPeek]:
        """End every peek of a room (e.g. it stopped being world_readable)."""
        gone = [p for p in self.peeks.values() if p.room_id == room_id]
        for peek in gone:
            del self.peeks[(peek.origin, peek.room_id, peek.peek_id)]
        return gone

    def destinations(self, room_id: str, now_ms: int) -> set[str]:
        """Servers with at least one active peek of ``room_id`` (each gets each event once)."""
        self.expire(now_ms)
        return {p.origin for p in self.peeks.values() if p.room_id == room_id}

    def next_expiry_ms(self) -> int | None:
        return min((p.expires_ms for p in self.peeks.values()), default=None)

    def active(self, now_ms: int) -> list[InboundPeek]:
        self.expire(now_ms)
        return list(self.peeks.values())
