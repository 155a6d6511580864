"""The client listener: health and readiness (client-server endpoints come with peeking).

* ``GET /health`` — liveness: ``200 {"status": "ok"}`` while the process serves requests.
* ``GET /ready`` — readiness: ``200`` when the database answers and the signing key is
  loaded (and, in front mode, the homeserver answers ``GET /_matrix/client/versions``),
  else ``503 M_UNKNOWN`` saying which.
* Anything else — ``404``/``405`` ``M_UNRECOGNIZED``.

In front mode (``cors=True``) browsers' clients (Element Web) reach the listener from
another origin: every answer to a request with an ``Origin`` carries Synapse's CORS headers
(:data:`CORS_METHODS`, :data:`CORS_HEADERS`, :data:`CORS_EXPOSED`, as
``synapse.http.server.set_cors_headers`` sets them), and a CORS preflight (``OPTIONS`` with
``Origin`` and ``Access-Control-Request-Method``) is answered ``200`` on every path, before
routing, by Starlette's ``CORSMiddleware``; one asking for a method or request header
outside the policy gets ``400 M_FORBIDDEN`` (Matrix error JSON, where Starlette writes plain
text), with the same CORS headers (the browser refuses the request, as it would at Synapse).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from peekproxy.api.errors import MatrixError, exception_handlers, matrix_error_response
from peekproxy.metrics import RequestMetrics
from peekproxy.store import Storage

__all__ = ["CORS_EXPOSED", "CORS_HEADERS", "CORS_METHODS", "MatrixCors", "client_app"]

#: The CORS policy of Synapse's client API (``set_cors_headers``): any origin (``*``), no
#: credentials (the access token is a header, not a cookie), these methods and request
#: headers, these response headers readable. A preflight's ``Access-Control-Allow-Headers``
#: also lists the CORS-safelisted ones (``Accept``, ``Accept-Language``,
#: ``Content-Language``), and may be cached 600 s (``Access-Control-Max-Age``).
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
CORS_HEADERS = ("X-Requested-With", "Content-Type", "Authorization", "Date")
CORS_EXPOSED = ("Synapse-Trace-Id", "Server")


def client_app(
    *,
    store: Storage,
    routes: Sequence[BaseRoute] = (),
    homeserver_check: Callable[[], Awaitable[str | None]] | None = None,
    cors: bool = False,
) -> RequestMetrics:
    """Build the client ASGI app over the daemon's store, with more ``routes`` (the
    delegation API, front mode's routes). ``homeserver_check`` (front mode): ``None`` when
    the fronted homeserver answers, else why not; ``/ready`` asks it. ``cors`` (front
    mode): Synapse's CORS headers and preflight answers (the module docstring)."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            await store.ping()
        except Exception as e:
            raise MatrixError(503, "M_UNKNOWN", f"database not ready: {e}") from None
        if homeserver_check is not None:
            problem = await homeserver_check()
            if problem is not None:
                raise MatrixError(503, "M_UNKNOWN", f"homeserver not ready: {problem}")
        return JSONResponse({"status": "ready"})

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            *routes,
        ],
        exception_handlers=exception_handlers(),
        middleware=[_cors()] if cors else [],
    )
    app.router.redirect_slashes = False
    return RequestMetrics(app, "client")


class MatrixCors(CORSMiddleware):
    """Starlette's ``CORSMiddleware`` whose refused preflights are Matrix error JSON."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        kept = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        reason = bytes(response.body).decode("utf-8", "replace")  # "Disallowed CORS headers"
        return matrix_error_response(response.status_code, "M_FORBIDDEN", reason, headers=kept)


def _cors() -> Middleware:
    return Middleware(
        MatrixCors,
        allow_origins=["*"],
        allow_methods=CORS_METHODS,
        allow_headers=CORS_HEADERS,
        expose_headers=CORS_EXPOSED,
    )
