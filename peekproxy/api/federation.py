"""The federation listener: key server and version (server-server API).

* ``GET /_matrix/key/v2/server`` — our signed key document (SSAPI §Publishing Keys).
* ``GET /_matrix/federation/v1/version`` — ``{"server": {"name", "version"}}``.
* Anything else — ``404``/``405`` ``M_UNRECOGNIZED`` (SSAPI §Unsupported endpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from signedjson.types import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peekproxy import __version__
from peekproxy.api.errors import exception_handlers
from peekproxy.federation.signing_key import server_key_document
from peekproxy.metrics import RequestMetrics

__all__ = ["federation_app"]


def federation_app(
    *,
    server_name: str,
    signing_key: SigningKey,
    key_valid_for_ms: int,
    old_verify_keys: Mapping[str, tuple[str, int]],
    clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> RequestMetrics:
    """Build the federation ASGI app.

    Args:
        server_name: our server name, as published in the key document.
        signing_key: our current signing key.
        key_valid_for_ms: lifetime of a served key document (``valid_until_ts - now``), ms.
        old_verify_keys: retired keys: key ID → (base64 public key, ``expired_ts`` ms).
        clock_ms: the wall clock in ms since the epoch.
    """

    async def key_server(request: Request) -> Response:
        document = server_key_document(
            server_name,
            signing_key,
            now_ms=clock_ms(),
            valid_for_ms=key_valid_for_ms,
            old_verify_keys=old_verify_keys,
        )
        return JSONResponse(document)

    async def version(request: Request) -> Response:
        return JSONResponse({"server": {"name": "peekproxy", "version": __version__}})

    app = Starlette(
        routes=[
            Route("/_matrix/key/v2/server", key_server, methods=["GET"]),
            Route("/_matrix/federation/v1/version", version, methods=["GET"]),
        ],
        exception_handlers=exception_handlers(),
    )
    return RequestMetrics(app, "federation")
