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
  what it fetched keyed to the gap (:mod:`peekproxy.core.paging` has the rules).
* ``GET /_peekproxy/v1/rooms/{roomId}/state`` and ``.../event/{eventId}``.

The read endpoints need an active peek of the room by the device (else 403). Starting peeks
(``peek`` and ``peek_room``) is rate-limited per user (token bucket). Errors follow
protocol.md decisions 6 and 7; ``docs/delegation-api.md`` has the whole contract.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.errors import MatrixError
from peekproxy.api.federation_auth import read_json_body
from peekproxy.core import paging
from peekproxy.core.identifiers import (
    MAX_IDENTIFIER_BYTES,
    InvalidIdentifier,
    RoomId,
    ServerName,
    UserId,
)
from peekproxy.core.sync import InvalidToken
from peekproxy.peeks import history
from peekproxy.peeks.service import PeekError, PeekService
from peekproxy.store import ReadTransaction

__all__ = [
    "SecretFileError",
    "TokenBucket",
    "check_hints",
    "delegation_routes",
    "device_params",
    "read_secret",
    "timeline_limit",
]

log = logging.getLogger("peekproxy.delegation")

MAX_SYNC_TIMEOUT_MS = 300_000
#: Longest ``user_id`` / ``device_id`` accepted, in UTF-8 bytes (spec appendix §User
#: Identifiers: 255 bytes; device IDs get the same bound).
MAX_ID_BYTES = MAX_IDENTIFIER_BYTES
DEFAULT_TIMELINE_LIMIT = 10


def timeline_limit(filter_param: str | None) -> int:
    """The timeline limit of an inline filter (``room.timeline.limit``), default 10.

    Raises:
        MatrixError: 400 M_INVALID_PARAM for a filter ID (only inline JSON filters are
            supported) or a malformed filter.
    """
    if filter_param is None:
        return DEFAULT_TIMELINE_LIMIT
    if not filter_param.lstrip().startswith("{"):
        raise MatrixError(400, "M_INVALID_PARAM", "only inline JSON filters are supported")
    try:
        limit = (
            json.loads(filter_param)
            .get("room", {})
            .get("timeline", {})
            .get("limit", DEFAULT_TIMELINE_LIMIT)
        )
    except (ValueError, AttributeError):
        raise MatrixError(400, "M_INVALID_PARAM", "filter is not a JSON object") from None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise MatrixError(400, "M_INVALID_PARAM", "room.timeline.limit must be a positive integer")
    return min(limit, 100)


def _shown(value: str) -> str:
    """``value`` as error messages and logs quote it: at most 40 characters, repr-escaped."""
    return repr(value[:40]) + ("..." if len(value) > 40 else "")


def device_params(getlist: Callable[[str], list[str]]) -> tuple[str, str]:
    """(user ID, device ID) from the ``user_id`` and ``device_id`` query parameters
    (``getlist`` gives every value of a parameter, in order).

    Each must be given exactly once: a repeated parameter is ambiguous (which one did the
    homeserver authenticate?), so it is refused rather than "the last one wins". Both are at
    most 255 bytes of UTF-8 (the spec's limit on user IDs, applied to device IDs too). Error
    messages quote at most the first 40 characters of a value.

    Raises:
        MatrixError: 400 ``M_MISSING_PARAM`` (missing or empty), 400 ``M_INVALID_PARAM``
            (given twice, over 255 bytes, or ``user_id`` not a user ID).
    """
    values = {name: getlist(name) for name in ("user_id", "device_id")}
    for name, given in values.items():
        if len(given) > 1:
            raise MatrixError(400, "M_INVALID_PARAM", f"{name} is given {len(given)} times")
    user_id = values["user_id"][0] if values["user_id"] else ""
    device_id = values["device_id"][0] if values["device_id"] else ""
    if not user_id or not device_id:
        raise MatrixError(400, "M_MISSING_PARAM", "user_id and device_id are required")
    for name, value in (("user_id", user_id), ("device_id", device_id)):
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            raise MatrixError(
                400,
                "M_INVALID_PARAM",
                f"{name} is {size} bytes long, more than {MAX_ID_BYTES}: {_shown(value)}",
            )
    try:
        UserId.parse(user_id)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", f"user_id: {e}") from None
    return user_id, device_id


