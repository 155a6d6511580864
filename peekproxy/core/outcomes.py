"""Outcomes of peek attempts: error classification, server choice, client errors, timing.

Pure: no I/O, no clock (:func:`new_peek_id` only draws from :mod:`secrets`).

* :func:`classify_peek_error` turns the exception of one failed
  ``PUT /_matrix/federation/v1/peek/{roomId}/{peekId}`` into a :class:`PeekAttemptFailure`;
* :func:`candidate_servers` orders the servers to try (protocol.md §1.2, §2.2; scenario 15);
* :func:`summarize_failures` maps the failures of every server tried to the client's
  ``/peek`` error (protocol.md decision 6; scenarios 21 and 27);
* :func:`renewal_delay_ms` says when to renew (decision 3);
* :func:`new_peek_id` makes the peek IDs peekproxy sends (decision 2).
"""

from __future__ import annotations

import enum
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from peekproxy.core.federation_errors import (
    BadResponse,
    DestinationBackingOff,
    FederationError,
    RemoteError,
)
from peekproxy.core.identifiers import InvalidIdentifier, RoomId, ServerName
from peekproxy.core.validation import InvalidPeekResponse, RoomNotPeekable

__all__ = [
    "MAX_REMOTE_INTERVAL_MS",
    "MIN_RENEWAL_DELAY_MS",
    "PEEK_ID_ALPHABET",
    "PEEK_ID_LENGTH",
    "PeekAttemptFailure",
    "PeekFailureKind",
    "PeekFailureSummary",
    "candidate_servers",
    "classify_join_error",
    "classify_peek_error",
    "new_peek_id",
    "renewal_delay_ms",
    "retry_not_before",
    "summarize_failures",
]

#: Decision 3: remote intervals above 24 h count as 24 h (Dendrite sends 3 600 000 000 ms).
MAX_REMOTE_INTERVAL_MS = 24 * 60 * 60 * 1000
#: Decision 3: never renew more often than once a second.
MIN_RENEWAL_DELAY_MS = 1000
#: Decision 2: the peek IDs peekproxy sends are 8 characters from ``[0-9a-zA-Z]``.
PEEK_ID_ALPHABET = string.digits + string.ascii_letters
PEEK_ID_LENGTH = 8

#: Longest remote-supplied text (the ``error`` of a Matrix error body) quoted in a reason.
_MAX_QUOTED = 120
_UNSUPPORTED = "does not support MSC2444 peeking"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


class PeekFailureKind(enum.Enum):
    """Why a peek through one server failed."""

    #: The server refused (HTTP 403): not world_readable, server ACLs, ... — or the
    #: response showed a room that may not be peeked (:class:`RoomNotPeekable`).
    FORBIDDEN = "forbidden"
    #: The server does not know the room (HTTP 404 ``M_NOT_FOUND``).
    NOT_FOUND = "not found"
    #: The server has no MSC2444 endpoint (``M_UNRECOGNIZED``, bare 404/405, non-JSON).
    UNSUPPORTED = "unsupported"
    #: The room's version is not in our ``ver`` list (HTTP 400 ``M_INCOMPATIBLE_ROOM_VERSION``).
    INCOMPATIBLE_ROOM_VERSION = "incompatible room version"
    #: HTTP 429.
    RATE_LIMITED = "rate limited"
    #: No answer: DNS, connection, TLS, timeout, IP blacklist, back-off, unexpected errors.
    UNREACHABLE = "unreachable"
    #: HTTP 5xx, or another HTTP error status not listed above.
    SERVER_ERROR = "server error"
    #: A 200 whose body is not a valid peek response (too large, or fails validation).
    INVALID_RESPONSE = "invalid response"


@dataclass(frozen=True)
class PeekAttemptFailure:
    """One server's failure.

    ``reason`` is short, one line and human-readable, e.g.
    ``"does not support MSC2444 peeking (HTTP 404 M_UNRECOGNIZED)"``; text quoted from the
    remote is stripped of control characters and cut to 120 characters.
    ``retry_after_ms`` (ms): when the remote asked us to come back (429), or when the local
    back-off ends (:class:`~peekproxy.federation.client.DestinationBackingOff`); else ``None``.
    """

    server: str
    kind: PeekFailureKind
    reason: str
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class PeekFailureSummary:
    """The client's ``/peek`` error: HTTP ``status``, ``errcode`` and ``error`` text."""

    status: int
    errcode: str
    error: str


