"""The observer join: a :class:`~peekproxy.services.following.RoomFollower` for rooms whose
servers lack MSC2444 (docs/observer-join.md; opt-in, ``[peeks] fallback = "observer_join"``).

peekproxy joins the room as one user of its own server name (the *observer*) and then
receives the room's events by ordinary federation (``/send`` from every server in the room,
the same ingest as MSC2444 pushes). Per candidate server (SSAPI §Joining Rooms):

1. ``GET /_matrix/federation/v1/hierarchy/{roomId}``: the room's summary must say
   ``world_readable`` and show no ``encryption`` (:func:`peekproxy.core.membership.check_summary`);
   a server without the endpoint (``M_UNRECOGNIZED``) is passed: the state after the join
   decides instead. We never join a room we may not peek.
2. ``GET /make_join/{roomId}/{userId}?ver=...`` → our join from its template, signed.
3. ``PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`` (full state: no
   ``omit_members``) → the state and auth chain, every PDU checked
   (:func:`peekproxy.core.membership.joined_room`). A state that shows the room not
   peekable after all → leave at once, 403; an answer that cannot be used → leave too; none
   at all, or a 5xx (the join may have gone through) → the leave is queued. After any of
   these no other candidate is tried, and the room is held for a while
   (:class:`peekproxy.core.membership.JoinHolds`).
4. The history before our join from ``/backfill`` (the first view, as for a peek), fetched
   while the ``send_join`` answer is checked (1 and 2 are asked at once too: make_join
   changes nothing, and the summary still decides before ``send_join``).

The following's handle is ``join:`` + our join event ID; its interval is a day, and a
renewal (every ``peeks.renewal_interval_max``) only checks that the observer is still in the
room (:meth:`ObserverJoin.renew`). :meth:`ObserverJoin.stop` leaves
(``make_leave`` + ``send_leave`` v2). How long a room nobody peeks stays joined is
``peeks.observer_linger`` (:class:`~peekproxy.services.subscriptions.Subscriptions`).
A restore joins again: what happened meanwhile is a gap.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import trio
from signedjson.key import get_verify_key
from signedjson.types import SigningKey

from peekproxy.core.membership import (
    JoinHolds,
    check_summary,
    joined_room,
    membership_event,
    template_room_version,
)
from peekproxy.core.outcomes import (
    PeekAttemptFailure,
    PeekFailureKind,
    classify_join_error,
    summarize_failures,
)
from peekproxy.core.validation import InvalidPeekResponse, ValidatedPeek
from peekproxy.federation.client import FederationClient, FederationError, RemoteError, path_segment
from peekproxy.federation.keyring import Keyring, StoredKey
from peekproxy.metrics import OBSERVER_MEMBERSHIP
from peekproxy.services import backfill
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    OBSERVER_HANDLE_PREFIX,
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
    is_observer_handle,
)
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.msc2444 import SUPPORTED_VERSIONS
from peekproxy.services.settings import LiveSettings, ObserverSettings, now_ms
from peekproxy.store import Storage

__all__ = ["JOIN_INTERVAL_MS", "JOIN_TIMEOUT_S", "ObserverJoin"]

log = logging.getLogger("peekproxy.observer")

#: An observer join does not lapse: its ``interval_ms`` is a day (a renewal only checks that
#: the observer is still in the room).
JOIN_INTERVAL_MS = 86_400_000
#: Each make_join, send_join, make_leave and send_leave request may take this long (s).
JOIN_TIMEOUT_S = 30.0

_V1 = "/_matrix/federation/v1"
_V2 = "/_matrix/federation/v2"


class _StepFailed(Exception):
    """Step ``step`` of a join failed with ``error``; ``joined``: after ``send_join`` was
    sent, so the observer may be in the room (the join was undone, or its leave queued)."""

    def __init__(self, step: str, error: Exception, *, joined: bool = False) -> None:
        super().__init__(f"{step}: {error}")
        self.step, self.error, self.joined = step, error, joined


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Any error inside becomes a :class:`_StepFailed` naming step ``name``."""
    try:
        yield
    except Exception as error:  # classified by the caller (classify_join_error)
        raise _StepFailed(name, error) from error


