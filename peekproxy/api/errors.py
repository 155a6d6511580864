"""Matrix error responses: ``{"errcode": ..., "error": ...}`` with the right HTTP status.

Handlers raise :class:`MatrixError`, services raise
:class:`peekproxy.services.errors.PeekError`; :func:`exception_handlers` turns both (and
Starlette's 404/405) into JSON. Client-server API §Standard error response; server-server API
§Unsupported endpoints (404/405 ``M_UNRECOGNIZED``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from peekproxy.services.errors import PeekError

__all__ = ["MatrixError", "exception_handlers", "matrix_error_response"]

log = logging.getLogger(__name__)


class MatrixError(Exception):
    """An error that becomes a Matrix error response.

    Args:
        status: HTTP status code.
        errcode: Matrix error code, e.g. ``M_NOT_FOUND``.
        error: human-readable message.
        extra: more top-level JSON fields (e.g. ``retry_after_ms``).
    """

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.error, **self.extra}


def matrix_error_response(
    status: int, errcode: str, error: str, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse({"errcode": errcode, "error": error}, status_code=status, headers=headers)


async def _matrix_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MatrixError)
    headers = None
    if exc.status == 429 and "retry_after_ms" in exc.extra:
        headers = {"Retry-After": str(max(1, -(-int(exc.extra["retry_after_ms"]) // 1000)))}
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PeekError)
    return await _matrix_error(
        request, MatrixError(exc.status, exc.errcode, exc.error, **exc.extra)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):
        return matrix_error_response(exc.status_code, "M_UNRECOGNIZED", "Unrecognized request")
    return matrix_error_response(exc.status_code, "M_UNKNOWN", str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("internal error handling %s %s", request.method, request.url.path)
    return matrix_error_response(500, "M_UNKNOWN", "Internal server error")


def exception_handlers() -> dict[Any, Any]:
    """The exception handlers every peekproxy ASGI app installs."""
    return {
        MatrixError: _matrix_error,
        PeekError: _service_error,
        HTTPException: _http_error,
        Exception: _unexpected,
    }
