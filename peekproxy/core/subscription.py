"""The remote peek subscription of one room, as a pure state machine.

A subscription is one MSC2444 peek shared by every device peeking the room. The shell
(:mod:`peekproxy.services.subscriptions`, through its room follower) asks :func:`plan` what
to do next, performs it (a PUT, a re-PUT, a DELETE), and feeds the result back through the
transition functions. Time is
passed in (wall-clock ms); nothing here does I/O.

States::

    STARTING --peek ok--> ACTIVE --renew due--> (re-PUT) --ok--> ACTIVE
       |                    |  \\--refused/404, or unreachable past the interval--> LAPSED
       |                    |                                                         |
       |                    +--unwanted, linger over--> STOPPING --DELETE ok/404--> DORMANT
       |                                                                              |
       +--every server failed--> FAILED              LAPSED/DORMANT --wanted--> (re-peek, gap)
    any --room no longer peekable--> ENDED (DELETE sent)

Decisions from protocol.md: renew at half the remote interval clamped to [1 s, max]
(decision 3); after any lapse the next successful PUT is a new peek and a gap (decision 4);
stop after ``linger`` once no device wants the room.

Back-off (docs/peeking.md): failed renewals and re-peeks of a room count as failures in a
row (``failures``); after the n-th one the room waits
:func:`~peekproxy.core.backoff.backoff_delay` ``(n, 1 s, 60 s, draw)`` (±20 %) before it asks
again — a renewal retry never later than the moment the peek would lapse, a re-peek never
before ``retry_at_ms``. The caller draws the jitter (``draw`` in [0, 1)); nothing here is
random. After a restart, :func:`resumed` spreads the renewals and re-peeks out (about 100
a second, over at most a minute).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from peekproxy.core.backoff import backoff_delay
from peekproxy.core.outcomes import renewal_delay_ms

__all__ = [
    "Action",
    "SubState",
    "Subscription",
    "delete_failed",
    "deleted",
    "ended",
    "plan",
    "renewal_failed",
    "renewed",
    "repeek_failed",
    "replace_peek",
    "resume_spread_ms",
    "resumed",
    "start_failed",
    "started",
    "stopping",
    "unwanted",
    "wanted",
]

#: Retries of a room's renewal or re-peek: the first waits 1 s, doubling up to 60 s (ms;
#: ±20 % jitter, see :func:`peekproxy.core.backoff.backoff_delay`).
RETRY_BACKOFF_MS = (1_000, 60_000)
#: After a restart, renewals and re-peeks are spread over ``RESUME_SPACING_MS`` per stored
#: subscription (about 100 a second), at most ``RESUME_SPREAD_MS`` (ms): see
#: :func:`resume_spread_ms`.
RESUME_SPACING_MS = 10
RESUME_SPREAD_MS = 60_000


class SubState(enum.StrEnum):
    STARTING = "starting"  # no remote peek yet; peek through the candidates
    ACTIVE = "active"  # remote peek established
    LAPSED = "lapsed"  # the remote peek is gone; re-peek (with a gap) while wanted
    STOPPING = "stopping"  # DELETE to send
    DORMANT = "dormant"  # no remote peek, nobody wants one
    FAILED = "failed"  # no candidate server could be peeked
    ENDED = "ended"  # the room stopped being peekable


class Action(enum.StrEnum):
    PEEK = "peek"  # PUT a new peek through the candidates
    RENEW = "renew"  # re-PUT the current peek
    DELETE = "delete"  # DELETE the pending peeks (pending_deletes)
    STOP = "stop"  # linger over: apply stopping(), which queues the DELETE


@dataclass(frozen=True)
class Subscription:
    """One room's subscription. Times are ms since the epoch."""

    room_id: str
    state: SubState = SubState.STARTING
    candidates: tuple[str, ...] = ()
    room_version: str | None = None
    server: str | None = None
    peek_id: str | None = None
    remote_interval_ms: int | None = None
    last_renewed_ms: int | None = None
    renew_at_ms: int | None = None
    wanted: bool = True
    linger_until_ms: int | None = None
    ended_reason: str | None = None
    #: Peeks to DELETE (server, peek ID): replaced, abandoned or stopped ones.
    pending_deletes: tuple[tuple[str, str], ...] = field(default=())
    #: After a failed DELETE, do not try again before this (not persisted).
    delete_retry_at_ms: int | None = None
    #: Failed renewals and re-peeks in a row since the remote last confirmed the peek (not
    #: persisted: a restart starts the back-off afresh).
    failures: int = 0
    #: LAPSED: do not re-peek before this (back-off after failures; not persisted).
    retry_at_ms: int | None = None

    @property
    def has_remote_peek(self) -> bool:
        return self.state is SubState.ACTIVE and self.server is not None

    @property
    def accepts_events(self) -> bool:
        """Whether ``/send`` PDUs for this room are taken (a room version is known and the
        subscription has not been stopped)."""
        return self.room_version is not None and self.state in (
            SubState.ACTIVE,
            SubState.LAPSED,
            SubState.STOPPING,
        )


