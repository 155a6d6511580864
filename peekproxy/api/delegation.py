"""The delegation API for homeservers that integrate natively (``/_peekproxy/v1``).

Authenticated by ``Authorization: Bearer <delegation.shared_secret_file>`` plus ``user_id``
and ``device_id`` query parameters naming the device the call is for.

* ``POST /_peekproxy/v1/peek/{roomIdOrAlias}`` — hints as repeated ``server_name`` query
  parameters and/or a body ``servers`` list; answers ``{"room_id": ...}``.
* ``POST /_peekproxy/v1/peek_room`` — body ``{"room": ..., "servers": [...]}``; answers
  ``{"room_id": ..., "peek_expiry_ts": ...}`` (protocol.md decision 5).
* ``POST /_peekproxy/v1/rooms/{roomId}/unpeek`` — answers ``{}``.
* ``GET /_peekproxy/v1/sync?since=&timeout=&full_state=&filter=`` — the device's
  ``{next_batch, rooms: {peek, leave}}`` (MSC2753), long-polling up to ``timeout`` ms.
* ``GET /_peekproxy/v1/rooms/{roomId}/messages?from=&to=&dir=&limit=`` — the room's history;
  a backward page that meets a gap runs one ``/backfill`` round at the remote and stores
  what it fetched keyed to the gap (:class:`peekproxy.services.reads.HistoryReads`).
* ``GET /_peekproxy/v1/rooms/{roomId}/state`` and ``.../event/{eventId}``.

The read endpoints need an active peek of the room by the device (else 403). Starting peeks
(``peek`` and ``peek_room``) is rate-limited per user (token bucket). Errors follow
protocol.md decisions 6 and 7; ``docs/delegation-api.md`` has the whole contract.

Routes only route: each handler of :class:`DelegationApi` authenticates the device, parses
its input (:mod:`peekproxy.api.delegation_params`), calls one service method and shapes the
answer. Services raise :class:`peekproxy.services.errors.PeekError`, which
:func:`peekproxy.api.errors.exception_handlers` turns into Matrix error JSON. The same
handlers serve the MSC2753 client prefixes in front mode (``auth``: access tokens).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.admin import AdminApi
from peekproxy.api.delegation_params import (
    TokenBucket,
    check_hints,
    device_params,
    messages_params,
    peek_body,
    peek_room_body,
    room_id_param,
    sync_params,
)
from peekproxy.api.errors import MatrixError
from peekproxy.api.federation_auth import read_json_body
from peekproxy.logs import bind_log_fields
from peekproxy.metrics import LONG_POLLS_IN_FLIGHT
from peekproxy.services.assembly import Services
from peekproxy.services.reads import HistoryReads
from peekproxy.services.settings import LiveSettings
from peekproxy.services.syncing import Syncing

__all__ = ["DelegationApi", "delegation_routes"]

#: Resolves a request's client access token to (user ID, device ID) (front mode).
DeviceAuth = Callable[[Request], Awaitable[tuple[str, str]]]


async def _body_of(request: Request) -> Any:
    """The request's JSON body; no body: ``{}``."""
    body = await read_json_body(request, optional=True)
    return {} if body is None else body


