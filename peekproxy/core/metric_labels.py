"""Bounded label values for the Prometheus metrics (pure; ``peekproxy/metrics.py`` uses them).

A label value never holds a room ID, server name, user ID, peek ID or anything else a remote
or a client chooses: each function here maps its input onto a small fixed set, so that no
input can create series without end (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from peekproxy.core.federation_errors import (
    BadResponse,
    DestinationBackingOff,
    DestinationBlocked,
    DestinationUnreachable,
    RemoteError,
)

__all__ = [
    "ENDPOINTS",
    "REQUEST_RESULTS",
    "endpoint_kind",
    "pushed_pdu_outcomes",
    "request_result",
    "store_operation",
]

#: What an outbound federation request asks for (``endpoint`` label), by its path: the
#: MSC2444 peek (``PUT``: a new peek or its renewal) and ``unpeek`` (its ``DELETE``), the
#: server keys (``/_matrix/key/v2/...``), reads of a room's events (``event``,
#: ``event_auth``, ``state``: ``/state`` and ``/state_ids``, ``backfill``,
#: ``missing_events``), the observer join (``make_join``, ``send_join``, ``make_leave``,
#: ``send_leave``, ``hierarchy``), ``directory`` (alias queries), ``send`` (transactions),
#: ``other``.
ENDPOINTS = (
    "peek",
    "unpeek",
    "keys",
    "event",
    "event_auth",
    "state",
    "backfill",
    "missing_events",
    "make_join",
    "send_join",
    "make_leave",
    "send_leave",
    "hierarchy",
    "directory",
    "send",
    "other",
)

#: How an outbound federation request ended (``result`` label): ``ok`` (2xx), the remote's
#: error status (``http_3xx``, ``http_4xx``, ``rate_limited`` (429), ``http_5xx``), no answer
#: (``timeout``, ``connect_error``, ``dns_error``: the name could not be resolved or offers no
#: federation, ``invalid_destination``: not a server name), refused here before any request
#: (``refused_by_ip_policy``: every address blacklisted, ``backing_off``: the destination
#: failed lately), ``bad_response`` (too large, or not JSON).
REQUEST_RESULTS = (
    "ok",
    "http_3xx",
    "http_4xx",
    "rate_limited",
    "http_5xx",
    "timeout",
    "connect_error",
    "dns_error",
    "invalid_destination",
    "refused_by_ip_policy",
    "backing_off",
    "bad_response",
)

#: ``/_matrix/federation/v1|v2/<segment>/...``: the segment names most endpoints.
_FEDERATION_PATH = re.compile(r"^/_matrix/federation/(?:v\d+|unstable(?:/[^/]+)?)/([^/?]+)")
_BY_SEGMENT = {
    "event": "event",
    "event_auth": "event_auth",
    "state": "state",
    "state_ids": "state",
    "backfill": "backfill",
    "get_missing_events": "missing_events",
    "make_join": "make_join",
    "send_join": "send_join",
    "make_leave": "make_leave",
    "send_leave": "send_leave",
    "hierarchy": "hierarchy",
    "send": "send",
}


def endpoint_kind(method: str, path: str) -> str:
    """The ``endpoint`` label (one of :data:`ENDPOINTS`) of a federation request to
    ``path`` (percent-encoded, perhaps with a query) with ``method``."""
    if path.startswith("/_matrix/key/"):
        return "keys"
    match = _FEDERATION_PATH.match(path)
    if match is None:
        return "other"
    segment = match.group(1)
    if segment == "peek":
        return "unpeek" if method == "DELETE" else "peek"
    if segment == "query":
        return "directory" if path.split("?")[0].endswith("/query/directory") else "other"
    return _BY_SEGMENT.get(segment, "other")


def request_result(error: Exception | None) -> str:
    """The ``result`` label (one of :data:`REQUEST_RESULTS`) of a federation request that
    ended with ``error`` (``None``: a 2xx answer)."""
    if error is None:
        return "ok"
    if isinstance(error, RemoteError):
        if error.status == 429:
            return "rate_limited"
        return {3: "http_3xx", 4: "http_4xx"}.get(error.status // 100, "http_5xx")
    if isinstance(error, DestinationBackingOff):
        return "backing_off"
    if isinstance(error, DestinationBlocked):
        return "refused_by_ip_policy"
    if isinstance(error, BadResponse):
        return "bad_response"
    if isinstance(error, DestinationUnreachable):
        return error.kind
    return "connect_error"


_LOCALS = ".<locals>."


def store_operation(fn: Callable[..., Any]) -> str:
    """The ``operation`` label of a function handed to ``Storage.read``/``write``: a named
    function's qualified name without ``<locals>`` (``Ingest._ingest_locked.write``); for a
    lambda, the first transaction method it calls (``lambda tx: tx.txn_response(...)`` →
    ``txn_response``). Bounded: one value per function in the source code."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or "unknown"
    if name.endswith("<lambda>"):
        code = getattr(fn, "__code__", None)
        names = code.co_names if code is not None else ()
        return names[0] if names else "lambda"
    return name.replace(_LOCALS, ".")


def pushed_pdu_outcomes(
    pushed: Iterable[str],
    *,
    held: Collection[str],
    unshown: Mapping[str, Collection[str]],
    dropped: Collection[str],
) -> Counter[str]:
    """How the PDUs a ``/send`` pushed for one room (their event IDs, past receipt checks
    1-3) ended, for ``peekproxy_send_pdus_total``: ``duplicate`` (in ``held``: stored before
    this transaction), ``soft_failed`` / ``rejected`` (their status in ``unshown``, by the
    auth rules), ``dropped`` (their auth events could not be had), else ``stored``."""
    outcomes: Counter[str] = Counter()
    for event_id in pushed:
        if event_id in held:
            outcomes["duplicate"] += 1
        elif event_id in dropped:
            outcomes["dropped"] += 1
        elif event_id in unshown.get("rejected", ()):
            outcomes["rejected"] += 1
        elif event_id in unshown.get("soft_failed", ()):
            outcomes["soft_failed"] += 1
        else:
            outcomes["stored"] += 1
    return outcomes
