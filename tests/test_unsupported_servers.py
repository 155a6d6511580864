"""The memory of servers that lack MSC2444 (pure)."""

from __future__ import annotations

from peekproxy.core.outcomes import PeekFailureKind, classify_peek_error, summarize_failures
from peekproxy.core.unsupported import UNSUPPORTED_HOLD_MS, UnsupportedServers
from peekproxy.federation.client import (
    BadResponse,
    DestinationUnreachable,
    FederationError,
    RemoteError,
)

UNRECOGNIZED = b'{"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}'


def test_an_unsupported_answer_is_remembered_for_an_hour() -> None:
    memory = UnsupportedServers()
    failure = classify_peek_error("syn.test", RemoteError("syn.test", 404, UNRECOGNIZED))
    assert failure.kind is PeekFailureKind.UNSUPPORTED
    memory.record(failure, now_ms=1_000)
    skipped = memory.skip("syn.test", now_ms=1_000 + 60_000)
    assert skipped is not None and skipped.kind is PeekFailureKind.UNSUPPORTED
    assert skipped.reason == (
        "does not support MSC2444 peeking (HTTP 404 M_UNRECOGNIZED); "
        "remembered, not asked again for 59 min"
    )
    assert memory.skip("other.test", now_ms=2_000) is None
    # The device's error still names the skipped server and why (decision 6: a 502).
    summary = summarize_failures("!r:syn.test", [skipped])
    assert (summary.status, summary.errcode) == (502, "M_UNKNOWN")
    assert "syn.test: does not support MSC2444 peeking" in summary.error
    # After the hour it is asked again (it may have been upgraded), and forgotten.
    assert memory.skip("syn.test", now_ms=1_000 + UNSUPPORTED_HOLD_MS) is None
    assert len(memory) == 0


def test_html_405_and_non_json_count_other_failures_do_not() -> None:
    memory = UnsupportedServers()
    html = RemoteError("html.test", 404, b"<html>Not Found</html>")
    wrong_method = RemoteError("old.test", 405, b'{"errcode": "M_UNRECOGNIZED"}')
    html_200 = BadResponse("page.test", "response body is not JSON")  # a 200 HTML page
    unsupported: list[tuple[str, FederationError]] = [
        ("html.test", html),
        ("old.test", wrong_method),
        ("page.test", html_200),
    ]
    for server, error in unsupported:
        memory.record(classify_peek_error(server, error), now_ms=0)
    others: list[tuple[str, FederationError]] = [
        ("down.test", DestinationUnreachable("down.test", "connection refused")),
        ("busy.test", RemoteError("busy.test", 502, b"<html>Bad Gateway</html>")),
        ("nf.test", RemoteError("nf.test", 404, b'{"errcode": "M_NOT_FOUND"}')),
        ("rl.test", RemoteError("rl.test", 429, b'{"errcode": "M_LIMIT_EXCEEDED"}')),
    ]
    for server, other in others:
        memory.record(classify_peek_error(server, other), now_ms=0)
    assert all(memory.skip(s, 1) is not None for s in ("html.test", "old.test", "page.test"))
    assert all(memory.skip(s, 1) is None for s in ("down.test", "busy.test", "nf.test", "rl.test"))


def test_the_memory_is_bounded_oldest_first() -> None:
    memory = UnsupportedServers(max_entries=3)
    for n in range(5):
        error = RemoteError(f"s{n}.test", 404, UNRECOGNIZED)
        memory.record(classify_peek_error(f"s{n}.test", error), now_ms=n)
    assert len(memory) == 3
    assert [memory.skip(f"s{n}.test", 10) is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