def plan(sub: Subscription, now_ms: int) -> tuple[Action | None, int | None]:
    """What to do now, and otherwise when to look again (``None``: only on a change).

    Keeping the current peek alive comes first: renewals and re-peeks are never held up
    by DELETEs of older peeks that keep failing (those are retried at
    ``delete_retry_at_ms``)."""
    wakes: list[int] = []
    if sub.state is SubState.STARTING:
        return Action.PEEK, None
    if sub.state is SubState.LAPSED and sub.wanted:
        if sub.retry_at_ms is None or now_ms >= sub.retry_at_ms:
            return Action.PEEK, None
        wakes.append(sub.retry_at_ms)  # backing off; older peeks may be DELETEd meanwhile
    if sub.state is SubState.ACTIVE:
        if sub.renew_at_ms is None or now_ms >= sub.renew_at_ms:
            return Action.RENEW, None
        wakes.append(sub.renew_at_ms)
        if not sub.wanted and sub.linger_until_ms is not None:
            if now_ms >= sub.linger_until_ms:
                return Action.STOP, None
            wakes.append(sub.linger_until_ms)
    if sub.pending_deletes:
        if sub.delete_retry_at_ms is None or now_ms >= sub.delete_retry_at_ms:
            return Action.DELETE, None
        wakes.append(sub.delete_retry_at_ms)
    return None, min(wakes, default=None)


def started(
    sub: Subscription,
    *,
    server: str,
    peek_id: str,
    room_version: str,
    remote_interval_ms: int,
    now_ms: int,
    max_renewal_ms: int,
) -> Subscription:
    """A PUT through ``server`` succeeded: the peek is active."""
    return replace(
        sub,
        state=SubState.ACTIVE,
        server=server,
        peek_id=peek_id,
        room_version=room_version,
        remote_interval_ms=remote_interval_ms,
        last_renewed_ms=now_ms,
        renew_at_ms=now_ms + renewal_delay_ms(remote_interval_ms, max_renewal_ms),
        ended_reason=None,
        failures=0,
        retry_at_ms=None,
    )


def start_failed(sub: Subscription, reason: str) -> Subscription:
    """No candidate could be peeked. Devices are told; a later peek starts over."""
    return replace(sub, state=SubState.FAILED, server=None, peek_id=None, ended_reason=reason)


def renewed(
    sub: Subscription,
    *,
    now_ms: int,
    max_renewal_ms: int,
    remote_interval_ms: int | None = None,
) -> Subscription:
    """The remote confirmed the peek (a ``{}`` or full re-PUT reply, or an R4 renew)."""
    interval = remote_interval_ms or sub.remote_interval_ms or 3_600_000
    return replace(
        sub,
        remote_interval_ms=interval,
        last_renewed_ms=now_ms,
        renew_at_ms=now_ms + renewal_delay_ms(interval, max_renewal_ms),
        failures=0,
    )


def renewal_failed(
    sub: Subscription, *, refused: bool, now_ms: int, draw: float = 0.5
) -> Subscription:
    """A renewal failed. ``refused``: the remote said the peek is gone (404, 403, ...): it
    has lapsed, and is re-peeked at once. Otherwise (unreachable, 5xx) it lapses only once
    the remote interval has passed since the last confirmation; until then the renewal is
    retried after the back-off (``draw`` in [0, 1) picks the jitter), but no later than
    that moment."""
    interval = sub.remote_interval_ms or 0
    last = sub.last_renewed_ms or 0
    failures = sub.failures + 1
    if refused or now_ms >= last + interval:
        return replace(
            sub, state=SubState.LAPSED, renew_at_ms=None, failures=failures, retry_at_ms=None
        )
    delay = backoff_delay(failures, *RETRY_BACKOFF_MS, draw)
    return replace(sub, renew_at_ms=min(now_ms + int(delay), last + interval), failures=failures)


def repeek_failed(
    sub: Subscription, *, now_ms: int, draw: float, not_before_ms: int | None = None
) -> Subscription:
    """A re-peek of a lapsed room failed at every candidate (5xx, unreachable, 429, ...):
    it stays LAPSED and is tried again after the back-off (``draw`` in [0, 1) picks the
    jitter), and not before ``not_before_ms`` (a remote's ``retry_after_ms``). A room that
    was never peeked (no room version) is FAILED instead: its devices got the error."""
    failures = sub.failures + 1
    retry = now_ms + int(backoff_delay(failures, *RETRY_BACKOFF_MS, draw))
    if not_before_ms is not None:
        retry = max(retry, not_before_ms)
    return replace(
        sub,
        state=SubState.LAPSED if sub.room_version is not None else SubState.FAILED,
        server=None,
        peek_id=None,
        renew_at_ms=None,
        failures=failures,
        retry_at_ms=retry,
    )