def check_hints(hints: Sequence[str]) -> None:
    """Refuse server hints (``server_name`` query parameters, body ``servers``) that are
    not server names (spec appendix §Server Name), before anything is looked up or stored.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM`` naming the first bad hint.
    """
    for hint in hints:
        try:
            ServerName.parse(hint)
        except InvalidIdentifier:
            raise MatrixError(
                400,
                "M_INVALID_PARAM",
                f"server hint {_shown(hint)} is not a valid server name "
                "(hostname or IP literal, optional :port)",
            ) from None


class SecretFileError(ValueError):
    """``delegation.shared_secret_file`` cannot give a secret; the message says why."""


def read_secret(path: Path | None) -> str | None:
    """The shared secret: the first line of the file, without surrounding whitespace.
    ``None`` when no file is configured (the delegation API is off).

    Raises:
        SecretFileError: the file cannot be read, is not UTF-8, or its first line is empty
            (an empty secret would be a configuration mistake, not "off").
    """
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SecretFileError(f"cannot read {path}: {e.strerror or e}") from None
    secret = text.split("\n", 1)[0].strip()
    if not secret:
        raise SecretFileError(
            f"{path}: the first line (the secret) is empty; write a secret there, or unset "
            "the key to turn the delegation API off"
        )
    return secret


class PeekBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    servers: list[str] = Field(default_factory=list)


class PeekRoomBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    room: str
    servers: list[str] = Field(default_factory=list)


