"""Matrix error responses: ``{"errcode": ..., "error": ...}`` with the right HTTP status.

Handlers raise :class:`MatrixError`, services raise
:class:`peekproxy.services.errors.PeekError`; :func:`exception_handlers` turns both (and
Starlette's 404/405) into JSON. Client-server API §Standard error response; server-server API
§Unsupported endpoints (404/405 ``M_UNRECOGNIZED``).

The database unreachable (:class:`peekproxy.store.StoreUnavailable`, raised anywhere under a
request, also inside an exception group from a nursery) is ``503 M_UNKNOWN`` "the database is
unavailable; retry later" with ``Retry-After`` (:data:`STORE_RETRY_AFTER_S`), on every app that
installs these handlers: nothing of the request was committed, and the same request may succeed
once the store has reconnected (federation ``/send``: not acknowledged, so the sender retries).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from peekproxy.outage import OUTAGE, store_unavailable_in
from peekproxy.services.errors import PeekError
from peekproxy.store import StoreUnavailable

__all__ = [
    "STORE_RETRY_AFTER_S",
    "STORE_UNAVAILABLE",
    "MatrixError",
    "exception_handlers",
    "matrix_error_response",
]

#: The ``error`` of the 503 answered while the database cannot be reached.
STORE_UNAVAILABLE = "the database is unavailable; retry later"
#: ``Retry-After`` (seconds) of that 503.
STORE_RETRY_AFTER_S = 5

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


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    OUTAGE.failed(f"{request.method} {request.url.path}", exc)
    return matrix_error_response(
        503, "M_UNKNOWN", STORE_UNAVAILABLE, headers={"Retry-After": str(STORE_RETRY_AFTER_S)}
    )


async def _exception_group(request: Request, exc: Exception) -> Response:
    """A group from a nursery under the request: 503 when the database was unreachable in
    any of its tasks; anything else is unexpected: 500 ``M_UNKNOWN``, logged once here with
    its traceback (not re-raised, which would have the server log it a second time)."""
    unavailable = store_unavailable_in(exc)
    if unavailable is None:
        return await _unexpected(request, exc)
    return await _store_unavailable(request, unavailable)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("internal error handling %s %s", request.method, request.url.path)
    return matrix_error_response(500, "M_UNKNOWN", "Internal server error")


def exception_handlers() -> dict[Any, Any]:
    """The exception handlers every peekproxy ASGI app installs."""
    return {
        MatrixError: _matrix_error,
        PeekError: _service_error,
        HTTPException: _http_error,
        StoreUnavailable: _store_unavailable,
        ExceptionGroup: _exception_group,
        Exception: _unexpected,
    }
