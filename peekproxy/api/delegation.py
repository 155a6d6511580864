"""The delegation API for homeservers that integrate natively (``/_peekproxy/v1``).

Authenticated by ``Authorization: Bearer <delegation.shared_secret_file>`` plus ``user_id``
and ``device_id`` query parameters naming the device the call is for.

* ``POST /_peekproxy/v1/peek/{roomIdOrAlias}`` — hints as repeated ``server_name`` query
  parameters and/or a body ``servers`` list; answers ``{"room_id": ...}``.
* ``POST /_peekproxy/v1/rooms/{roomId}/unpeek`` — answers ``{}``.

Errors follow protocol.md decisions 6 and 7.
"""

from __future__ import annotations

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

__all__ = ["delegation_routes", "read_secret"]


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

    prefix = "/_peekproxy/v1"
    return [
        Route(f"{prefix}/peek/{{room:path}}", peek, methods=["POST"]),
        Route(f"{prefix}/rooms/{{room_id}}/unpeek", unpeek, methods=["POST"]),
    ]