def _clean(text: str, limit: int = _MAX_QUOTED) -> str:
    """``text`` on one line, without control characters, at most ``limit`` characters."""
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _http_detail(error: RemoteError, *, message: bool) -> str:
    """``HTTP 404 M_UNRECOGNIZED`` plus ``: <remote error text>`` when ``message``."""
    detail = f"HTTP {error.status}"
    if error.errcode:
        detail += f" {_clean(error.errcode, 60)}"
    elif error.json is None:
        detail += ", not a Matrix error"
    if message and error.json is not None:
        text = error.json.get("error")
        if isinstance(text, str) and _clean(text):
            detail += f": {_clean(text)}"
    return detail


def _non_negative_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _retry_after_ms(error: RemoteError) -> int | None:
    """``retry_after_ms`` from the 429 body, else ``Retry-After`` (delta seconds) from the
    response headers if the error carries them (``headers`` attribute), else ``None``."""
    if error.json is not None:
        found = _non_negative_int(error.json.get("retry_after_ms"))
        if found is not None:
            return found
    headers = getattr(error, "headers", None)
    if isinstance(headers, Mapping):
        for name, value in headers.items():
            if isinstance(name, str) and name.lower() == "retry-after":
                text = value.strip() if isinstance(value, str) else ""
                if text.isascii() and text.isdigit():
                    return int(text) * 1000
    return None


def _classify_remote(server: str, error: RemoteError) -> PeekAttemptFailure:
    status, errcode = error.status, error.errcode
    if status == 403:
        reason = f"refused the peek ({_http_detail(error, message=True)})"
        return PeekAttemptFailure(server, PeekFailureKind.FORBIDDEN, reason)
    if errcode == "M_UNRECOGNIZED" and status in (400, 404, 405):
        reason = f"{_UNSUPPORTED} ({_http_detail(error, message=False)})"
        return PeekAttemptFailure(server, PeekFailureKind.UNSUPPORTED, reason)
    if status == 405 or (status == 404 and errcode is None):
        # 405: the path exists, but not for PUT. 404 without a Matrix errcode: a web server
        # or proxy in front of a homeserver that has no such path.
        reason = f"{_UNSUPPORTED} ({_http_detail(error, message=False)})"
        return PeekAttemptFailure(server, PeekFailureKind.UNSUPPORTED, reason)
    if status == 404:
        # M_NOT_FOUND, or another Matrix errcode: a Matrix server saying "not here".
        reason = f"room not found ({_http_detail(error, message=errcode != 'M_NOT_FOUND')})"
        return PeekAttemptFailure(server, PeekFailureKind.NOT_FOUND, reason)
    if status == 400 and errcode == "M_INCOMPATIBLE_ROOM_VERSION":
        version = error.json.get("room_version") if error.json is not None else None
        which = f"version {_clean(version, 40)!r}" if isinstance(version, str) else "version"
        reason = f"the room's {which} is not one we support ({_http_detail(error, message=False)})"
        return PeekAttemptFailure(server, PeekFailureKind.INCOMPATIBLE_ROOM_VERSION, reason)
    if status == 429:
        retry = _retry_after_ms(error)
        after = f"; retry after {retry} ms" if retry is not None else ""
        reason = f"rate limited ({_http_detail(error, message=False)}{after})"
        return PeekAttemptFailure(server, PeekFailureKind.RATE_LIMITED, reason, retry)
    what = "server error" if status >= 500 else "refused the request"
    reason = f"{what} ({_http_detail(error, message=True)})"
    return PeekAttemptFailure(server, PeekFailureKind.SERVER_ERROR, reason)


