"""Inbound X-Matrix authentication for the federation listener (SSAPI §Request Authentication).

Every federation endpoint except the key server goes through :func:`authenticate`: it parses
the ``Authorization: X-Matrix`` header(s), checks that ``destination`` (when present) is our
server name, fetches the origin's key through the keyring and verifies the signature over
the method, the raw request target, origin, destination and the parsed JSON body. Any
failure is ``401 M_UNAUTHORIZED`` with a message saying what was wrong.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from peekproxy.api.errors import MatrixError
from peekproxy.core.xmatrix import XMatrixError, parse_authorization, verify_request
from peekproxy.federation.keyring import KeyFetchError, Keyring
from peekproxy.logs import bind_log_fields

__all__ = ["AuthenticatedRequest", "authenticate", "raw_request_target"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
#: Each X-Matrix header may cost a key fetch: a request may carry only a few.
MAX_AUTH_HEADERS = 3


@dataclass(frozen=True)
class AuthenticatedRequest:
    """The verified origin server and the parsed JSON body (``None`` without a body)."""

    origin: str
    content: Any


def raw_request_target(request: Request) -> str:
    """The request target as received: percent-encoded path plus ``?query`` when present."""
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    query: bytes = request.scope.get("query_string") or b""
    target = raw_path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def read_json_body(request: Request, *, optional: bool = False) -> Any:
    """The JSON body of a PUT/POST (``None`` for other methods, and for an empty body when
    ``optional``).

    Raises:
        MatrixError: 413 ``M_TOO_LARGE``; 400 ``M_NOT_JSON`` (also for JSON nested too
            deeply to parse).
    """
    if request.method not in ("PUT", "POST"):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise MatrixError(413, "M_TOO_LARGE", "request body too large")
    if optional and not body.strip():
        return None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: too deep
        raise MatrixError(400, "M_NOT_JSON", "request body is not valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def authenticate(
    request: Request, *, server_name: str, keyring: Keyring
) -> AuthenticatedRequest:
    """Verify the request's X-Matrix authentication.

    Raises:
        MatrixError: 401 ``M_UNAUTHORIZED`` (missing/malformed header, wrong destination,
            unknown or unfetchable key, bad signature); 400 ``M_NOT_JSON``/413 for bodies.
    """
    headers = [
        value
        for name, value in request.headers.items()
        if name == "authorization" and value[:8].lower() == "x-matrix"
    ]
    if not headers:
        raise MatrixError(401, "M_UNAUTHORIZED", "Missing X-Matrix Authorization header")
    if len(headers) > MAX_AUTH_HEADERS:
        raise MatrixError(401, "M_UNAUTHORIZED", f"more than {MAX_AUTH_HEADERS} X-Matrix headers")
    content = await read_json_body(request)
    target = raw_request_target(request)
    errors = []
    for header in headers:
        try:
            auth = parse_authorization(header)
            verify_key = await keyring.request_key(auth.origin, auth.key)
            verify_request(
                auth,
                method=request.method,
                uri=target,
                our_server_name=server_name,
                content=content,
                verify_key=verify_key,
            )
        except (XMatrixError, KeyFetchError) as e:
            errors.append(str(e))
            continue
        bind_log_fields(origin=auth.origin)  # the request's task logs it from now on
        return AuthenticatedRequest(auth.origin, content)
    log.info(
        "refused federation request %s %s: %s", request.method, request.url.path, "; ".join(errors)
    )
    raise MatrixError(401, "M_UNAUTHORIZED", "; ".join(errors))
