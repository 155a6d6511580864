"""Peek attempt outcomes: error classification, candidate servers, client errors, renewal
timing and peek IDs (protocol.md decisions 2, 3 and 6; acceptance scenarios 15, 21, 22, 27)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from peekproxy.core.outcomes import (
    PeekAttemptFailure,
    PeekFailureKind,
    PeekFailureSummary,
    candidate_servers,
    classify_join_error,
    classify_peek_error,
    new_peek_id,
    renewal_delay_ms,
    summarize_failures,
)
from peekproxy.core.validation import InvalidPeekResponse, RoomNotPeekable
from peekproxy.federation.client import (
    BadResponse,
    DestinationBackingOff,
    DestinationBlocked,
    DestinationUnreachable,
    FederationError,
    RemoteError,
)

K = PeekFailureKind
V12_ROOM = "!Ebs45sjfzusd2e7o8S-D-XoUPlbQKc1otQshU5Hl_ac"


def _remote(status: int, body: object = None, raw: bytes | None = None) -> RemoteError:
    data = raw if raw is not None else json.dumps(body).encode()
    return RemoteError("a.test", status, data)


# --- classify_peek_error --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        (
            _remote(403, {"errcode": "M_FORBIDDEN", "error": "Forbidden by server ACLs"}),
            K.FORBIDDEN,
            "refused the peek (HTTP 403 M_FORBIDDEN: Forbidden by server ACLs)",
        ),
        (_remote(403, raw=b"<html>no</html>"), K.FORBIDDEN, "refused the peek (HTTP 403"),
        (
            _remote(404, {"errcode": "M_NOT_FOUND", "error": "Unknown room"}),
            K.NOT_FOUND,
            "room not found (HTTP 404 M_NOT_FOUND)",
        ),
        (
            _remote(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 404 M_UNRECOGNIZED)",
        ),
        (
            _remote(405, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 405 M_UNRECOGNIZED)",
        ),
        (
            _remote(400, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 400 M_UNRECOGNIZED)",
        ),
        (
            _remote(404, raw=b"<html>404 Not Found</html>"),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 404, not a Matrix error)",
        ),
        (
            _remote(404, raw=b""),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 404, not a Matrix error)",
        ),
        (
            _remote(404, raw=b"null"),  # Dendrite's bare 404
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 404, not a Matrix error)",
        ),
        (
            _remote(405, raw=b"Method Not Allowed"),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (HTTP 405, not a Matrix error)",
        ),
        (
            _remote(
                400,
                {
                    "errcode": "M_INCOMPATIBLE_ROOM_VERSION",
                    "error": "nope",
                    "room_version": "org.example.v99",
                },
            ),
            K.INCOMPATIBLE_ROOM_VERSION,
            "the room's version 'org.example.v99' is not one we support "
            "(HTTP 400 M_INCOMPATIBLE_ROOM_VERSION)",
        ),
        (
            _remote(400, {"errcode": "M_INCOMPATIBLE_ROOM_VERSION"}),
            K.INCOMPATIBLE_ROOM_VERSION,
            "the room's version is not one we support (HTTP 400 M_INCOMPATIBLE_ROOM_VERSION)",
        ),
        (
            _remote(429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 2500}),
            K.RATE_LIMITED,
            "rate limited (HTTP 429 M_LIMIT_EXCEEDED; retry after 2500 ms)",
        ),
        (
            _remote(429, {"errcode": "M_LIMIT_EXCEEDED"}),
            K.RATE_LIMITED,
            "rate limited (HTTP 429 M_LIMIT_EXCEEDED)",
        ),
        (
            _remote(500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}),
            K.SERVER_ERROR,
            "server error (HTTP 500 M_UNKNOWN: Internal server error)",
        ),
        (_remote(502, raw=b"Bad Gateway"), K.SERVER_ERROR, "server error (HTTP 502"),
        (
            _remote(401, {"errcode": "M_UNAUTHORIZED", "error": "bad sig"}),
            K.SERVER_ERROR,
            "refused the request (HTTP 401 M_UNAUTHORIZED: bad sig)",
        ),
        (
            BadResponse("a.test", "response body is not JSON"),
            K.UNSUPPORTED,
            "does not support MSC2444 peeking (response body is not JSON)",
        ),
        (
            BadResponse("a.test", "response exceeds 1024 bytes"),
            K.INVALID_RESPONSE,
            "invalid peek response (response exceeds 1024 bytes)",
        ),
        (
            DestinationUnreachable("a.test", "connection refused"),
            K.UNREACHABLE,
            "unreachable (connection refused)",
        ),
        (
            DestinationBlocked("a.test", "every address is blacklisted"),
            K.UNREACHABLE,
            "unreachable (every address is blacklisted)",
        ),
        (
            DestinationBackingOff("a.test", 3.0),
            K.UNREACHABLE,
            "unreachable (backing off after failures; retry in 3.0s)",
        ),
        (FederationError("a.test", "something odd"), K.UNREACHABLE, "unreachable (something odd)"),
        (
            InvalidPeekResponse("no renewal_interval"),
            K.INVALID_RESPONSE,
            "invalid peek response (no renewal_interval)",
        ),
        (
            RoomNotPeekable("history_visibility is 'shared', not world_readable"),
            K.FORBIDDEN,
            "room may not be peeked (history_visibility is 'shared', not world_readable)",
        ),
        (RuntimeError("boom"), K.UNREACHABLE, "unreachable (boom)"),
        (RuntimeError(), K.UNREACHABLE, "unreachable (RuntimeError)"),
    ],
)
def test_classify(error: Exception, kind: PeekFailureKind, reason: str) -> None:
    failure = classify_peek_error("a.test", error)
    assert failure.server == "a.test"
    assert failure.kind is kind
    assert failure.reason.startswith(reason), failure.reason
    assert "\n" not in failure.reason


def test_classify_retry_after() -> None:
    limited = classify_peek_error("a.test", _remote(429, {"retry_after_ms": 2500}))
    assert limited.retry_after_ms == 2500
    for body in ({"errcode": "M_LIMIT_EXCEEDED"}, {"retry_after_ms": -1}, {"retry_after_ms": "5"}):
        assert classify_peek_error("a.test", _remote(429, body)).retry_after_ms is None
    assert (
        classify_peek_error("a.test", _remote(429, {"retry_after_ms": True})).retry_after_ms is None
    )
    # A Retry-After header, if the error carries the response headers.
    error = _remote(429, raw=b"slow down")
    error.headers = {"Retry-After": "7"}  # type: ignore[attr-defined]
    assert classify_peek_error("a.test", error).retry_after_ms == 7000
    backing_off = classify_peek_error("a.test", DestinationBackingOff("a.test", 1.5))
    assert backing_off.retry_after_ms == 1500
    assert classify_peek_error("a.test", _remote(500, {})).retry_after_ms is None


def test_classify_sanitises_remote_text() -> None:
    text = "line one\nline\x00two\u2028" + "x" * 500
    failure = classify_peek_error("a.test", _remote(403, {"errcode": "M_FORBIDDEN", "error": text}))
    assert failure.kind is K.FORBIDDEN
    assert "\n" not in failure.reason and "\x00" not in failure.reason
    assert "\u2028" not in failure.reason
    assert "line one line two" in failure.reason
    assert len(failure.reason) < 250


# --- candidate_servers ----------------------------------------------------------------------


def test_candidates_order_and_dedupe() -> None:
    assert candidate_servers(
        ["s1.test", "s2.test", "s1.test"], ["alias.test", "s2.test", "r.test"], "!room:r.test"
    ) == ["s1.test", "s2.test", "alias.test", "r.test"]


def test_candidates_room_server_last() -> None:
    assert candidate_servers([], [], "!room:r.test:8448") == ["r.test:8448"]
    assert candidate_servers(["a.test"], [], "!room:r.test") == ["a.test", "r.test"]
    assert candidate_servers(["r.test"], ["a.test"], "!room:r.test") == ["r.test", "a.test"]


def test_candidates_v12_room_has_no_server() -> None:
    assert candidate_servers([], [], V12_ROOM) == []
    assert candidate_servers(["a.test"], ["b.test"], V12_ROOM) == ["a.test", "b.test"]


def test_candidates_drop_invalid_names() -> None:
    hints: list[Any] = ["", "bad name", "a.test", "http://x.test", "[::1]:8448", "b.test:99999", 7]
    expected = ["a.test", "[::1]:8448", "c.test"]
    assert candidate_servers(hints, ["c_d.test", "c.test"], "not a room id") == expected


# --- summarize_failures ---------------------------------------------------------------------


def _failure(server: str, kind: PeekFailureKind, reason: str) -> PeekAttemptFailure:
    return PeekAttemptFailure(server, kind, reason)


UNSUPPORTED = "does not support MSC2444 peeking (HTTP 404 M_UNRECOGNIZED)"
REFUSED = "unreachable (connection refused)"
NOT_FOUND = "room not found (HTTP 404 M_NOT_FOUND)"
FORBIDDEN = "refused the peek (HTTP 403 M_FORBIDDEN: not world_readable)"


def test_summary_no_candidates() -> None:
    assert summarize_failures("!r:a.test", []) == PeekFailureSummary(
        404, "M_NOT_FOUND", "no server to peek !r:a.test through; give server_name hints"
    )


def test_summary_forbidden_names_the_server() -> None:
    failures = [
        _failure("a.test", K.UNSUPPORTED, UNSUPPORTED),
        _failure("b.test", K.FORBIDDEN, FORBIDDEN),
    ]
    assert summarize_failures("!r:a.test", failures) == PeekFailureSummary(
        403,
        "M_FORBIDDEN",
        f"could not peek !r:a.test: a.test: {UNSUPPORTED}; b.test: {FORBIDDEN}",
    )


def test_summary_all_not_found() -> None:
    failures = [
        _failure("a.test", K.NOT_FOUND, NOT_FOUND),
        _failure("b.test", K.NOT_FOUND, NOT_FOUND),
    ]
    assert summarize_failures("!r:a.test", failures) == PeekFailureSummary(
        404, "M_NOT_FOUND", f"could not peek !r:a.test: a.test: {NOT_FOUND}; b.test: {NOT_FOUND}"
    )


def test_summary_unsupported_and_unreachable_is_502() -> None:
    failures = [
        classify_peek_error("a.test", _remote(404, {"errcode": "M_UNRECOGNIZED"})),
        classify_peek_error("b.test", DestinationUnreachable("b.test", "connection refused")),
    ]
    assert summarize_failures("!r:a.test", failures) == PeekFailureSummary(
        502,
        "M_UNKNOWN",
        "could not peek !r:a.test: a.test: does not support MSC2444 peeking "
        "(HTTP 404 M_UNRECOGNIZED); b.test: unreachable (connection refused)",
    )


@pytest.mark.parametrize(
    "kinds",
    [
        [K.UNSUPPORTED],
        [K.UNREACHABLE],
        [K.RATE_LIMITED],
        [K.SERVER_ERROR],
        [K.INVALID_RESPONSE],
        [K.INCOMPATIBLE_ROOM_VERSION],
        [K.NOT_FOUND, K.UNSUPPORTED],
        [K.UNREACHABLE, K.NOT_FOUND],
    ],
)
def test_summary_never_a_false_403(kinds: list[PeekFailureKind]) -> None:
    failures = [_failure(f"s{i}.test", kind, kind.value) for i, kind in enumerate(kinds)]
    summary = summarize_failures("!r:a.test", failures)
    assert (summary.status, summary.errcode) == (502, "M_UNKNOWN")
    expected = "; ".join(f"s{i}.test: {kind.value}" for i, kind in enumerate(kinds))
    assert summary.error == f"could not peek !r:a.test: {expected}"


# --- renewal_delay_ms -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "maximum", "delay"),
    [
        (2000, 1_800_000, 1000),
        (500, 1_800_000, 1000),
        (1, 1_800_000, 1000),
        (3_600_000, 1_800_000, 1_800_000),
        (3_600_000, 3_600_000, 1_800_000),
        (600_000, 1_800_000, 300_000),
        (3_600_000_000, 1_800_000, 1_800_000),  # Dendrite's value
        (3_600_000_000, 10**12, 43_200_000),  # 24 h cap, then half
        (0, 1_800_000, 1_800_000),
        (-5, 1_800_000, 1_800_000),
        (0, 10**12, 43_200_000),
        (2000, 500, 1000),  # the 1 s floor wins over a smaller maximum
    ],
)
def test_renewal_delay(interval: int, maximum: int, delay: int) -> None:
    assert renewal_delay_ms(interval, maximum) == delay


@pytest.mark.parametrize("interval", [None, 2000.0, "2000", True])
def test_renewal_delay_non_int_counts_as_24h(interval: object) -> None:
    assert renewal_delay_ms(interval, 1_800_000) == 1_800_000  # type: ignore[arg-type]
    assert renewal_delay_ms(interval, 10**12) == 43_200_000  # type: ignore[arg-type]


# --- new_peek_id ----------------------------------------------------------------------------


def test_new_peek_id_shape_and_randomness() -> None:
    ids = [new_peek_id() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-zA-Z]{8}", peek_id) for peek_id in ids)
    assert len(set(ids)) == len(ids)
    used = set("".join(ids))
    assert len(used) == 62  # 16 000 draws cover the whole alphabet


@pytest.mark.parametrize(
    ("step", "error", "kind", "reason"),
    [
        (
            "make_join",
            _remote(403, {"errcode": "M_FORBIDDEN", "error": "You are not invited to this room."}),
            PeekFailureKind.FORBIDDEN,
            "make_join refused (HTTP 403 M_FORBIDDEN: You are not invited to this room.)",
        ),
        (
            "make_join",
            _remote(404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}),
            PeekFailureKind.UNSUPPORTED,
            "make_join is not answered (HTTP 404 M_UNRECOGNIZED)",
        ),
        (
            "hierarchy",
            RoomNotPeekable("the room is encrypted"),
            PeekFailureKind.FORBIDDEN,
            "hierarchy shows a room that may not be peeked (the room is encrypted)",
        ),
        (
            "send_join",
            InvalidPeekResponse("no state list"),
            PeekFailureKind.INVALID_RESPONSE,
            "send_join gave an invalid answer (no state list)",
        ),
    ],
)
def test_a_join_failure_names_its_step(
    step: str, error: Exception, kind: PeekFailureKind, reason: str
) -> None:
    failure = classify_join_error("a.test", step, error)
    assert (failure.server, failure.kind, failure.reason) == ("a.test", kind, reason)
