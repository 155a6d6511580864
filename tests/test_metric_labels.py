"""The metrics' bounded labels (core/metric_labels.py), the scrape-time subscription counts
(services/gauges.py) and the outbound-request counting (metrics.outbound_request)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from peekproxy.core.federation_errors import (
    BadResponse,
    DestinationBackingOff,
    DestinationBlocked,
    DestinationUnreachable,
    RemoteError,
)
from peekproxy.core.metric_labels import (
    ENDPOINTS,
    REQUEST_RESULTS,
    endpoint_kind,
    pushed_pdu_outcomes,
    request_result,
    store_operation,
)
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.metrics import SUBSCRIPTION_STATES, TRANSPORTS, outbound_request
from peekproxy.services.follower_choice import transport_of
from peekproxy.services.gauges import subscription_counts

V1 = "/_matrix/federation/v1"


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("PUT", f"{V1}/peek/%21r%3Ax/abc?ver=10", "peek"),
        ("DELETE", f"{V1}/peek/%21r%3Ax/abc", "unpeek"),
        ("GET", "/_matrix/key/v2/server", "keys"),
        ("POST", "/_matrix/key/v2/query", "keys"),
        ("GET", f"{V1}/event/%24e", "event"),
        ("GET", f"{V1}/event_auth/%21r/%24e", "event_auth"),
        ("GET", f"{V1}/state/%21r?event_id=%24e", "state"),
        ("GET", f"{V1}/state_ids/%21r?event_id=%24e", "state"),
        ("GET", f"{V1}/backfill/%21r?v=%24e&limit=10", "backfill"),
        ("POST", f"{V1}/get_missing_events/%21r", "missing_events"),
        ("GET", f"{V1}/make_join/%21r/%40u", "make_join"),
        ("PUT", "/_matrix/federation/v2/send_join/%21r/%24e", "send_join"),
        ("GET", f"{V1}/make_leave/%21r/%40u", "make_leave"),
        ("PUT", "/_matrix/federation/v2/send_leave/%21r/%24e", "send_leave"),
        ("GET", f"{V1}/hierarchy/%21r", "hierarchy"),
        ("GET", f"{V1}/query/directory?room_alias=%23a%3Ax", "directory"),
        ("GET", f"{V1}/query/profile?user_id=%40u", "other"),
        ("PUT", f"{V1}/send/txn1", "send"),
        ("GET", f"{V1}/version", "other"),
        ("GET", "/somewhere/else", "other"),
    ],
)
def test_endpoint_kind(method: str, path: str, kind: str) -> None:
    assert endpoint_kind(method, path) == kind
    assert kind in ENDPOINTS


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (None, "ok"),
        (RemoteError("x", 404, b'{"errcode": "M_NOT_FOUND"}'), "http_4xx"),
        (RemoteError("x", 429, b""), "rate_limited"),
        (RemoteError("x", 502, b""), "http_5xx"),
        (RemoteError("x", 302, b""), "http_3xx"),
        (DestinationUnreachable("x", "refused"), "connect_error"),
        (DestinationUnreachable("x", "slow", "timeout"), "timeout"),
        (DestinationUnreachable("x", "NXDOMAIN", "dns_error"), "dns_error"),
        (DestinationBlocked("x", "blacklisted"), "refused_by_ip_policy"),
        (DestinationBackingOff("x", 3.0), "backing_off"),
        (BadResponse("x", "not JSON"), "bad_response"),
    ],
)
def test_request_result(error: Exception | None, result: str) -> None:
    assert request_result(error) == result
    assert result in REQUEST_RESULTS


def test_store_operation_names_are_bounded_and_readable() -> None:
    def write(tx: object) -> None:
        pass

    assert store_operation(write).endswith(
        "test_store_operation_names_are_bounded_and_readable.write"
    )
    assert "<locals>" not in store_operation(write)
    # A lambda is named after the first transaction method it calls, whatever it closes over.
    ops = {store_operation(lambda tx, n=n: tx.txn_response("origin", n)) for n in range(50)}
    assert ops == {"txn_response"}
    assert store_operation(lambda tx: None) == "lambda"


def test_pushed_pdu_outcomes() -> None:
    outcomes = pushed_pdu_outcomes(
        ["$held", "$ok", "$soft", "$bad", "$lost", "$ok2"],
        held={"$held"},
        unshown={"soft_failed": {"$soft"}, "rejected": {"$bad"}, "accepted": {"$ok2"}},
        dropped={"$lost"},
    )
    assert outcomes == {
        "duplicate": 1,
        "stored": 2,
        "soft_failed": 1,
        "rejected": 1,
        "dropped": 1,
    }


def test_subscription_counts_have_every_pair() -> None:
    subs = [
        Subscription("!a:x", state=SubState.ACTIVE, server="s", peek_id="abc"),
        Subscription("!b:x", state=SubState.ACTIVE, server="s", peek_id="abd"),
        Subscription("!c:x", state=SubState.ACTIVE, server="s", peek_id="join:$e"),
        Subscription("!d:x", state=SubState.ACTIVE, server="s", peek_id="client-api:1"),
        Subscription("!e:x", state=SubState.FAILED),
    ]
    assert [transport_of(s.peek_id) or "none" for s in subs] == [
        "msc2444",
        "msc2444",
        "observer_join",
        "client_api",
        "none",
    ]
    counts = subscription_counts(subs)
    assert set(counts) == {(s, t) for s in SUBSCRIPTION_STATES for t in TRANSPORTS}
    assert {s.value for s in SubState} == set(SUBSCRIPTION_STATES)
    assert counts["active", "msc2444"] == 2
    assert counts["active", "observer_join"] == counts["active", "client_api"] == 1
    assert counts["failed", "none"] == 1
    assert sum(counts.values()) == len(subs)


def _requests(endpoint: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "peekproxy_federation_requests_total", {"endpoint": endpoint, "result": result}
    )
    assert value is not None or result != "ok"  # every endpoint's ok exists from start
    return value or 0.0


def test_outbound_request_counts_results_not_cancellations() -> None:
    path = f"{V1}/hierarchy/%21r"
    before_ok, before_404 = _requests("hierarchy", "ok"), _requests("hierarchy", "http_4xx")
    with outbound_request("GET", path):
        pass
    with pytest.raises(RemoteError), outbound_request("GET", path):
        raise RemoteError("x", 404, b"")
    with pytest.raises(KeyboardInterrupt), outbound_request("GET", path):
        raise KeyboardInterrupt  # not a request's result (as a cancellation): not counted
    assert _requests("hierarchy", "ok") == before_ok + 1
    assert _requests("hierarchy", "http_4xx") == before_404 + 1


async def test_device_peek_gauge_survives_a_failing_store(autojump_clock: object) -> None:
    """A database error while counting the device peeks is logged and retried next round:
    the metrics task runs in the daemon's own nursery, so raising would end the daemon."""
    import trio

    from peekproxy.services.gauges import DEVICE_PEEKS_EVERY_S, ScrapeGauges

    reads = []

    class FlakyStore:
        async def read(self, fn: object) -> dict[str, int]:
            reads.append(trio.current_time())
            if len(reads) == 1:
                raise OSError("disk I/O error")
            return {"active": 4, "dormant": 1}

    gauges = ScrapeGauges(subscriptions=None, store=FlakyStore())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(gauges.run)
        await trio.sleep(DEVICE_PEEKS_EVERY_S * 1.5)
        nursery.cancel_scope.cancel()
    assert len(reads) == 2
    assert REGISTRY.get_sample_value("peekproxy_device_peeks", {"status": "active"}) == 4
