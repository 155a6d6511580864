"""The merged ``/sync`` of front mode: the homeserver's answer plus the device's peeked rooms
(MSC2753 ``rooms.peek`` in the client-server API's ``GET /sync``; docs/front.md).

:meth:`FrontSync.sync` forwards the client's request to the homeserver as it came (query string,
access token, ``X-Forwarded-For``), bounded by the client's ``timeout`` plus the homeserver client's
``timeout_s`` (config ``upstream.timeout``), and waits for the device's peek news
(:meth:`Syncing.sync`) in parallel. The answer goes out as soon as either side has something: the
homeserver first → the peek part as it is now (``timeout=0``); peek news first → the homeserver's
long-poll is cancelled and asked again with ``timeout=0`` (same ``since``). The merge rules are
:mod:`peekproxy.core.front_sync`.

Tokens (docs/front.md, "Tokens and outages"): the client only ever holds the homeserver's
``next_batch`` tokens. Per device, each one handed out is saved (as its sha256) with the peek
stream position it stands for, before the answer leaves; a ``since`` found there continues
the peek part from that position, one not found (the client synced at the homeserver while
peekproxy was down) continues from the device's newest saved position, no ``since`` is an
initial peek section. A device whose peek part can show nothing from its newest saved
position on (:meth:`Syncing.quiet_position`: it never peeked, or its peeks ended, their
``leave`` delivered, or were joined) has no token saved, and one that never peeked starts from
the newest position without a read: most devices syncing through the front never peek.

Shutdown (SIGTERM, :meth:`Notifier.drain`): a long-poll still waiting for both sides, or one
that comes in during the drain, is answered at once with nothing new and its own ``since``
as ``next_batch`` (:func:`~peekproxy.core.front_sync.drained_answer`); the homeserver's
pending long-poll is cancelled.

A room in the homeserver's ``rooms.join`` that the user peeks: the user's peeks of it end
without a ``rooms.leave`` entry (:meth:`Syncing.end_joined`) and it leaves this answer's peek
section. Any fault in peekproxy's own part degrades to the homeserver's answer alone (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import trio

from peekproxy.core.front_sync import (
    DEFAULT_TIMELINE_LIMIT,
    drained_answer,
    encode_answer,
    filter_timeline_limit,
    has_news,
    is_inline_filter,
    joined_rooms,
    json_object,
    merge_sync,
    sync_answer,
    token_hash,
    without_wait,
)
from peekproxy.core.sync import decode_token, encode_token
from peekproxy.homeserver.client import HomeserverUnavailable
from peekproxy.metrics import FRONT_DEGRADED, FRONT_SYNCS
from peekproxy.outage import OUTAGE, store_unavailable_in
from peekproxy.services.passthrough import ClientRequest, Passthrough, UpstreamAnswer
from peekproxy.services.settings import now_ms
from peekproxy.services.syncing import Syncing
from peekproxy.store import Storage

__all__ = ["FrontSync", "FrontSyncRequest"]

log = logging.getLogger("peekproxy.front")

#: Longest wait for peek news, ms (as the delegation API's ``/sync``).
MAX_TIMEOUT_MS = 300_000
#: The Content-Type of the answers built here.
JSON = "application/json"
#: Seconds a filter fetch may take.
FILTER_TIMEOUT_S = 10.0
_FAULT = "the front's own part of a /sync failed (%s): the homeserver's answer goes out alone"
#: Filters kept in memory before the cache is emptied (filters are immutable).
_FILTER_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class FrontSyncRequest:
    """One client ``/sync`` in front mode: the request as it came (``client``), whose it is
    (``user_id``, ``device_id``, from the token) and what peekproxy reads of its query:
    ``since`` (a homeserver token), ``timeout_ms`` (ms, clamped to 0–300,000),
    ``full_state``, ``filter`` (inline JSON or a filter ID)."""

    client: ClientRequest
    user_id: str
    device_id: str
    since: str | None
    timeout_ms: int
    full_state: bool
    filter: str | None


class FrontSync:
    """The merged ``/sync`` (see the module docstring).

    Args:
        passthrough: forwards to the homeserver.
        syncing: the device's peek part (``Syncing.sync``) and the end of joined peeks.
        store: the token → position records.
        section: the peek section's name (config ``peeks.sync_section``).
    """

    def __init__(
        self,
        *,
        passthrough: Passthrough,
        syncing: Syncing,
        store: Storage,
        section: str,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.passthrough = passthrough
        self.syncing = syncing
        self.store = store
        self.section = section
        self.clock_ms = clock_ms
        self._filters: dict[tuple[str, str], int] = {}
        #: The last (token hash, position) saved per device (as in the store): an unchanged
        #: pair is not written again, and the next sync's ``since`` is usually this token.
        self._saved: dict[tuple[str, str], tuple[str, int]] = {}

    async def sync(self, request: FrontSyncRequest) -> UpstreamAnswer:
        """The client's ``/sync`` answer: the homeserver's, with the peek part merged in when
        there is peek news (else the homeserver's bytes, status and ``Content-Type``
        untouched). A homeserver answer other than 200 comes back verbatim.

        Raises:
            HomeserverUnavailable: the homeserver cannot be reached or did not answer within
                the client's timeout plus ``upstream.timeout`` (the API answers 502).
        """
        timeout_ms = max(0, min(request.timeout_ms, MAX_TIMEOUT_MS))
        # The homeserver keeps the client's own timeout, which may be longer than ours.
        margin_s = self.passthrough.homeserver.timeout_s
        bound_s = max(0, request.timeout_ms) / 1000 + margin_s
        try:
            since_pos = await self._start_position(request)
        except Exception as e:
            _degraded(e, "reading the device's position")
            return await self.passthrough.forward(request.client, timeout_s=bound_s)
        limit = await self._own_part(self._timeline_limit, request, default=DEFAULT_TIMELINE_LIMIT)
        since_token = encode_token(since_pos) if since_pos is not None else None
        # Race only a long-poll: an initial sync or a timeout=0 sync comes back at once.
        race = request.since is not None and timeout_ms > 0 and not request.full_state
        homeserver: UpstreamAnswer | None = None
        peek: dict[str, Any] | None = None
        failure: HomeserverUnavailable | None = None
        drained = False
        async with trio.open_nursery() as nursery:

            async def answer_on_drain() -> None:
                nonlocal drained
                await self.syncing.notifier.wait_drain()
                drained = True
                nursery.cancel_scope.cancel()

            async def ask_homeserver() -> None:
                nonlocal homeserver, failure
                try:
                    homeserver = await self.passthrough.forward(request.client, timeout_s=bound_s)
                except HomeserverUnavailable as e:
                    failure = e
                nursery.cancel_scope.cancel()

            async def wait_for_peeks() -> None:
                nonlocal peek
                news = await self._own_part(
                    self._peek_news, request, since_token, limit, timeout_ms, default=None
                )
                if news is not None and has_news(news, self.section):
                    peek = news
                    nursery.cancel_scope.cancel()

            nursery.start_soon(ask_homeserver)
            if race:
                nursery.start_soon(wait_for_peeks)
                nursery.start_soon(answer_on_drain)
        if drained and homeserver is None and failure is None and request.since is not None:
            FRONT_SYNCS.labels("drained").inc()
            return UpstreamAnswer(200, encode_answer(drained_answer(request.since)), JSON)
        if failure is not None:
            FRONT_SYNCS.labels("unavailable").inc()
            raise failure
        if homeserver is None:  # peek news came first: the homeserver's answer, now
            homeserver = await self.passthrough.forward(
                request.client, query=without_wait(request.client.query), timeout_s=bound_s
            )
        return await self._answer(request, homeserver, peek, since_token, since_pos, limit)

    async def _answer(
        self,
        request: FrontSyncRequest,
        homeserver: UpstreamAnswer,
        peek: dict[str, Any] | None,
        since_token: str | None,
        since_pos: int | None,
        limit: int,
    ) -> UpstreamAnswer:
        if homeserver.status != 200:
            FRONT_SYNCS.labels("homeserver_error").inc()
            return homeserver
        parsed = sync_answer(homeserver.body)
        if parsed is None:
            log.warning("the homeserver's /sync answer is not a sync response: passed on as is")
            FRONT_SYNCS.labels("homeserver").inc()
            return homeserver
        body, next_batch = parsed
        joined = joined_rooms(body)
        if joined:
            await self._own_part(self.syncing.end_joined, request.user_id, joined, default=None)
        if peek is None:
            peek = await self._own_part(
                self._peek_news, request, since_token, limit, 0, default=None
            )
        position = since_pos
        if peek is not None:
            position = decode_token(peek["next_batch"])
        if position is not None:
            await self._own_part(self._save, request, next_batch, position, default=None)
        if peek is None or not has_news(peek, self.section, joined):
            FRONT_SYNCS.labels("homeserver").inc()
            return homeserver
        FRONT_SYNCS.labels("merged").inc()
        merged = merge_sync(body, peek, section=self.section, drop=joined)
        return UpstreamAnswer(200, encode_answer(merged), JSON)

    async def _own_part(self, fn: Callable[..., Any], *args: Any, default: Any) -> Any:
        """``await fn(*args)``; any fault in it (peekproxy's own part of the sync) is logged
        and gives ``default``: the client still gets the homeserver's answer. The homeserver
        failing a request of this part (a filter read) is one warning line: its fault, not a
        traceback of ours."""
        try:
            return await fn(*args)
        except HomeserverUnavailable as e:
            log.warning(_FAULT + ": %s", getattr(fn, "__name__", fn), e)
            return default
        except Exception as e:
            _degraded(e, getattr(fn, "__name__", fn))
            return default

    async def _start_position(self, request: FrontSyncRequest) -> int | None:
        """The peek stream position the client's ``since`` stands for (see the module
        docstring); ``None``: an initial peek section."""
        user_id, device_id = request.user_id, request.device_id
        if request.since is None:
            return None
        key = token_hash(request.since)
        last = self._saved.get((user_id, device_id))
        if last is not None and last[0] == key:
            return last[1]  # the token this device got last (the usual case): no read
        never_peeked = self.syncing.quiet_position(user_id, device_id, None)
        if never_peeked is not None:
            return never_peeked  # nothing to show from any position: no read

        def read(tx: Any) -> int | None:
            found: int | None = tx.front_position(user_id, device_id, key)
            if found is None:
                found = tx.newest_front_position(user_id, device_id)
            return found

        return await self.store.read(read)

    async def _peek_news(
        self, request: FrontSyncRequest, since: str | None, limit: int, timeout_ms: int
    ) -> dict[str, Any]:
        """The device's peek sync once it has news, or at the deadline (without; at once
        for ``timeout_ms`` 0, or once the daemon drains)."""
        deadline = trio.current_time() + timeout_ms / 1000
        token = since
        while True:
            remaining = max(0, int((deadline - trio.current_time()) * 1000))
            answer = await self.syncing.sync(
                request.user_id,
                request.device_id,
                since=token,
                timeout_ms=remaining,
                full_state=request.full_state,
                timeline_limit=limit,
            )
            if remaining == 0 or has_news(answer, self.section) or self.syncing.notifier.draining:
                return answer  # (draining: the sync above answers at once, so not again)
            token = answer["next_batch"]  # a change with nothing to show: wait on from there

    async def _save(self, request: FrontSyncRequest, next_batch: str, position: int) -> None:
        device = (request.user_id, request.device_id)
        saved = (token_hash(next_batch), position)
        if self._saved.get(device) == saved:
            return
        last = self._saved.get(device)
        if self.syncing.quiet_position(*device, last[1] if last else None) is not None:
            # Its peek part shows nothing from the newest saved position on (it never
            # peeked, or its peeks ended and their leave went out): a token not found
            # continues from there, and a peek started later is shown afresh.
            return
        now = self.clock_ms()
        await self.store.write(lambda tx: tx.save_front_position(*device, saved[0], position, now))
        self._saved[device] = saved

    async def _timeline_limit(self, request: FrontSyncRequest) -> int:
        """The peek section's timeline limit from the client's filter: inline JSON, or a
        filter ID read with the client's token (``GET /_matrix/client/v3/user/{userId}/
        filter/{filterId}``, cached per user and ID: filters are immutable)."""
        given = request.filter
        if given is None:
            return DEFAULT_TIMELINE_LIMIT
        if is_inline_filter(given):
            return filter_timeline_limit(json_object(given))
        key = (request.user_id, given)
        cached = self._filters.get(key)
        if cached is not None:
            return cached
        response = await self.passthrough.homeserver.request(
            "GET",
            f"/_matrix/client/v3/user/{quote(request.user_id, safe='')}/filter/"
            f"{quote(given, safe='')}",
            token=request.client.token,
            timeout_s=min(FILTER_TIMEOUT_S, self.passthrough.homeserver.timeout_s),
        )
        if response.status_code != 200:
            return DEFAULT_TIMELINE_LIMIT  # the homeserver's /sync will say what is wrong
        limit = filter_timeline_limit(json_object(response.content))
        if len(self._filters) >= _FILTER_CACHE_SIZE:
            self._filters.clear()
        self._filters[key] = limit
        return limit


def _degraded(error: Exception, part: object) -> None:
    """A fault in the front's own ``part`` of a sync (``peekproxy_front_degraded``): the
    database unreachable is noted once per outage (:data:`peekproxy.outage.OUTAGE`, no
    traceback); anything else is logged with its traceback."""
    FRONT_DEGRADED.inc()
    unavailable = store_unavailable_in(error)
    if unavailable is not None:
        OUTAGE.failed(f"the front's /sync ({part})", unavailable)
    else:
        log.exception(_FAULT, part)
