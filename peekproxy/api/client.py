"""The client listener: health and readiness (client-server endpoints come with peeking).

* ``GET /health`` — liveness: ``200 {"status": "ok"}`` while the process serves requests.
* ``GET /ready`` — readiness: ``200`` when the database answers and the signing key is
  loaded (and, in front mode, the homeserver answers ``GET /_matrix/client/versions``),
  else ``503 M_UNKNOWN`` saying which.
* Anything else — ``404``/``405`` ``M_UNRECOGNIZED``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from peekproxy.api.errors import MatrixError, exception_handlers
from peekproxy.metrics import RequestMetrics
from peekproxy.store import Storage

__all__ = ["client_app"]


def client_app(
    *,
    store: Storage,
    routes: Sequence[BaseRoute] = (),
    homeserver_check: Callable[[], Awaitable[str | None]] | None = None,
) -> RequestMetrics:
    """Build the client ASGI app over the daemon's store, with more ``routes`` (the
    delegation API, front mode's routes). ``homeserver_check`` (front mode): ``None`` when
    the fronted homeserver answers, else why not; ``/ready`` asks it."""

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
    )
    app.router.redirect_slashes = False
    return RequestMetrics(app, "client")
