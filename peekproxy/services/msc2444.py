"""The MSC2444 peek: the one :class:`~peekproxy.services.following.RoomFollower` today.

``PUT /_matrix/federation/v1/peek/{roomId}/{peekId}?ver=...`` through the candidate servers
(MSC2444 §Peeking; a 429 waited out once if short, a server that lacks the endpoint skipped
for an hour), the answer validated (:func:`peekproxy.core.validation.validate_peek_response`,
every PDU through :func:`peekproxy.core.pdu.check_pdu` with its signers' keys) and the newest
history before its latest event fetched by ``/backfill`` (the first view). A renewal re-PUTs
the same peek ID; a full renewal reply ahead of the stored room brings the events between
(``get_missing_events``). ``DELETE`` of the same path ends a peek.

The peek ID is the following's ``handle``; the remote ``renewal_interval`` its
``interval_ms``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from peekproxy.core.events import event_refs
from peekproxy.core.outcomes import (
    PeekAttemptFailure,
    PeekFailureKind,
    classify_peek_error,
    new_peek_id,
    summarize_failures,
)
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, room_version
from peekproxy.core.unsupported import UnsupportedServers
from peekproxy.core.validation import (
    InvalidPeekResponse,
    ValidatedPeek,
    is_empty_renewal,
    peek_response_pdus,
    response_room_version,
    validate_peek_response,
)
from peekproxy.federation.client import FederationClient, FederationError, RemoteError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.logs import bind_log_fields
from peekproxy.services import backfill
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    Fetched,
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
)
from peekproxy.services.missing_events import MissingEvents
from peekproxy.services.settings import now_ms
from peekproxy.store import Storage

__all__ = ["PEEK_PUT_TIMEOUT_S", "RATE_LIMIT_WAIT_MAX_MS", "SUPPORTED_VERSIONS", "Msc2444Peeks"]

log = logging.getLogger("peekproxy.peeks")

SUPPORTED_VERSIONS = sorted(KNOWN_ROOM_VERSIONS, key=int)
RATE_LIMIT_WAIT_MAX_MS = 10_000
#: One candidate may hold a new peek up this long (the room is locked meanwhile).
PEEK_PUT_TIMEOUT_S = 15.0


def _peek_path(room_id: str, peek_id: str) -> str:
    return f"/_matrix/federation/v1/peek/{path_segment(room_id)}/{path_segment(peek_id)}"


class Msc2444Peeks:
    """Remote rooms followed by MSC2444 peeks (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Storage,
        client: FederationClient,
        keyring: Keyring,
        missing: MissingEvents,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.client = client
        self.keyring = keyring
        self.missing = missing
        self.clock_ms = clock_ms
        #: Servers that showed they lack MSC2444: skipped by :meth:`follow` for an hour.
        self.unsupported = UnsupportedServers()

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """PUT a new peek through the candidates, validate the answer and fetch the history
        before its latest event.

        Raises:
            FollowFailed: every candidate failed (the summary names each and why).
        """
        failures: list[PeekAttemptFailure] = []
        abandoned: list[tuple[str, str]] = []
        for server in candidates:
            skipped = self.unsupported.skip(server, self.clock_ms())
            if skipped is not None:
                failures.append(skipped)  # still named in the device's error
                continue
            for attempt in (1, 2):
                peek_id = new_peek_id()
                bind_log_fields(destination=server, peek_id=peek_id)
                try:
                    body = await self.client.put_json(
                        server,
                        _peek_path(room_id, peek_id),
                        {},
                        timeout=PEEK_PUT_TIMEOUT_S,
                        query={"ver": SUPPORTED_VERSIONS},
                    )
                except Exception as error:
                    failure = classify_peek_error(server, error)
                    wait = failure.retry_after_ms
                    if (
                        failure.kind is PeekFailureKind.RATE_LIMITED
                        and attempt == 1
                        and wait is not None
                        and wait <= RATE_LIMIT_WAIT_MAX_MS
                    ):
                        await trio.sleep(wait / 1000)
                        continue
                    failures.append(failure)
                    self.unsupported.record(failure, self.clock_ms())
                    break
                try:
                    validated = await self._validate(body, room_id)
                except InvalidPeekResponse as e:
                    log.warning("invalid peek response from %s for %s: %s", server, room_id, e)
                    failures.append(classify_peek_error(server, e))
                    abandoned.append((server, peek_id))
                    break
                now = self.clock_ms()
                return Followed(
                    server=server,
                    handle=peek_id,
                    interval_ms=validated.renewal_interval_ms,
                    at_ms=now,
                    snapshot=validated,
                    history=await backfill.first_view(
                        self.store,
                        self.client,
                        self.keyring,
                        room_id,
                        server,
                        validated.latest_event_id,
                        validated.room_version,
                    ),
                    abandoned=tuple(abandoned),
                )
            if failures and failures[-1].kind is PeekFailureKind.FORBIDDEN:
                break
        summary = summarize_failures(room_id, failures)
        if failures and all(f.kind is PeekFailureKind.RATE_LIMITED for f in failures):
            wait = max((f.retry_after_ms or 1000) for f in failures)
            raise FollowFailed(
                PeekError(429, "M_LIMIT_EXCEEDED", summary.error, retry_after_ms=wait),
                rate_limited=True,
                abandoned=tuple(abandoned),
            )
        raise FollowFailed(
            PeekError(summary.status, summary.errcode, summary.error),
            rate_limited=False,
            abandoned=tuple(abandoned),
        )

    def lacks_msc2444(self, server: str) -> bool:
        """Whether ``server`` showed lately that it has no MSC2444 endpoint (it is then
        skipped for an hour: :class:`~peekproxy.core.unsupported.UnsupportedServers`)."""
        return self.unsupported.skip(server, self.clock_ms()) is not None

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Re-PUT the peek ``handle``: ``{}`` renews it; a full reply (Dendrite always
        answers so) is validated and brings the events between our newest ones and its
        latest event. A 400/403/404 means the peek lapsed (``refused``)."""
        peek_id = handle
        try:
            body = await self.client.put_json(
                server, _peek_path(room_id, peek_id), {}, query={"ver": SUPPORTED_VERSIONS}
            )
        except Exception as error:
            refused = isinstance(error, RemoteError) and error.status in (400, 403, 404)
            log.warning(
                "renewal of %s through %s failed%s: %s",
                room_id,
                server,
                " (peek lapsed)" if refused else "",
                error,
            )
            return RenewalFailed(refused=refused, at_ms=self.clock_ms(), error=str(error))
        now = self.clock_ms()
        if is_empty_renewal(body):
            return Renewed(at_ms=now)
        try:
            validated = await self._validate(body, room_id)
        except InvalidPeekResponse as e:
            log.warning("invalid renewal reply from %s for %s: %s", server, room_id, e)
            return RenewalFailed(refused=True, at_ms=now, error=f"invalid renewal reply: {e}")
        # A full reply to a live renewal (Dendrite always answers so) is not a lapse: what
        # lies between our newest events and its latest event is fetched, not skipped.
        fill = await self._renewal_fill(server, room_id, validated)
        return Renewed(
            at_ms=now, interval_ms=validated.renewal_interval_ms, snapshot=validated, fill=fill
        )

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """DELETE the peek ``handle``; a 404 means it is gone already."""
        peek_id = handle
        try:
            await self.client.request("DELETE", server, _peek_path(room_id, peek_id))
        except FederationError as e:
            if not (isinstance(e, RemoteError) and e.status == 404):  # 404: already gone
                log.info(
                    "DELETE of peek %s of %s at %s failed: %s; will retry",
                    peek_id,
                    room_id,
                    server,
                    e,
                )
                return False
        return True

    async def _validate(self, body: Any, room_id: str) -> ValidatedPeek:
        if not isinstance(body, dict):
            raise InvalidPeekResponse("response is not a JSON object")
        version = response_room_version(body)
        await self.missing.signer_keys(peek_response_pdus(body), version)
        return validate_peek_response(
            body, room_id=room_id, supported_versions=SUPPORTED_VERSIONS, keys=self.keyring.lookup
        )

    async def _renewal_fill(
        self, server: str, room_id: str, validated: ValidatedPeek
    ) -> list[Fetched]:
        """The events between our newest stored ones and a full renewal reply's latest
        event (``get_missing_events`` from ``server``); none when we hold that event."""
        latest = validated.latest_event_id
        prevs = event_refs(validated.events[latest].get("prev_events"))
        known = await self.store.read(lambda tx: tx.known_event_ids(event_ids=[latest, *prevs]))
        if latest in known or all(p in known for p in prevs):
            return []
        fill = await self.missing.fetch(
            server, room_id, [latest], room_version(validated.room_version), known=known
        )
        log.info(
            "renewal reply for %s is ahead of us: fetched %d events before its latest event",
            room_id,
            len(fill),
        )
        return fill
