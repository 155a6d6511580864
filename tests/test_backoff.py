"""Back-off with jitter (docs/peeking.md, "Back-off"): the pure schedule, the per-destination
back-off of the federation client (over real TLS and DNS: a 5xx answer backs the destination
off, a 4xx does not), and the per-room schedule of renewals and re-peeks."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from peekproxy.core import subscription as subs
from peekproxy.core.backoff import backoff_delay
from peekproxy.core.subscription import Action, Subscription, SubState
from peekproxy.federation.client import DestinationBackingOff, RemoteError
from peekproxy.federation.destinations import Backoff
from tests.test_discovery import World

MAX = 1_800_000


def test_the_schedule_doubles_to_the_maximum_with_twenty_percent_jitter() -> None:
    nominal = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for failures, expected in enumerate(nominal, start=1):
        low = backoff_delay(failures, 1.0, 60.0, 0.0)
        high = backoff_delay(failures, 1.0, 60.0, 1.0)
        middle = backoff_delay(failures, 1.0, 60.0, 0.5)
        assert (low, middle, high) == pytest.approx((0.8 * expected, expected, 1.2 * expected))
    assert backoff_delay(10_000, 1.0, 60.0, 0.5) == 60.0  # no overflow
    for bad in [(0, 1.0, 60.0, 0.5), (1, 0.0, 60.0, 0.5), (1, 1.0, 60.0, 1.5)]:
        with pytest.raises(ValueError):
            backoff_delay(*bad)


def test_destination_backoff_counts_one_outage_once() -> None:
    now = [100.0]
    backoff = Backoff(initial=1.0, maximum=60.0, clock=lambda: now[0], draw=lambda: 0.0)
    backoff.check("a.test")  # never failed: fine
    for _ in range(20):  # twenty rooms' requests fail together: one failure, not twenty
        backoff.failed("a.test")
    with pytest.raises(DestinationBackingOff) as caught:
        backoff.check("a.test")
    assert caught.value.retry_in == pytest.approx(0.8)
    backoff.check("b.test")  # per destination
    now[0] += 0.8
    backoff.check("a.test")  # over: one request may go
    backoff.failed("a.test")  # and fails again: the second failure in a row
    with pytest.raises(DestinationBackingOff) as caught:
        backoff.check("a.test")
    assert caught.value.retry_in == pytest.approx(1.6)
    backoff.succeeded("a.test")
    backoff.check("a.test")
    backoff.failed("a.test")  # a fresh outage starts from the first step again
    with pytest.raises(DestinationBackingOff) as caught:
        backoff.check("a.test")
    assert caught.value.retry_in == pytest.approx(0.8)


@pytest.fixture
def world(nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path) -> World:
    return World(nursery, tls_ca, tmp_path)


async def test_5xx_answers_back_the_destination_off_and_4xx_do_not(world: World) -> None:
    world.hosts["flaky.test"] = "127.10.0.40"
    app = await world.federation_server("flaky", "127.10.0.40", 8449, "flaky.test")
    statuses = [500, 404, 503]

    async def answer(scope: Any, body: bytes) -> tuple[int, Any]:
        return statuses.pop(0), {"errcode": "M_UNKNOWN", "error": "scripted"}

    app.routes[("GET", "/_matrix/federation/v1/publicRooms")] = answer
    client = await world.client()
    now = [0.0]
    client._backoff = Backoff(initial=1.0, maximum=60.0, clock=lambda: now[0], draw=lambda: 1.0)

    async def get() -> Any:
        return await client.get_json(
            "flaky.test:8449", "/_matrix/federation/v1/publicRooms", signed=False
        )

    with pytest.raises(RemoteError) as failed:
        await get()
    assert failed.value.status == 500
    with pytest.raises(DestinationBackingOff):  # not even sent
        await get()
    assert len(app.requests) == 1
    now[0] += 1.21  # 1 s + 20 %
    with pytest.raises(RemoteError) as missing:
        await get()
    assert missing.value.status == 404  # an answer: the destination works
    with pytest.raises(RemoteError) as unavailable:
        await get()  # sent at once: a 4xx does not back off
    assert unavailable.value.status == 503
    with pytest.raises(DestinationBackingOff) as caught:
        await get()
    assert caught.value.retry_in == pytest.approx(1.2)  # the 404 ended the earlier outage
    assert len(app.requests) == 3
    # The destination sends us a transaction: it is up, so what that /send needs from it
    # (get_missing_events) is asked at once, not refused by the back-off.
    statuses.append(200)
    client.heard_from("flaky.test:8449")
    await get()
    assert len(app.requests) == 4
    await client.aclose()


def _active(now: int = 0, interval: int = 2_000) -> Subscription:
    return subs.started(
        Subscription("!r:a.test", candidates=("a.test", "b.test")),
        server="a.test",
        peek_id="abcd1234",
        room_version="10",
        remote_interval_ms=interval,
        now_ms=now,
        max_renewal_ms=MAX,
    )


def test_failed_renewals_back_off_until_the_peek_would_lapse() -> None:
    sub = _active(interval=60_000)  # renew at 30 s; the remote keeps it until 60 s
    times = []
    now = 30_000
    while sub.state is SubState.ACTIVE:
        assert subs.plan(sub, now) == (Action.RENEW, None)
        sub = subs.renewal_failed(sub, refused=False, now_ms=now, draw=0.0)
        if sub.state is SubState.ACTIVE:
            assert sub.renew_at_ms is not None
            assert subs.plan(sub, sub.renew_at_ms - 1) == (None, sub.renew_at_ms)
            now = sub.renew_at_ms
            times.append(now)
    # 0.8 s, 1.6 s, 3.2 s, 6.4 s, 12.8 s after each failure; the last retry is when the
    # interval runs out (60 s), and failing then is a lapse: re-peek at once.
    assert times == [30_800, 32_400, 35_600, 42_000, 54_800, 60_000]
    assert sub.state is SubState.LAPSED and sub.failures == 7
    assert subs.plan(sub, now) == (Action.PEEK, None)
    # A confirmed renewal ends the back-off.
    renewed = subs.renewed(_active(interval=60_000), now_ms=30_000, max_renewal_ms=MAX)
    assert renewed.failures == 0


def test_failed_repeeks_back_off_and_pokes_do_not_cut_it_short() -> None:
    sub = subs.renewal_failed(_active(), refused=True, now_ms=1_000, draw=0.5)
    now, attempts = 1_000, []
    for _ in range(9):
        assert subs.plan(sub, now) == (Action.PEEK, None)
        attempts.append(now)
        failed = subs.start_failed(subs.replace_peek(sub), "every candidate failed")
        sub = subs.repeek_failed(failed, now_ms=now, draw=1.0 - 1e-9)
        assert sub.state is SubState.LAPSED and sub.wanted and sub.retry_at_ms is not None
        # However often the task is woken before the retry time, plan says wait (once the
        # old peek's DELETE is done).
        waiting = replace_deleted(sub)
        assert subs.plan(waiting, sub.retry_at_ms - 1) == (None, sub.retry_at_ms)
        assert subs.plan(waiting, now) == (None, sub.retry_at_ms)
        now = sub.retry_at_ms
    gaps = [b - a for a, b in pairwise(attempts)]
    # failures 2, 3, ... in a row (the refused renewal was the first): 2 s, 4 s, ... 60 s,
    # each at most 20 % longer
    assert gaps == [2_399, 4_799, 9_599, 19_199, 38_399, 71_999, 71_999, 71_999]
    # The old peek is DELETEd while the room waits.
    assert sub.pending_deletes == (("a.test", "abcd1234"),)
    assert subs.plan(sub, attempts[-1] + 1) == (Action.DELETE, None)
    # A success resets the back-off.
    sub = subs.started(
        sub,
        server="b.test",
        peek_id="efgh5678",
        room_version="10",
        remote_interval_ms=2_000,
        now_ms=now,
        max_renewal_ms=MAX,
    )
    assert (sub.failures, sub.retry_at_ms) == (0, None)


def test_a_429_retry_after_is_respected_and_a_never_peeked_room_fails() -> None:
    lapsed = subs.renewal_failed(_active(), refused=True, now_ms=0, draw=0.5)
    sub = subs.repeek_failed(lapsed, now_ms=0, draw=0.0, not_before_ms=30_000)
    assert sub.retry_at_ms == 30_000
    new = Subscription("!n:a.test", candidates=("a.test",))
    assert subs.repeek_failed(new, now_ms=0, draw=0.0).state is SubState.FAILED


def test_restart_spreads_renewals_and_each_still_renews_in_time() -> None:
    assert subs.resume_spread_ms(1) == 10
    assert subs.resume_spread_ms(100) == 1_000
    assert subs.resume_spread_ms(1_000_000) == subs.RESUME_SPREAD_MS == 60_000
    spread = subs.resume_spread_ms(10_000)
    hour = _active(now=0, interval=3_600_000)  # renewed at 0, lapses at 1 h
    now = 1_000_000
    times = set()
    for d in range(100):
        renew_at = subs.resumed(hour, now_ms=now, draw=d / 100, spread_ms=spread).renew_at_ms
        assert renew_at is not None
        times.add(renew_at)
    assert min(times) == now and max(times) >= now + 59_000 and len(times) == 100
    assert max(times) < now + spread
    # Little time left: the window shrinks to half of it, so the renewal is still in time.
    short = _active(now=0, interval=2_000)
    late = subs.resumed(short, now_ms=1_500, draw=1.0, spread_ms=spread)
    assert late.renew_at_ms is not None and 1_500 <= late.renew_at_ms <= 1_750
    # Lapsed while down: re-peeked (old peek DELETEd), spread as well.
    lapsed = subs.resumed(short, now_ms=5_000, draw=0.5, spread_ms=spread)
    assert lapsed.state is SubState.LAPSED and lapsed.pending_deletes == (("a.test", "abcd1234"),)
    assert lapsed.retry_at_ms == 5_000 + spread // 2
    assert subs.plan(lapsed, 5_000) == (Action.DELETE, None)  # DELETE first while it waits
    assert subs.plan(replace_deleted(lapsed), 5_000) == (None, lapsed.retry_at_ms)
    assert subs.plan(lapsed, lapsed.retry_at_ms)[0] is Action.PEEK
    # A peek still starting when peekproxy stopped is abandoned, as before.
    starting = Subscription("!s:a.test", candidates=("a.test",))
    assert subs.resumed(starting, now_ms=0, draw=0.5, spread_ms=spread).state is SubState.DORMANT


def replace_deleted(sub: Subscription) -> Subscription:
    for server, peek_id in sub.pending_deletes:
        sub = subs.deleted(sub, server, peek_id)
    return sub