def classify_peek_error(server: str, error: Exception) -> PeekAttemptFailure:
    """Classify the failure of ``PUT /_matrix/federation/v1/peek/{roomId}/{peekId}`` (or of
    validating its answer) through ``server`` (protocol.md decision 6, §1.5, §4).

    ============================================================  ==========================
    error                                                         kind
    ============================================================  ==========================
    RemoteError 403                                               FORBIDDEN
    RemoteError 400/404/405 ``M_UNRECOGNIZED``                    UNSUPPORTED
    RemoteError 404 without a Matrix errcode; any 405             UNSUPPORTED
    RemoteError 404 ``M_NOT_FOUND`` (or another errcode)          NOT_FOUND
    RemoteError 400 ``M_INCOMPATIBLE_ROOM_VERSION``               INCOMPATIBLE_ROOM_VERSION
    RemoteError 429 (``retry_after_ms`` from the body)            RATE_LIMITED
    RemoteError, any other status (5xx, other 4xx, 3xx)           SERVER_ERROR
    BadResponse "not JSON" (an HTML page, ...)                    UNSUPPORTED
    BadResponse otherwise (too large)                             INVALID_RESPONSE
    :class:`~peekproxy.core.validation.RoomNotPeekable`          FORBIDDEN
    :class:`~peekproxy.core.validation.InvalidPeekResponse`      INVALID_RESPONSE
    other FederationError (unreachable, blocked, backing off)     UNREACHABLE
    anything else                                                 UNREACHABLE
    ============================================================  ==========================

    Never raises. ``retry_after_ms`` is set for 429 (the body's ``retry_after_ms``, else a
    ``Retry-After`` header when the error carries ``headers``) and for
    ``DestinationBackingOff`` (its ``retry_in``).
    """
    if isinstance(error, RemoteError):
        return _classify_remote(server, error)
    if isinstance(error, BadResponse):
        if "not JSON" in error.reason:
            reason = f"{_UNSUPPORTED} ({_clean(error.reason)})"
            return PeekAttemptFailure(server, PeekFailureKind.UNSUPPORTED, reason)
        reason = f"invalid peek response ({_clean(error.reason)})"
        return PeekAttemptFailure(server, PeekFailureKind.INVALID_RESPONSE, reason)
    if isinstance(error, RoomNotPeekable):
        reason = f"room may not be peeked ({_clean(str(error), 200)})"
        return PeekAttemptFailure(server, PeekFailureKind.FORBIDDEN, reason)
    if isinstance(error, InvalidPeekResponse):
        reason = f"invalid peek response ({_clean(str(error), 200)})"
        return PeekAttemptFailure(server, PeekFailureKind.INVALID_RESPONSE, reason)
    if isinstance(error, DestinationBackingOff):
        retry = max(0, round(error.retry_in * 1000))
        reason = f"unreachable ({_clean(error.reason)})"
        return PeekAttemptFailure(server, PeekFailureKind.UNREACHABLE, reason, retry)
    if isinstance(error, FederationError):
        reason = f"unreachable ({_clean(error.reason)})"
        return PeekAttemptFailure(server, PeekFailureKind.UNREACHABLE, reason)
    text = _clean(str(error)) or type(error).__name__
    return PeekAttemptFailure(server, PeekFailureKind.UNREACHABLE, f"unreachable ({text})")


#: How :func:`classify_join_error` rewords the reasons of :func:`classify_peek_error`.
_JOIN_WORDS = (
    (_UNSUPPORTED, "is not answered"),
    ("refused the peek", "refused"),
    ("invalid peek response", "gave an invalid answer"),
    ("room may not be peeked", "shows a room that may not be peeked"),
)


def classify_join_error(server: str, step: str, error: Exception) -> PeekAttemptFailure:
    """Classify the failure of one step of an observer join through ``server`` (``step``:
    the request, e.g. ``"make_join"``) as :func:`classify_peek_error` does, the reason
    naming the step: ``"make_join refused (HTTP 403 M_FORBIDDEN: You are not invited to
    this room.)"``, ``"send_join shows a room that may not be peeked (...)"``. Never raises."""
    failure = classify_peek_error(server, error)
    reason = failure.reason
    for peek_words, join_words in _JOIN_WORDS:
        reason = reason.replace(peek_words, join_words, 1)
    return replace(failure, reason=f"{step} {reason}")


