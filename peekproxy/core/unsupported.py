"""Servers that answered "no MSC2444 here", remembered for a while.

Pure: no I/O, no clock (times are passed in, ms since the epoch).

A server whose answer to ``PUT /_matrix/federation/v1/peek/{roomId}/{peekId}`` shows it has no
MSC2444 endpoint — 400/404/405 ``M_UNRECOGNIZED``, a 404/405 without a Matrix error, or a
non-JSON page (:attr:`~peekproxy.core.outcomes.PeekFailureKind.UNSUPPORTED`; Synapse, for
one, answers ``404 M_UNRECOGNIZED``, protocol.md §4) will answer the same for every room. It
is not asked again for :data:`UNSUPPORTED_HOLD_MS` (1 h): the candidate loop skips it, and the
skip still counts as that server's failure, so a device's ``502`` names it and why
(protocol.md decision 6). After the hold it is asked again, in case it was upgraded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peekproxy.core.outcomes import PeekAttemptFailure, PeekFailureKind

__all__ = ["UNSUPPORTED_HOLD_MS", "UnsupportedServers"]

#: How long a server that showed it lacks MSC2444 is not asked again (ms): 1 h.
UNSUPPORTED_HOLD_MS = 3_600_000
#: At most this many servers are remembered; beyond it the oldest entry goes first.
MAX_REMEMBERED = 10_000


@dataclass
class UnsupportedServers:
    """Which servers lack MSC2444, until when (see the module docstring).

    ``hold_ms``: how long an entry lasts (ms); ``max_entries``: how many servers are kept.
    """

    hold_ms: int = UNSUPPORTED_HOLD_MS
    max_entries: int = MAX_REMEMBERED
    #: server name → (remembered until, ms; the reason of the failure that showed it).
    _entries: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, failure: PeekAttemptFailure, now_ms: int) -> None:
        """Remember ``failure.server`` when ``failure`` shows it lacks MSC2444
        (kind UNSUPPORTED); other failures (unreachable, 5xx, not found...) are ignored."""
        if failure.kind is not PeekFailureKind.UNSUPPORTED:
            return
        self._entries.pop(failure.server, None)  # re-insert: the newest entry goes last
        self._entries[failure.server] = (now_ms + self.hold_ms, failure.reason)
        if len(self._entries) > self.max_entries:
            for server in [s for s, (until, _) in self._entries.items() if until <= now_ms]:
                del self._entries[server]
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def skip(self, server: str, now_ms: int) -> PeekAttemptFailure | None:
        """The failure to report instead of asking ``server``, or ``None`` to ask it.

        The reason is the remembered one plus how long it stands, e.g. ``"does not support
        MSC2444 peeking (HTTP 404 M_UNRECOGNIZED); remembered, not asked again for 59 min"``.
        An expired entry is dropped (``None``).
        """
        entry = self._entries.get(server)
        if entry is None:
            return None
        until, reason = entry
        if until <= now_ms:
            del self._entries[server]
            return None
        minutes = -(-(until - now_ms) // 60_000)  # rounded up
        return PeekAttemptFailure(
            server,
            PeekFailureKind.UNSUPPORTED,
            f"{reason}; remembered, not asked again for {minutes} min",
        )