def resume_spread_ms(subscriptions: int) -> int:
    """Over how long (ms) to spread the renewals and re-peeks of ``subscriptions`` stored
    subscriptions after a restart: ``RESUME_SPACING_MS`` each, at most ``RESUME_SPREAD_MS``
    (1 room: 10 ms; 100: 1 s; 6,000 and more: a minute)."""
    return min(RESUME_SPREAD_MS, max(0, subscriptions) * RESUME_SPACING_MS)


def resumed(sub: Subscription, *, now_ms: int, draw: float, spread_ms: int) -> Subscription:
    """A stored subscription after a restart (``spread_ms`` from :func:`resume_spread_ms`).

    An active peek is renewed at ``now_ms + draw * window``, ``window`` being ``spread_ms``
    but at most half the time the peek has left before its remote interval runs out: many
    rooms do not renew all at once, and each still renews in time. One whose interval ran
    out while peekproxy was down has lapsed (its old peek is DELETEd). Lapsed rooms still
    wanted are re-peeked at ``now_ms + draw * spread_ms``. A peek that was still starting is
    abandoned. ``draw`` is in [0, 1).
    """
    if sub.state is SubState.ACTIVE:
        deadline = (sub.last_renewed_ms or 0) + (sub.remote_interval_ms or 0)
        if now_ms >= deadline:
            sub = replace_peek(renewal_failed(sub, refused=True, now_ms=now_ms, draw=draw))
        else:
            window = min(spread_ms, (deadline - now_ms) // 2)
            return replace(sub, renew_at_ms=now_ms + int(draw * window))
    if sub.state is SubState.LAPSED and sub.wanted:
        return replace(sub, retry_at_ms=now_ms + int(draw * spread_ms))
    if sub.state is SubState.STARTING:
        return unwanted(sub, now_ms=now_ms, linger_ms=0)
    return sub


def wanted(sub: Subscription, candidates: tuple[str, ...] = ()) -> Subscription:
    """A device peeks the room (again). New candidates go first."""
    merged = tuple(dict.fromkeys((*candidates, *sub.candidates)))
    state = sub.state
    if state in (SubState.DORMANT, SubState.FAILED, SubState.ENDED):
        state = SubState.LAPSED if sub.room_version is not None else SubState.STARTING
    if state is SubState.STOPPING:
        state = SubState.ACTIVE if sub.server is not None else SubState.LAPSED
    return replace(
        sub,
        wanted=True,
        linger_until_ms=None,
        candidates=merged,
        state=state,
        ended_reason=None if state is not sub.state else sub.ended_reason,
    )


def unwanted(sub: Subscription, *, now_ms: int, linger_ms: int) -> Subscription:
    """No device peeks the room any more: stop after ``linger_ms``."""
    if not sub.wanted:
        return sub
    if sub.state in (SubState.STARTING, SubState.LAPSED):
        return replace(sub, wanted=False, linger_until_ms=None, state=SubState.DORMANT)
    return replace(sub, wanted=False, linger_until_ms=now_ms + linger_ms)


def stopping(sub: Subscription) -> Subscription:
    """Linger over: queue the DELETE of the current peek."""
    deletes = sub.pending_deletes
    if sub.server is not None and sub.peek_id is not None:
        deletes = (*deletes, (sub.server, sub.peek_id))
    return replace(
        sub,
        state=SubState.DORMANT,
        server=None,
        peek_id=None,
        renew_at_ms=None,
        linger_until_ms=None,
        pending_deletes=deletes,
    )


def replace_peek(sub: Subscription) -> Subscription:
    """Before a new peek after a lapse: the old peek (if any) is to be DELETEd."""
    deletes = sub.pending_deletes
    if sub.server is not None and sub.peek_id is not None:
        deletes = (*deletes, (sub.server, sub.peek_id))
    return replace(sub, server=None, peek_id=None, pending_deletes=deletes)


def deleted(sub: Subscription, server: str, peek_id: str) -> Subscription:
    """A DELETE was answered 200 or 404: that peek is gone."""
    remaining = tuple(d for d in sub.pending_deletes if d != (server, peek_id))
    return replace(
        sub,
        pending_deletes=remaining,
        delete_retry_at_ms=sub.delete_retry_at_ms if remaining else None,
    )


def delete_failed(sub: Subscription, retry_at_ms: int) -> Subscription:
    """DELETEs failed (the remote is down?): try them again at ``retry_at_ms``."""
    return replace(sub, delete_retry_at_ms=retry_at_ms)


def ended(sub: Subscription, reason: str) -> Subscription:
    """The room is no longer peekable (history visibility, encryption): end and DELETE."""
    after = stopping(sub)
    return replace(after, state=SubState.ENDED, wanted=False, ended_reason=reason)
