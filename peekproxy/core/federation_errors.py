"""Errors of outbound federation requests (pure values; raised by ``peekproxy.federation.client``).

Kept in the core so that pure code (``core/outcomes.py``) can classify failures without importing
the HTTP client. ``retryable`` says whether trying later may succeed.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "BadResponse",
    "DestinationBackingOff",
    "DestinationBlocked",
    "DestinationUnreachable",
    "FederationError",
    "RemoteError",
]


class FederationError(Exception):
    """An outbound federation request failed. ``retryable``: trying later may succeed."""

    retryable = True

    def __init__(self, destination: str, reason: str) -> None:
        super().__init__(f"{destination}: {reason}")
        self.destination = destination
        self.reason = reason


class DestinationUnreachable(FederationError):
    """DNS, connection, TLS or timeout failure. ``kind``: ``connect_error`` (connection,
    TLS, a broken answer), ``timeout``, ``dns_error`` (the name could not be resolved, or
    offers no federation) or ``invalid_destination`` (not a server name); the metrics'
    ``result`` label (core/metric_labels.py)."""

    def __init__(self, destination: str, reason: str, kind: str = "connect_error") -> None:
        super().__init__(destination, reason)
        self.kind = kind


class DestinationBlocked(FederationError):
    """Every address of the destination is in the IP blacklist."""

    retryable = False


class DestinationBackingOff(FederationError):
    """The destination failed recently; no request was sent. ``retry_in`` seconds."""

    def __init__(self, destination: str, retry_in: float) -> None:
        super().__init__(destination, f"backing off after failures; retry in {retry_in:.1f}s")
        self.retry_in = retry_in


class BadResponse(FederationError):
    """The answer is not usable (too large, or not JSON where JSON was expected)."""

    retryable = False


class RemoteError(FederationError):
    """The remote answered with an HTTP error status (``status``, ``errcode``, ``body``)."""

    def __init__(self, destination: str, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        self.json: dict[str, Any] | None = None
        try:
            parsed = json.loads(body) if body else None
            if isinstance(parsed, dict):
                self.json = parsed
        except ValueError:
            pass
        self.errcode: str | None = None
        error = ""
        if self.json is not None:
            errcode = self.json.get("errcode")
            self.errcode = errcode if isinstance(errcode, str) else None
            error = str(self.json.get("error", ""))[:200]
        detail = " ".join(x for x in (self.errcode, error) if x) or "no Matrix error body"
        super().__init__(destination, f"HTTP {status} {detail}")
        self.retryable = status >= 500 or status == 429
