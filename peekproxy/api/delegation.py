"""The delegation API for homeservers that integrate natively (``/_peekproxy/v1``).

Authenticated by ``Authorization: Bearer <delegation.shared_secret_file>`` plus ``user_id``
and ``device_id`` query parameters naming the device the call is for.

* ``POST /_peekproxy/v1/peek/{roomIdOrAlias}`` — hints as repeated ``server_name`` query
  parameters and/or a body ``servers`` list; answers ``{"room_id": ...}``.
* ``POST /_peekproxy/v1/rooms/{roomId}/unpeek`` — answers ``{}``.
* ``GET /_peekproxy/v1/sync?since=&timeout=&full_state=&filter=`` — the device's
  ``{next_batch, rooms: {peek, leave}}`` (MSC2753), long-polling up to ``timeout`` ms.

Errors follow protocol.md decisions 6 and 7.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy.api.errors import MatrixError
from peekproxy.api.federation_auth import read_json_body
from peekproxy.identifiers import InvalidIdentifier, UserId
from peekproxy.peeks.service import PeekError, PeekService

__all__ = ["delegation_routes", "read_secret", "timeline_limit"]

MAX_SYNC_TIMEOUT_MS = 300_000
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


def read_secret(path: Path | None) -> str | None:
    """The shared secret (first line of the file), or ``None`` when not configured."""
    if path is None:
        return None
    secret = path.read_text().strip()
    return secret or None


class PeekBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    servers: list[str] = Field(default_factory=list)


def delegation_routes(service: PeekService, secret: str | None) -> list[Route]:
    """Routes to mount on the client listener."""

    def device(request: Request) -> tuple[str, str]:
        if secret is None:
            raise MatrixError(
                403, "M_FORBIDDEN", "the delegation API is off: set delegation.shared_secret_file"
            )
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {secret}".encode()):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "missing or wrong delegation secret")
        user_id = request.query_params.get("user_id")
        device_id = request.query_params.get("device_id")
        if not user_id or not device_id:
            raise MatrixError(400, "M_MISSING_PARAM", "user_id and device_id are required")
        try:
            UserId.parse(user_id)
        except InvalidIdentifier as e:
            raise MatrixError(400, "M_INVALID_PARAM", f"user_id: {e}") from None
        return user_id, device_id

    async def body_of(request: Request) -> Any:
        body = await read_json_body(request)
        return {} if body is None else body

    async def peek(request: Request) -> Response:
        user_id, device_id = device(request)
        try:
            body = PeekBody.model_validate(await body_of(request))
        except ValidationError as e:
            raise MatrixError(400, "M_BAD_JSON", f"servers: {e.errors()[0]['msg']}") from None
        hints = [*request.query_params.getlist("server_name"), *body.servers]
        try:
            room_id = await service.peek(user_id, device_id, request.path_params["room"], hints)
        except PeekError as e:
            raise MatrixError(e.status, e.errcode, e.error, **e.extra) from None
        return JSONResponse({"room_id": room_id})

    async def unpeek(request: Request) -> Response:
        user_id, device_id = device(request)
        await body_of(request)
        try:
            await service.unpeek(user_id, device_id, request.path_params["room_id"])
        except PeekError as e:
            raise MatrixError(e.status, e.errcode, e.error, **e.extra) from None
        return JSONResponse({})

    async def sync(request: Request) -> Response:
        user_id, device_id = device(request)
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

    prefix = "/_peekproxy/v1"
    return [
        Route(f"{prefix}/sync", sync, methods=["GET"]),
        Route(f"{prefix}/peek/{{room:path}}", peek, methods=["POST"]),
        Route(f"{prefix}/rooms/{{room_id}}/unpeek", unpeek, methods=["POST"]),
    ]
