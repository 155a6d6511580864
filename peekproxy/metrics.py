"""Prometheus metrics (``peekproxy_`` prefix), served on the metrics listener.

Every label value is bounded (:mod:`peekproxy.core.metric_labels`): never a room ID, server
name, user ID or peek ID. The series of each labelled counter and gauge exist from start
(at 0), so that dashboards show zeros rather than gaps. The gauges of things the daemon
holds (subscriptions, device peeks) are counted apart from the hot paths
(:mod:`peekproxy.services.gauges`). docs/operations.md lists
every series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, make_asgi_app
from prometheus_client.metrics import MetricWrapperBase
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peekproxy.core.federation_errors import FederationError
from peekproxy.core.metric_labels import (
    ENDPOINTS,
    endpoint_kind,
    request_result,
    store_operation,
)

__all__ = [
    "DEVICE_PEEKS",
    "EVENT_AUTH",
    "FEDERATION_REQUESTS",
    "FEDERATION_REQUEST_SECONDS",
    "FRONT_DEGRADED",
    "FRONT_SYNCS",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "LAPSES",
    "LONG_POLLS",
    "LONG_POLLS_IN_FLIGHT",
    "OBSERVER_MEMBERSHIP",
    "PDU_OUTCOMES",
    "RENEWALS",
    "REPEEKS",
    "SEND_PDUS",
    "SEND_TRANSACTIONS",
    "STORE_SECONDS",
    "SUBSCRIPTIONS",
    "SUBSCRIPTION_STATES",
    "SYNC_ANSWERS",
    "TOKEN_CHECKS",
    "TRANSACTION_OUTCOMES",
    "TRANSPORTS",
    "WAKE_SECONDS",
    "RequestMetrics",
    "metrics_app",
    "outbound_request",
    "timed_store_operation",
]


# No ``_created`` series (one per counter and histogram series): they would double the
# exposition and no dashboard or alert here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _present(metric: MetricWrapperBase, *values: Iterable[str]) -> None:
    """Create every series of ``metric`` over the product of ``values`` (one iterable per
    label), so that they are exported at 0 from start."""
    combos: list[tuple[str, ...]] = [()]
    for options in values:
        combos = [(*c, v) for c in combos for v in options]
    for combo in combos:
        metric.labels(*combo)


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
    "limited timelines, tokens older than the window), or 'store_unavailable' (the database "
    "could not be reached: nothing new, next_batch the since token)",
    ["source"],
)
_present(SYNC_ANSWERS, ("memory", "store", "store_unavailable"))

FRONT_SYNCS = Counter(
    "peekproxy_front_syncs",
    "Front mode /sync answers, by outcome: 'merged' (peeked rooms merged into the "
    "homeserver's answer), 'homeserver' (its answer alone: no peek news), 'homeserver_error' "
    "(its non-200 answer passed on), 'unavailable' (it could not be reached: 502), 'drained' "
    "(a long-poll answered at once on SIGTERM)",
    ["outcome"],
)
_present(FRONT_SYNCS, ("merged", "homeserver", "homeserver_error", "unavailable", "drained"))
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
_present(TOKEN_CHECKS, ("cached", "asked"))

OBSERVER_MEMBERSHIP = Counter(
    "peekproxy_observer_membership",
    "Observer joins and leaves (docs/observer-join.md), by action ('join', 'leave') and "
    "outcome ('ok', 'refused': the room may not be peeked or the server said no, 'failed')",
    ["action", "outcome"],
)
_present(OBSERVER_MEMBERSHIP, ("join", "leave"), ("ok", "refused", "failed"))

EVENT_AUTH = Counter(
    "peekproxy_event_auth",
    "Received events judged by the authorization rules (receipt steps 4-6, "
    "docs/federation.md), by outcome: 'accepted', 'soft_failed' (stored, never shown), "
    "'rejected' (never shown nor used as an auth event), 'dropped' (its auth events could "
    "not be fetched)",
    ["outcome"],
)
_present(EVENT_AUTH, ("accepted", "soft_failed", "rejected", "dropped"))

# -- subscriptions and device peeks (services/gauges.py) --------------------------------------

#: ``core.subscription.SubState`` values, and how a room is followed (its handle's kind).
SUBSCRIPTION_STATES = ("starting", "active", "lapsed", "stopping", "dormant", "failed", "ended")
TRANSPORTS = ("msc2444", "observer_join", "client_api", "none")
SUBSCRIPTIONS = Gauge(
    "peekproxy_subscriptions",
    "Remote room subscriptions, by state (core/subscription.py) and transport: 'msc2444' "
    "(an MSC2444 peek), 'observer_join' (joined as the observer), 'client_api' (front "
    "mode: the homeserver's own rooms through its client API), 'none' (no following held)",
    ["state", "transport"],
)
_present(SUBSCRIPTIONS, SUBSCRIPTION_STATES, TRANSPORTS)
DEVICE_PEEKS = Gauge(
    "peekproxy_device_peeks",
    "Device peeks (MSC2753), by status: 'active', 'dormant' (the device went idle)",
    ["status"],
)
_present(DEVICE_PEEKS, ("active", "dormant"))

RENEWALS = Counter(
    "peekproxy_renewals",
    "Renewals of followings (MSC2444 re-PUTs; observer-join checks), by result: 'ok', 'failed'",
    ["result"],
)
_present(RENEWALS, ("ok", "failed"))
LAPSES = Counter(
    "peekproxy_lapses",
    "Subscriptions that lapsed: the remote no longer holds the following (refused renewal, "
    "or unreachable past its interval, also while peekproxy was down)",
)
REPEEKS = Counter(
    "peekproxy_repeeks",
    "Rooms followed again after a lapse or a dormant time (a gap is recorded), by result: "
    "'ok', 'failed'",
    ["result"],
)
_present(REPEEKS, ("ok", "failed"))

# -- /send ------------------------------------------------------------------------------------

TRANSACTION_OUTCOMES = ("accepted", "duplicate", "malformed", "unauthenticated")
SEND_TRANSACTIONS = Counter(
    "peekproxy_send_transactions",
    "Inbound /send transactions, by outcome: 'accepted' (stored and answered), 'duplicate' "
    "(a replay: the stored answer), 'malformed' (400), 'unauthenticated' (X-Matrix refused: 401)",
    ["outcome"],
)
_present(SEND_TRANSACTIONS, TRANSACTION_OUTCOMES)
PDU_OUTCOMES = (
    "stored",
    "duplicate",
    "soft_failed",
    "rejected",
    "invalid",
    "dropped",
    "not_peeked",
    "acl_denied",
)
SEND_PDUS = Counter(
    "peekproxy_send_pdus",
    "PDUs pushed in /send transactions, by outcome: 'stored' (shown), 'duplicate' (held "
    "already), 'soft_failed' (stored, never shown), 'rejected' (by the auth rules), "
    "'invalid' (receipt checks 1-3: format, signatures, hashes), 'dropped' (its auth events "
    "could not be fetched), 'not_peeked' (a room not followed), 'acl_denied' (an observed "
    "room's server ACL denies the origin)",
    ["outcome"],
)
_present(SEND_PDUS, PDU_OUTCOMES)

# -- outbound federation ----------------------------------------------------------------------

FEDERATION_REQUESTS = Counter(
    "peekproxy_federation_requests",
    "Outbound federation requests, by endpoint (what was asked: peek, unpeek, keys, event, "
    "state, backfill, make_join, ...) and result (ok, http_4xx, http_5xx, rate_limited, "
    "timeout, connect_error, dns_error, refused_by_ip_policy, backing_off, bad_response, ...)",
    ["endpoint", "result"],
)
# Each endpoint's ``ok`` from start (the failures appear as they happen): 16 series, not 192.
_present(FEDERATION_REQUESTS, ENDPOINTS, ("ok",))
FEDERATION_REQUEST_SECONDS = Histogram(
    "peekproxy_federation_request_duration_seconds",
    "Outbound federation requests, from the call to the answer or failure (discovery "
    "included), by endpoint",
    ["endpoint"],
)


@contextmanager
def outbound_request(method: str, path: str) -> Iterator[None]:
    """Count and time one outbound federation request to ``path`` (its ``endpoint``
    label from the path, its ``result`` from the :class:`FederationError` raised, if any).
    A cancelled request is not counted."""
    endpoint = endpoint_kind(method, path)
    start = time.perf_counter()
    result: str | None = None
    try:
        yield
        result = "ok"
    except FederationError as e:
        result = request_result(e)
        raise
    finally:
        if result is not None:
            FEDERATION_REQUESTS.labels(endpoint, result).inc()
            FEDERATION_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


# -- long-polls and wake-ups ------------------------------------------------------------------

LONG_POLLS = Gauge(
    "peekproxy_long_polls",
    "/sync requests in flight, by api: 'delegation' (/_peekproxy/v1/sync), 'front' (front "
    "mode's client /sync)",
    ["api"],
)


class _InFlight:
    """``with``: one more in flight for its series, while inside (no state of its own, so
    one object serves every request; cheaper than ``track_inprogress`` per request)."""

    __slots__ = ("_gauge",)

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge

    def __enter__(self) -> None:
        self._gauge.inc()

    def __exit__(self, *exc_info: object) -> None:
        self._gauge.dec()


#: ``with LONG_POLLS_IN_FLIGHT[api]:`` around a ``/sync`` (``api``: ``delegation``, ``front``).
LONG_POLLS_IN_FLIGHT = {api: _InFlight(LONG_POLLS.labels(api)) for api in ("delegation", "front")}
GC_SECONDS = Counter(
    "peekproxy_gc_seconds",
    "Seconds spent in CPython's cyclic garbage collector, by generation (0 and 1: the "
    "automatic young collections; 2: the scheduled full ones, peekproxy/gc_policy.py)",
    ["generation"],
)
GC_COLLECTIONS_BY_GENERATION = [GC_SECONDS.labels(str(g)) for g in range(3)]

WAKE_SECONDS = Histogram(
    "peekproxy_wake_latency_seconds",
    "From the commit of new stream rows to a woken long-poll's answer being ready (peek "
    "/sync, MSC2753; its JSON encoding and, in front mode, the homeserver's part excluded)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

# -- the store --------------------------------------------------------------------------------

STORE_SECONDS = Histogram(
    "peekproxy_store_operation_duration_seconds",
    "Store operations (one transaction each), from the call to the result (waiting for a "
    "connection included), by operation (the function handed to the store: a named "
    "function's name, or a lambda's first transaction method) and kind ('read', 'write')",
    ["operation", "kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
_store_children: dict[tuple[Any, str], Any] = {}


def timed_store_operation(fn: Callable[..., Any], kind: str, seconds: float) -> None:
    """Observe one store operation's duration (``seconds``) under its ``operation`` label
    (:func:`~peekproxy.core.metric_labels.store_operation`, cached per code object)."""
    key = (getattr(fn, "__code__", fn), kind)
    child = _store_children.get(key)
    if child is None:
        child = _store_children[key] = STORE_SECONDS.labels(store_operation(fn), kind)
    child.observe(seconds)


class RequestMetrics:
    """Pure ASGI middleware that counts requests and times them (no path labels)."""

    def __init__(self, app: ASGIApp, listener: str) -> None:
        self.app = app
        self.listener = listener
        # The labelled children, looked up once (a fan-out answers thousands at once).
        self._seconds = HTTP_REQUEST_SECONDS.labels(listener)
        self._counted: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                # bounded: the known methods and "other", times the statuses
                key = (_method_label(scope["method"]), message["status"])
                counter = self._counted.get(key)
                if counter is None:
                    counter = self._counted[key] = HTTP_REQUESTS.labels(
                        self.listener, key[0], str(key[1])
                    )
                counter.inc()
                self._seconds.observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_and_count)


def metrics_app(before_scrape: Callable[[], None] | None = None) -> ASGIApp:
    """The ASGI app for ``GET /metrics`` (Prometheus text format); ``before_scrape`` (if
    given) is called before each scrape, to set the gauges read at scrape time (it must be
    quick: a scrape waits for nothing else)."""
    exposition: ASGIApp = make_asgi_app()
    if before_scrape is None:
        return exposition
    refresh = before_scrape

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        refresh()
        await exposition(scope, receive, send)

    return app


#: The methods counted by name; any other is counted as ``other``, so that a client
#: sending made-up methods cannot create new series without end.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"