def _is_server_name(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ServerName.parse(value)
    except InvalidIdentifier:
        return False
    return True


def candidate_servers(
    hints: Sequence[str], alias_servers: Sequence[str], room_id: str
) -> list[str]:
    """The servers to peek ``room_id`` through, in the order to try them (protocol.md
    §1.2, §2.2; acceptance scenario 15).

    Order: ``hints`` (the client's ``server_name`` / ``servers``) as given, then
    ``alias_servers`` (the ``servers`` of an alias lookup; put the alias's own server in
    there if wanted), then the server part of ``room_id`` if it has one (room version 12
    IDs have none). Duplicates keep their first place (exact string comparison); entries that
    are not valid server names (APPX §Server Name), including non-strings, are dropped. A
    malformed ``room_id`` contributes no server. Never raises.
    """
    found: dict[str, None] = {}
    for server in (*hints, *alias_servers):
        if server not in found and _is_server_name(server):
            found[server] = None
    try:
        parsed = RoomId.parse(room_id)
    except InvalidIdentifier:
        parsed = None
    if parsed is not None and parsed.server_name is not None:
        server = room_id.partition(":")[2]  # as written: IDs are compared byte for byte
        if _is_server_name(server):
            found.setdefault(server, None)
    return list(found)


def summarize_failures(room_id: str, failures: Sequence[PeekAttemptFailure]) -> PeekFailureSummary:
    """The client's ``/peek`` error after every candidate failed (protocol.md decision 6).

    * no failures (there was no candidate server) → ``404 M_NOT_FOUND``,
      ``"no server to peek {room_id} through; give server_name hints"``;
    * any FORBIDDEN → ``403 M_FORBIDDEN``;
    * every failure NOT_FOUND → ``404 M_NOT_FOUND``;
    * otherwise ``502 M_UNKNOWN``: unsupported, unreachable, rate-limited, incompatible
      room version, server errors and invalid responses never become a 403.

    Apart from the no-candidate case, ``error`` names every server tried and why, in the
    order given: ``"could not peek !r:a.test: a.test: does not support MSC2444 peeking
    (HTTP 404 M_UNRECOGNIZED); b.test: unreachable (connection refused)"``, so a 403 names
    the server(s) that refused.
    """
    if not failures:
        return PeekFailureSummary(
            404, "M_NOT_FOUND", f"no server to peek {room_id} through; give server_name hints"
        )
    text = f"could not peek {room_id}: " + "; ".join(f"{f.server}: {f.reason}" for f in failures)
    kinds = {f.kind for f in failures}
    if PeekFailureKind.FORBIDDEN in kinds:
        return PeekFailureSummary(403, "M_FORBIDDEN", text)
    if kinds == {PeekFailureKind.NOT_FOUND}:
        return PeekFailureSummary(404, "M_NOT_FOUND", text)
    return PeekFailureSummary(502, "M_UNKNOWN", text)


def renewal_delay_ms(remote_interval_ms: int, max_ms: int) -> int:
    """How long to wait before renewing a remote peek, in ms (protocol.md decision 3).

    Half of ``remote_interval_ms`` (the response's ``renewal_interval``, ms), clamped to
    [1000, ``max_ms``]. Intervals above 24 h count as 24 h first. An interval that is not a
    positive integer (0, negative, a float, a bool, ``None``) also counts as 24 h: the
    remote gave no usable deadline, so renew at the longest delay allowed (``max_ms`` unless
    that exceeds 12 h). When ``max_ms`` < 1000 the 1000 ms floor wins.

    Examples: 2000 → 1000; 500 → 1000; 3 600 000 → 1 800 000 (max 1 800 000);
    3 600 000 000 → 24 h → 12 h → ``max_ms``.
    """
    interval = remote_interval_ms
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        interval = MAX_REMOTE_INTERVAL_MS
    interval = min(interval, MAX_REMOTE_INTERVAL_MS)
    return max(MIN_RENEWAL_DELAY_MS, min(interval // 2, max_ms))


def new_peek_id() -> str:
    """A fresh peek ID: 8 characters from ``[0-9a-zA-Z]`` drawn with :mod:`secrets`
    (protocol.md decision 2; valid under every MSC2444 revision, §1.2). 62^8 ≈ 2^47."""
    return "".join(secrets.choice(PEEK_ID_ALPHABET) for _ in range(PEEK_ID_LENGTH))


def retry_not_before(now_ms: int, retry_after_ms: object) -> int | None:
    """When a failed peek may be tried again at the earliest (ms since the epoch): after
    the ``retry_after_ms`` of a 429 (``M_LIMIT_EXCEEDED``), else ``None``."""
    return now_ms + retry_after_ms if isinstance(retry_after_ms, int) else None