async def _gather(*steps: tuple[str, Awaitable[Any]]) -> tuple[Any, ...]:
    """Await ``steps`` (name, awaitable) at once; their results in order.

    Raises:
        _StepFailed: the first step, in the given order, that failed. A failed step cancels
            the steps after it (their outcome no longer matters), not those before it.
    """
    results: list[Any] = [None] * len(steps)
    errors: list[_StepFailed | None] = [None] * len(steps)
    scopes = [trio.CancelScope() for _ in steps]

    async def run(i: int, name: str, awaitable: Awaitable[Any]) -> None:
        with scopes[i]:
            try:
                results[i] = await awaitable
            except Exception as error:  # reported below, in the steps' order
                errors[i] = _StepFailed(name, error)
                for later in scopes[i + 1 :]:
                    later.cancel()

    async with trio.open_nursery() as nursery:
        for i, (name, awaitable) in enumerate(steps):
            nursery.start_soon(run, i, name, awaitable)
    for error in errors:
        if error is not None:
            raise error
    return tuple(results)


class ObserverJoin:
    """Rooms followed by joining them as the observer user (see the module docstring).

    Args:
        server_name: our server name (the observer's, and the signer of its events).
        signing_key: our current signing key.
        settings: the observer's user ID and display name.
        live: its cap on joined rooms (``max_observed_rooms``, read at each join).
    """

    def __init__(
        self,
        *,
        store: Storage,
        client: FederationClient,
        keyring: Keyring,
        missing: MissingEvents,
        server_name: str,
        signing_key: SigningKey,
        settings: ObserverSettings,
        live: LiveSettings | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.client = client
        self.keyring = keyring
        self.missing = missing
        self.server_name = server_name
        self.signing_key = signing_key
        self.settings = settings
        self.live = LiveSettings() if live is None else live
        self.clock_ms = clock_ms
        #: Rooms whose last join had to be undone: not joined again for a while.
        self.holds = JoinHolds()
        # Our own join comes back in send_join answers: its signature is checked too.
        keyring.add_trusted(
            StoredKey(
                server_name,
                f"{signing_key.alg}:{signing_key.version}",
                get_verify_key(signing_key),
                valid_until_ts=2**62,
                expired_ts=None,
                fetched_ts=clock_ms(),
            )
        )

    @property
    def user_id(self) -> str:
        return self.settings.user_id

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """Join ``room_id`` as the observer through the first candidate that lets us (steps
        1-4 of the module docstring).

        Raises:
            FollowFailed: 503 ``M_LIMIT_EXCEEDED`` when the observer is already in
                ``max_observed_rooms`` rooms; 403 when a server shows the room may not be peeked
                (not world_readable, encrypted, banned, invite-only...); 429 when every
                candidate rate-limited us; else 502/404 naming each candidate and why.
        """
        now = self.clock_ms()
        held = self.holds.held(room_id, now)
        if held is not None:
            status, why = held
            errcode = "M_FORBIDDEN" if status == 403 else "M_UNKNOWN"
            error = PeekError(status, errcode, f"the observer could not join {room_id}: {why}")
            raise FollowFailed(error, rate_limited=False, abandoned=())
        await self._check_cap(room_id)
        failures: list[PeekAttemptFailure] = []
        abandoned: list[tuple[str, str]] = []
        for server in candidates:
            try:
                followed = await self._join_through(room_id, server, abandoned)
            except _StepFailed as failed:  # every failure of one candidate is classified
                failure = classify_join_error(server, failed.step, failed.error)
                log.info("observer join of %s through %s failed: %s", room_id, server, failure)
                failures.append(failure)
                forbidden = failure.kind is PeekFailureKind.FORBIDDEN
                OBSERVER_MEMBERSHIP.labels("join", "refused" if forbidden else "failed").inc()
                if failed.joined:
                    # Room members saw a join (and a leave): not again soon, nor through
                    # another candidate now.
                    status = 403 if forbidden else 502
                    reason = f"{server}: {failure.reason}"
                    self.holds.undone(room_id, reason, status, self.clock_ms(), random.random())
                    break
                if forbidden:
                    break
            else:
                self.holds.joined(room_id)
                OBSERVER_MEMBERSHIP.labels("join", "ok").inc()
                return replace(followed, abandoned=tuple(abandoned))
        summary = summarize_failures(room_id, failures)
        text = summary.error.replace("could not peek", "the observer could not join", 1)
        if failures and all(f.kind is PeekFailureKind.RATE_LIMITED for f in failures):
            wait = max((f.retry_after_ms or 1000) for f in failures)
            raise FollowFailed(
                PeekError(429, "M_LIMIT_EXCEEDED", text, retry_after_ms=wait),
                rate_limited=True,
                abandoned=tuple(abandoned),
            )
        raise FollowFailed(
            PeekError(summary.status, summary.errcode, text),
            rate_limited=False,
            abandoned=tuple(abandoned),
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Check that the observer is still in the room: ``GET /event/{our join}`` through
        ``server``, which only a server in the room may read (a removal missed while
        peekproxy was down shows so; the request also tells the server we are back, which
        ends its back-off towards us). A 403/404: the observer is out: the room is held
        (a new join would undo a kick) and the renewal ``refused``, so the subscription's
        next follow fails with 403 and the peeks end. Other failures are retried."""
        event_id = handle.removeprefix(OBSERVER_HANDLE_PREFIX)
        try:
            await self.client.get_json(server, f"{_V1}/event/{path_segment(event_id)}")
        except RemoteError as e:
            if e.status not in (403, 404):
                return RenewalFailed(refused=False, at_ms=self.clock_ms(), error=str(e))
            log.warning("the observer is no longer in %s (%s says %s)", room_id, server, e)
            reason = f"{server}: the observer is no longer in the room"
            self.holds.undone(room_id, reason, 403, self.clock_ms(), random.random())
            return RenewalFailed(refused=True, at_ms=self.clock_ms(), error=reason)
        except FederationError as e:
            return RenewalFailed(refused=False, at_ms=self.clock_ms(), error=str(e))
        return Renewed(at_ms=self.clock_ms())

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """Leave ``room_id`` through ``server`` (``make_leave`` + ``send_leave`` v2). ``True``
        when we are out (also when the server says we are not in the room, or refuses us
        altogether: banned by its ACL, the room gone); ``False`` to try again later."""
        try:
            await self._leave(room_id, server)
        except RemoteError as e:
            if e.status in (400, 403, 404):
                log.info("observer leave of %s through %s: %s; counted as left", room_id, server, e)
                OBSERVER_MEMBERSHIP.labels("leave", "refused").inc()
                return True
            log.info("observer leave of %s through %s failed: %s; will retry", room_id, server, e)
            OBSERVER_MEMBERSHIP.labels("leave", "failed").inc()
            return False
        except (FederationError, InvalidPeekResponse) as e:
            log.info("observer leave of %s through %s failed: %s; will retry", room_id, server, e)
            OBSERVER_MEMBERSHIP.labels("leave", "failed").inc()
            return False
        log.info("observer left %s through %s", room_id, server)
        OBSERVER_MEMBERSHIP.labels("leave", "ok").inc()
        return True

    async def _check_cap(self, room_id: str) -> None:
        subs = await self.store.read(lambda tx: tx.load_subscriptions())
        joined = {s.room_id for s in subs if is_observer_handle(s.peek_id) and s.room_id != room_id}
        if len(joined) >= self.live.max_observed_rooms:
            raise FollowFailed(
                PeekError(
                    503,
                    "M_LIMIT_EXCEEDED",
                    f"the observer is already in {len(joined)} rooms "
                    "(peeks.max_observed_rooms); try again later",
                ),
                rate_limited=False,
                abandoned=(),
            )

    async def _join_through(
        self, room_id: str, server: str, abandoned: list[tuple[str, str]]
    ) -> Followed:
        """Steps 1-4 of the module docstring through ``server``. A leave that could not be
        done now goes to ``abandoned`` (the subscription retries it, backing off).

        Raises:
            _StepFailed: naming the step and its error.
        """
        room = path_segment(room_id)
        # The summary and the template are asked at once (make_join changes nothing); the
        # summary decides before anything is sent.
        _, template = await _gather(
            ("hierarchy", self._check_summary(server, room)),
            ("make_join", self._template(server, room)),
        )
        with _step("make_join"):
            version, event_id, join = self._our_event(template, room_id, "join")
        handle = OBSERVER_HANDLE_PREFIX + event_id
        try:
            answer = await self.client.put_json(
                server,
                f"{_V2}/send_join/{room}/{path_segment(event_id)}",
                join,
                timeout=JOIN_TIMEOUT_S,
            )
        except RemoteError as e:
            if e.status < 500:
                raise _StepFailed("send_join", e) from e  # refused: we are not in the room
            # A 5xx (a proxy's 502/504, or the server failing after storing the join) or
            # no answer at all: the join may have gone through. The leave is queued, not
            # sent at once, so that it does not overtake a join still being handled.
            abandoned.append((server, handle))
            raise _StepFailed("send_join", e, joined=True) from e
        except FederationError as e:
            abandoned.append((server, handle))
            raise _StepFailed("send_join", e, joined=True) from e
        try:
            # The history before our join is fetched while the answer is checked.
            snapshot, history = await _gather(
                ("send_join", self._joined(answer, room_id, version, event_id, join)),
                (
                    "backfill",
                    backfill.first_view(
                        self.store,
                        self.client,
                        self.keyring,
                        room_id,
                        server,
                        event_id,
                        version,
                    ),
                ),
            )
        except _StepFailed as failed:
            # We are in the room but cannot follow it (RoomNotPeekable: may not).
            log.warning("observer in %s through %s, leaving: %s", room_id, server, failed)
            if not await self.stop(room_id, server, handle):
                abandoned.append((server, handle))
            failed.joined = True
            raise
        log.info("observer joined %s through %s (room version %s)", room_id, server, version)
        return Followed(
            server=server,
            handle=handle,
            interval_ms=JOIN_INTERVAL_MS,
            at_ms=self.clock_ms(),
            snapshot=snapshot,
            history=history,
        )

    async def _check_summary(self, server: str, room: str) -> None:
        """Check the room's summary (``GET /hierarchy``; a server without it passes: the
        state after the join decides).

        Raises:
            RoomNotPeekable: the summary shows a room that may not be peeked.
            InvalidPeekResponse, FederationError: no usable summary.
        """
        try:
            summary = await self.client.get_json(server, f"{_V1}/hierarchy/{room}")
        except RemoteError as e:
            if e.errcode != "M_UNRECOGNIZED":
                raise  # 404: the server does not show us the room (unknown, or private)
            return
        check_summary(summary)

    async def _template(self, server: str, room: str) -> Any:
        return await self.client.get_json(
            server,
            f"{_V1}/make_join/{room}/{path_segment(self.user_id)}",
            query={"ver": SUPPORTED_VERSIONS},
            timeout=JOIN_TIMEOUT_S,
        )

    async def _joined(
        self, answer: Any, room_id: str, version: str, event_id: str, join: dict[str, Any]
    ) -> ValidatedPeek:
        if not isinstance(answer, dict):
            raise InvalidPeekResponse("the send_join answer is not a JSON object")
        pdus = [
            p
            for key in ("state", "auth_chain")
            if isinstance(answer.get(key), list)
            for p in answer[key]
            if isinstance(p, dict)
        ]
        await self.missing.signer_keys(pdus, version)
        # ~0.2 ms a PDU (mostly ed25519): in a thread, so that the event loop (other rooms'
        # /send, devices' /sync) is not held up by a big room's state (a 10,000-member room
        # would hold it ~2 s), and the first view's /backfill goes on meanwhile.
        return await trio.to_thread.run_sync(
            functools.partial(
                joined_room,
                answer,
                room_id=room_id,
                room_version=version,
                join_event_id=event_id,
                join_event=join,
                keys=self.keyring.lookup,
            )
        )

    def _our_event(
        self, template: Any, room_id: str, membership: str
    ) -> tuple[str, str, dict[str, Any]]:
        """(room version, event ID, signed PDU) of the observer's ``membership`` (join, with
        its display name, or leave) from a make_join / make_leave answer.

        Raises:
            InvalidTemplate: the answer cannot be used.
        """
        version = template_room_version(template, SUPPORTED_VERSIONS)
        event_id, pdu = membership_event(
            template,
            room_id=room_id,
            user_id=self.user_id,
            membership=membership,
            server_name=self.server_name,
            signing_key=self.signing_key,
            now_ms=self.clock_ms(),
            displayname=self.settings.displayname if membership == "join" else None,
        )
        return version, event_id, pdu

    async def _leave(self, room_id: str, server: str) -> None:
        room = path_segment(room_id)
        template = await self.client.get_json(
            server,
            f"{_V1}/make_leave/{room}/{path_segment(self.user_id)}",
            timeout=JOIN_TIMEOUT_S,
        )
        _, event_id, leave = self._our_event(template, room_id, "leave")
        await self.client.put_json(
            server,
            f"{_V2}/send_leave/{room}/{path_segment(event_id)}",
            leave,
            timeout=JOIN_TIMEOUT_S,
        )