class DelegationApi:
    """The handlers of the delegation API (and of the MSC2753 client endpoints).

    Args:
        syncing: starts and ends device peeks, answers ``/sync``.
        reads: answers ``/messages``, ``/state`` and ``/event``, and whether a device peeks
            a room.
        live: the delegation shared secret (``delegation_secret``; ``None``: the
            bearer-secret API is off, 403) and how fast each user may start peeks
            (``rate_limit_per_second`` / ``rate_limit_burst``), read at each request, so a
            reload (SIGHUP) changes them at once.
        auth: in front mode, resolves client access tokens instead of the secret.
    """

    def __init__(
        self,
        syncing: Syncing,
        reads: HistoryReads,
        *,
        live: LiveSettings,
        auth: DeviceAuth | None = None,
    ) -> None:
        self.syncing = syncing
        self.reads = reads
        self.live = live
        self.auth = auth
        self.limiter = TokenBucket(live.rate_limit_per_second, live.rate_limit_burst)
        #: The last /sync answer encoded, and the (shared, read-only) answer it encodes:
        #: the devices one change wakes get the same answer object, encoded once.
        self._encoded: tuple[dict[str, Any], bytes] | None = None

    # -- authentication --------------------------------------------------------------------

    async def device(self, request: Request) -> tuple[str, str]:
        """(user ID, device ID) the request is for (bound to the request's log records).

        Raises:
            MatrixError: 403 ``M_FORBIDDEN`` (API off), 401 ``M_UNKNOWN_TOKEN`` (wrong
                secret), 400 (see :func:`device_params`), or what ``auth`` raises.
        """
        if self.auth is not None:  # client access tokens (front mode)
            user_id, device_id = await self.auth(request)
        else:
            self.check_secret(request, off_status=403, off_errcode="M_FORBIDDEN")
            user_id, device_id = device_params(request.query_params.getlist)
        bind_log_fields(user_id=user_id, device_id=device_id)
        return user_id, device_id

    def check_secret(self, request: Request, *, off_status: int, off_errcode: str) -> None:
        """Check ``Authorization: Bearer <delegation secret>``.

        Raises:
            MatrixError: ``off_status`` ``off_errcode`` when no secret is configured (the
                bearer-secret API is off); 401 ``M_UNKNOWN_TOKEN`` for a missing or wrong one.
        """
        secret = self.live.delegation_secret
        if secret is None:
            raise MatrixError(
                off_status,
                off_errcode,
                "the delegation API is off: set delegation.shared_secret_file",
            )
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {secret}".encode()):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "missing or wrong delegation secret")

    async def peeked_room(self, request: Request) -> str:
        """The ``{room_id}`` of a read, which the request's device must be peeking.

        Raises:
            MatrixError: as :meth:`device`; 400 ``M_INVALID_PARAM`` for a bad room ID;
                403 ``M_FORBIDDEN`` when the device is not peeking the room.
        """
        user_id, device_id = await self.device(request)
        room_id = room_id_param(request.path_params["room_id"])
        bind_log_fields(room_id=room_id)
        if not await self.reads.is_peeking(user_id, device_id, room_id):
            raise MatrixError(403, "M_FORBIDDEN", f"this device is not peeking {room_id}")
        return room_id

    def rate_limit(self, user_id: str, hints: Sequence[str]) -> None:
        """Check the hints, then take one of the user's peek-start tokens (a bad hint spends
        none).

        Raises:
            MatrixError: 400 ``M_INVALID_PARAM`` (a hint is not a server name); 429
                ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``.
        """
        check_hints(hints)  # before any lookup, and before a rate-limit token is spent
        limits = (self.live.rate_limit_per_second, self.live.rate_limit_burst)
        if limits != (self.limiter.rate, self.limiter.burst):  # changed by a reload
            self.limiter.set_limits(*limits)
        wait = self.limiter.take(user_id)
        if wait is not None:
            raise MatrixError(
                429,
                "M_LIMIT_EXCEEDED",
                f"too many peeks started; retry in {wait} ms",
                retry_after_ms=wait,
            )

    # -- peeks -----------------------------------------------------------------------------

    async def peek(self, request: Request) -> Response:
        user_id, device_id = await self.device(request)
        body = peek_body(await _body_of(request))
        hints = [*request.query_params.getlist("server_name"), *body.servers]
        self.rate_limit(user_id, hints)
        room = request.path_params["room"]
        room_id = await self.syncing.peek(user_id, device_id, room, hints)
        return JSONResponse({"room_id": room_id})

    async def peek_room(self, request: Request) -> Response:
        user_id, device_id = await self.device(request)
        body = peek_room_body(await _body_of(request))
        hints = [*request.query_params.getlist("server_name"), *body.servers]
        self.rate_limit(user_id, hints)
        room_id, expiry = await self.syncing.peek_with_expiry(user_id, device_id, body.room, hints)
        return JSONResponse({"room_id": room_id, "peek_expiry_ts": expiry})

    async def unpeek(self, request: Request) -> Response:
        user_id, device_id = await self.device(request)
        await _body_of(request)
        await self.syncing.unpeek(user_id, device_id, request.path_params["room_id"])
        return JSONResponse({})

    async def sync(self, request: Request) -> Response:
        user_id, device_id = await self.device(request)
        params = sync_params(request.query_params)
        with LONG_POLLS_IN_FLIGHT["delegation"]:
            answer = await self.syncing.sync(
                user_id,
                device_id,
                since=params.since,
                timeout_ms=params.timeout_ms,
                full_state=params.full_state,
                timeline_limit=params.timeline_limit,
            )
        return Response(self._encode(answer), media_type="application/json")

    def _encode(self, answer: dict[str, Any]) -> bytes:
        """The JSON body of a /sync answer (as JSONResponse renders it), reused while the
        same answer object comes back (:meth:`Syncing.sync` shares one between woken devices
        and never changes it)."""
        encoded = self._encoded
        if encoded is None or encoded[0] is not answer:
            encoded = self._encoded = (answer, bytes(JSONResponse(answer).body))
        return encoded[1]

    # -- reads -----------------------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        return await self.messages_of(request, await self.peeked_room(request))

    async def state(self, request: Request) -> Response:
        return await self.state_of(request, await self.peeked_room(request))

    async def event(self, request: Request) -> Response:
        return await self.event_of(request, await self.peeked_room(request))

    # The reads of a room whose peek by the request's device is already checked (front
    # mode's history routes check it once, to choose between these and the homeserver).

    async def messages_of(self, request: Request, room_id: str) -> Response:
        params = messages_params(request.query_params)
        page = await self.reads.messages(
            room_id,
            from_point=params.from_point,
            to_point=params.to_point,
            direction=params.direction,
            limit=params.limit,
        )
        answer: dict[str, Any] = {"chunk": page.chunk, "start": page.start}
        if page.end is not None:
            answer["end"] = page.end
        return JSONResponse(answer)

    async def state_of(self, request: Request, room_id: str) -> Response:
        return JSONResponse(await self.reads.state(room_id))

    async def event_of(self, request: Request, room_id: str) -> Response:
        return JSONResponse(await self.reads.event(room_id, request.path_params["event_id"]))

    def routes(self, prefixes: Sequence[str], *, with_sync: bool = True) -> list[Route]:
        """The routes under each of ``prefixes`` (``/sync`` only ``with_sync``)."""
        routes = []
        for prefix in prefixes:
            if with_sync:
                routes.append(Route(f"{prefix}/sync", self.sync, methods=["GET"]))
            routes += [
                Route(f"{prefix}/peek_room", self.peek_room, methods=["POST"]),
                Route(f"{prefix}/peek/{{room:path}}", self.peek, methods=["POST"]),
                Route(f"{prefix}/rooms/{{room_id}}/unpeek", self.unpeek, methods=["POST"]),
                Route(f"{prefix}/rooms/{{room_id}}/messages", self.messages, methods=["GET"]),
                Route(f"{prefix}/rooms/{{room_id}}/state", self.state, methods=["GET"]),
                Route(
                    f"{prefix}/rooms/{{room_id}}/event/{{event_id:path}}",
                    self.event,
                    methods=["GET"],
                ),
            ]
        return routes


def delegation_routes(
    service: Services,
    *,
    auth: DeviceAuth | None = None,
    prefixes: Sequence[str] = ("/_peekproxy/v1",),
    with_sync: bool = True,
) -> list[Route]:
    """Routes to mount on the client listener: :class:`DelegationApi`'s handlers under each
    of ``prefixes`` (``/_peekproxy/v1``, or the MSC2753 client prefixes with ``auth``);
    without ``auth``, also the admin API behind the same secret (:mod:`peekproxy.api.admin`).

    The secret and the peek-start rate limit come from ``service.settings.live``
    (:class:`~peekproxy.services.settings.LiveSettings`), read at each request.
    """
    api = DelegationApi(service.syncing, service.reads, live=service.settings.live, auth=auth)
    routes = api.routes(prefixes, with_sync=with_sync)
    if auth is None:  # the bearer-secret flavour: the admin API too, absent without a secret
        routes += AdminApi(
            service.status,
            lambda request: api.check_secret(request, off_status=404, off_errcode="M_UNRECOGNIZED"),
        ).routes()
    return routes