class TokenBucket:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second.

    :meth:`take` spends one token of a key and answers ``None``, or, when the key's bucket
    is empty, the milliseconds until a token is back (nothing is spent then).
    """

    #: Full buckets are forgotten once this many keys are held.
    PRUNE_AT = 10_000

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> int | None:
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate * 1000))
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.PRUNE_AT:
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]


def delegation_routes(
    service: PeekService,
    secret: str | None,
    *,
    rate_limit_per_second: float = 1.0,
    rate_limit_burst: int = 10,
    auth: Callable[[Request], Awaitable[tuple[str, str]]] | None = None,
    prefixes: Sequence[str] = ("/_peekproxy/v1",),
    with_sync: bool = True,
) -> list[Route]:
    """Routes to mount on the client listener.

    ``rate_limit_per_second`` / ``rate_limit_burst`` (config ``peeks.rate_limit_*``) limit
    how fast each user may start peeks (``peek`` and ``peek_room`` requests).
    """
    limiter = TokenBucket(rate_limit_per_second, rate_limit_burst)

    async def device(request: Request) -> tuple[str, str]:
        if auth is not None:  # client access tokens (front mode)
            return await auth(request)
        if secret is None:
            raise MatrixError(
                403, "M_FORBIDDEN", "the delegation API is off: set delegation.shared_secret_file"
            )
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {secret}".encode()):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "missing or wrong delegation secret")
        return device_params(request.query_params.getlist)

    async def body_of(request: Request) -> Any:
        body = await read_json_body(request, optional=True)  # no body: as {}
        return {} if body is None else body

    def rate_limit(user_id: str) -> None:
        wait = limiter.take(user_id)
        if wait is not None:
            raise MatrixError(
                429,
                "M_LIMIT_EXCEEDED",
                f"too many peeks started; retry in {wait} ms",
                retry_after_ms=wait,
            )

    async def start_peek(user_id: str, device_id: str, room: str, hints: list[str]) -> str:
        check_hints(hints)  # before any lookup, and before a rate-limit token is spent
        rate_limit(user_id)
        try:
            return await service.peek(user_id, device_id, room, hints)
        except PeekError as e:
            raise MatrixError(e.status, e.errcode, e.error, **e.extra) from None

    async def peek(request: Request) -> Response:
        user_id, device_id = await device(request)
        try:
            body = PeekBody.model_validate(await body_of(request))
        except ValidationError as e:
            raise MatrixError(400, "M_BAD_JSON", f"servers: {e.errors()[0]['msg']}") from None
        hints = [*request.query_params.getlist("server_name"), *body.servers]
        room_id = await start_peek(user_id, device_id, request.path_params["room"], hints)
        return JSONResponse({"room_id": room_id})

    async def peek_room(request: Request) -> Response:
        user_id, device_id = await device(request)
        raw = await body_of(request)
        if isinstance(raw, dict) and "room" not in raw:
            raise MatrixError(400, "M_MISSING_PARAM", "room is required")
        try:
            body = PeekRoomBody.model_validate(raw)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            raise MatrixError(400, "M_BAD_JSON", f"{where}: {error['msg']}") from None
        hints = [*request.query_params.getlist("server_name"), *body.servers]
        room_id = await start_peek(user_id, device_id, body.room, hints)
        # Idle drop (decision 9): a device that stops syncing for idle_timeout has its peek
        # made dormant; each sync keeps it alive, so this is the expiry if it never syncs.
        expiry = service.clock_ms() + service.settings.idle_timeout_ms
        return JSONResponse({"room_id": room_id, "peek_expiry_ts": expiry})

    async def unpeek(request: Request) -> Response:
        user_id, device_id = await device(request)
        await body_of(request)
        try:
            await service.unpeek(user_id, device_id, request.path_params["room_id"])
        except PeekError as e:
            raise MatrixError(e.status, e.errcode, e.error, **e.extra) from None
        return JSONResponse({})

    async def sync(request: Request) -> Response:
        user_id, device_id = await device(request)
        params = request.query_params
        try:
            timeout_ms = int(params.get("timeout", "0"))
        except ValueError:
            raise MatrixError(400, "M_INVALID_PARAM", "timeout must be an integer (ms)") from None
        full_state = params.get("full_state", "false")
        if full_state not in ("true", "false"):
            raise MatrixError(400, "M_INVALID_PARAM", "full_state must be true or false")
        limit = timeline_limit(params.get("filter"))
        try:
            answer = await service.sync(
                user_id,
                device_id,
                since=params.get("since"),
                timeout_ms=max(0, min(timeout_ms, MAX_SYNC_TIMEOUT_MS)),
                full_state=full_state == "true",
                timeline_limit=limit,
            )
        except PeekError as e:
            raise MatrixError(e.status, e.errcode, e.error, **e.extra) from None
        return JSONResponse(answer)

    # -- reading ---------------------------------------------------------------------------

    async def peeking_device(request: Request) -> tuple[str, str, str]:
        """(user, device, room ID) for a read of a room the device is peeking."""
        user_id, device_id = await device(request)
        room_id = request.path_params["room_id"]
        try:
            RoomId.parse(room_id)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        if not await service.store.read(
            lambda tx: tx.device_is_peeking(user_id, device_id, room_id)
        ):
            raise MatrixError(403, "M_FORBIDDEN", f"this device is not peeking {room_id}")
        return user_id, device_id, room_id

    def point_param(request: Request, name: str) -> paging.Point | None:
        value = request.query_params.get(name)
        if value is None:
            return None
        try:
            return paging.parse_point(value)
        except InvalidToken:
            raise MatrixError(400, "M_INVALID_PARAM", f"unknown {name} token {value!r}") from None

    async def messages(request: Request) -> Response:
        _, _, room_id = await peeking_device(request)
        params = request.query_params
        direction = params.get("dir", "b")
        if direction not in ("b", "f"):
            raise MatrixError(400, "M_INVALID_PARAM", "dir must be b or f")
        from_point, to_point = point_param(request, "from"), point_param(request, "to")
        try:
            limit = paging.parse_limit(params.get("limit"))
        except paging.InvalidLimit as e:
            raise MatrixError(400, "M_INVALID_PARAM", str(e)) from None
        sub = service.subscriptions.get(room_id)
        server = sub.server if sub is not None else None

        def read(fill_gaps: bool) -> Callable[[ReadTransaction], paging.Page]:
            return lambda tx: tx.read_page(
                room_id,
                from_point=from_point,
                to_point=to_point,
                direction="b" if direction == "b" else "f",
                limit=limit,
                fill_gaps=fill_gaps,
            )

        try:
            page = await service.store.read(read(direction == "b" and server is not None))
        except paging.TokenAhead:
            raise MatrixError(
                400, "M_INVALID_PARAM", f"from token {params.get('from')!r} is from the future"
            ) from None
        if page.backfill is not None and server is not None:
            # One backfill round, stored keyed to the gap; then the page again. A server that
            # cannot be asked now: 502, the client asks again with the same token. One that
            # refuses, or has nothing more: the page passes over the hole (it stays).
            where = page.backfill
            try:
                helped = await history.fill_gap(
                    service.store,
                    service.client,
                    service.keyring,
                    server=server,
                    room_id=room_id,
                    version=page.room_version,
                    gap_pos=where.gap_pos,
                    anchor=where.anchor,
                    room_left=where.room_left,
                )
            except history.BackfillFailed as e:
                if e.retryable:
                    raise MatrixError(
                        502, "M_UNKNOWN", f"could not fetch the history of {room_id}: {e.reason}"
                    ) from None
                helped = False
            page = await service.store.read(read(helped))
            if page.backfill is not None:
                page = await service.store.read(read(False))
        now = service.clock_ms()
        chunk = [
            paging.shown_event(
                pdu, event_id, redacted=r, room_id=room_id, version=page.room_version, now_ms=now
            )
            for event_id, pdu, r in page.events
        ]
        answer: dict[str, Any] = {"chunk": chunk, "start": page.start.token()}
        if page.end is not None:
            answer["end"] = page.end.token()
        return JSONResponse(answer)

    async def state(request: Request) -> Response:
        _, _, room_id = await peeking_device(request)
        rows = await service.store.read(lambda tx: tx.read_state(room_id))
        version = await service.store.read(lambda tx: tx.room_version_of(room_id))
        now = service.clock_ms()
        return JSONResponse(
            [
                paging.shown_event(
                    pdu, event_id, redacted=r, room_id=room_id, version=version, now_ms=now
                )
                for event_id, pdu, r in rows
            ]
        )

    async def event(request: Request) -> Response:
        _, _, room_id = await peeking_device(request)
        event_id = request.path_params["event_id"]
        found = await service.store.read(lambda tx: tx.read_event(room_id, event_id))
        if found is None:
            raise MatrixError(404, "M_NOT_FOUND", f"event {event_id} not found in {room_id}")
        version = await service.store.read(lambda tx: tx.room_version_of(room_id))
        pdu, redacted = found
        return JSONResponse(
            paging.shown_event(
                pdu,
                event_id,
                redacted=redacted,
                room_id=room_id,
                version=version,
                now_ms=service.clock_ms(),
            )
        )

    routes = []
    for prefix in prefixes:
        if with_sync:
            routes.append(Route(f"{prefix}/sync", sync, methods=["GET"]))
        routes += [
            Route(f"{prefix}/peek_room", peek_room, methods=["POST"]),
            Route(f"{prefix}/peek/{{room:path}}", peek, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/unpeek", unpeek, methods=["POST"]),
            Route(f"{prefix}/rooms/{{room_id}}/messages", messages, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/state", state, methods=["GET"]),
            Route(f"{prefix}/rooms/{{room_id}}/event/{{event_id:path}}", event, methods=["GET"]),
        ]
    return routes
