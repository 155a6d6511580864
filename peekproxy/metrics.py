"""Prometheus metrics (``peekproxy_`` prefix), served on the metrics listener."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram, make_asgi_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "FRONT_DEGRADED",
    "FRONT_SYNCS",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "OBSERVER_MEMBERSHIP",
    "SYNC_ANSWERS",
    "TOKEN_CHECKS",
    "RequestMetrics",
    "metrics_app",
]

HTTP_REQUESTS = Counter(
    "peekproxy_http_requests",
    "HTTP requests answered, by listener, method and status code",
    ["listener", "method", "code"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "peekproxy_http_request_duration_seconds",
    "Time from request start to response start, by listener",
    ["listener"],
)

SYNC_ANSWERS = Counter(
    "peekproxy_sync_answers",
    "Sync responses, by where they were built from: 'memory' (the live window of recent "
    "stream rows) or 'store' (a database read: initial, full_state, new or restored peeks, "
    "limited timelines, tokens older than the window)",
    ["source"],
)

FRONT_SYNCS = Counter(
    "peekproxy_front_syncs",
    "Front mode /sync answers, by outcome: 'merged' (peeked rooms merged into the "
    "homeserver's answer), 'homeserver' (its answer alone: no peek news), 'homeserver_error' "
    "(its non-200 answer passed on), 'unavailable' (it could not be reached: 502)",
    ["outcome"],
)
FRONT_DEGRADED = Counter(
    "peekproxy_front_degraded",
    "Faults in peekproxy's own part of a front /sync (logged); the client got the "
    "homeserver's answer without the peek part",
)
TOKEN_CHECKS = Counter(
    "peekproxy_token_checks",
    "Front mode access-token checks, by result: 'cached' (no request), 'asked' (a whoami "
    "request to the homeserver)",
    ["result"],
)

OBSERVER_MEMBERSHIP = Counter(
    "peekproxy_observer_membership",
    "Observer joins and leaves (docs/observer-join.md), by action ('join', 'leave') and "
    "outcome ('ok', 'refused': the room may not be peeked or the server said no, 'failed')",
    ["action", "outcome"],
)

EVENT_AUTH = Counter(
    "peekproxy_event_auth",
    "Received events judged by the authorization rules (receipt steps 4-6, "
    "docs/federation.md), by outcome: 'accepted', 'soft_failed' (stored, never shown), "
    "'rejected' (never shown nor used as an auth event), 'dropped' (its auth events could "
    "not be fetched)",
    ["outcome"],
)


class RequestMetrics:
    """Pure ASGI middleware that counts requests and times them (no path labels)."""

    def __init__(self, app: ASGIApp, listener: str) -> None:
        self.app = app
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_REQUESTS.labels(
                    self.listener, _method_label(scope["method"]), str(message["status"])
                ).inc()
                HTTP_REQUEST_SECONDS.labels(self.listener).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_and_count)


def metrics_app() -> ASGIApp:
    """The ASGI app for ``GET /metrics`` (Prometheus text format)."""
    app: ASGIApp = make_asgi_app()
    return app


#: The methods counted by name; any other is counted as ``other``, so that a client
#: sending made-up methods cannot create new series without end.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"
