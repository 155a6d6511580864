"""The subscription state machine, driven with a fake clock (no network)."""

from __future__ import annotations

from peekproxy.core import subscription as subs
from peekproxy.core.subscription import Action, Subscription, SubState

MAX = 1_800_000


def _active(now: int = 0, interval: int = 2_000) -> Subscription:
    return subs.started(
        Subscription("!r:a.test", candidates=("a.test",)),
        server="a.test",
        peek_id="abcd1234",
        room_version="10",
        remote_interval_ms=interval,
        now_ms=now,
        max_renewal_ms=MAX,
    )


def test_a_new_subscription_peeks_then_renews_at_half_the_interval() -> None:
    sub = Subscription("!r:a.test", candidates=("a.test",))
    assert subs.plan(sub, 0) == (Action.PEEK, None)
    sub = _active()
    assert sub.state is SubState.ACTIVE and sub.accepts_events
    assert subs.plan(sub, 999) == (None, 1_000)
    assert subs.plan(sub, 1_000) == (Action.RENEW, None)
    sub = subs.renewed(sub, now_ms=1_000, max_renewal_ms=MAX)
    assert subs.plan(sub, 1_500) == (None, 2_000)


def test_intervals_are_clamped() -> None:
    assert _active(interval=500).renew_at_ms == 1_000  # at least 1 s
    assert _active(interval=3_600_000_000).renew_at_ms == MAX  # > 24 h: 24 h, then the max


def test_unreachable_renewal_lapses_only_after_the_interval() -> None:
    sub = _active()
    sub = subs.renewal_failed(sub, refused=False, now_ms=1_000, draw=0.0)
    # Retried after the back-off (0.8 s at the least), never after the interval runs out.
    assert sub.state is SubState.ACTIVE and sub.renew_at_ms == 1_800
    sub = subs.renewal_failed(sub, refused=False, now_ms=1_800, draw=0.0)
    assert sub.state is SubState.ACTIVE and sub.renew_at_ms == 2_000
    sub = subs.renewal_failed(sub, refused=False, now_ms=2_000, draw=0.0)
    assert sub.state is SubState.LAPSED
    assert subs.plan(sub, 2_000) == (Action.PEEK, None)  # re-peek (with a gap) while wanted


def test_refused_renewal_lapses_at_once_and_the_old_peek_is_deleted_after_repeek() -> None:
    sub = subs.renewal_failed(_active(), refused=True, now_ms=100)
    assert sub.state is SubState.LAPSED
    assert subs.plan(sub, 200) == (Action.PEEK, None)  # keeping the room comes first
    sub = subs.replace_peek(sub)
    assert sub.pending_deletes == (("a.test", "abcd1234"),)
    sub = subs.started(
        sub,
        server="b.test",
        peek_id="efgh5678",
        room_version="10",
        remote_interval_ms=2_000,
        now_ms=300,
        max_renewal_ms=MAX,
    )
    assert subs.plan(sub, 300) == (Action.DELETE, None)
    sub = subs.deleted(sub, "a.test", "abcd1234")
    assert subs.plan(sub, 300) == (None, 1_300)


def test_failing_deletes_never_hold_up_renewals() -> None:
    sub = subs.replace_peek(subs.renewal_failed(_active(), refused=True, now_ms=100))
    sub = subs.started(
        sub,
        server="b.test",
        peek_id="efgh5678",
        room_version="10",
        remote_interval_ms=2_000,
        now_ms=300,
        max_renewal_ms=MAX,
    )
    sub = subs.delete_failed(sub, retry_at_ms=60_000)  # a.test keeps failing
    assert subs.plan(sub, 400) == (None, 1_300)
    assert subs.plan(sub, 1_300) == (Action.RENEW, None)
    sub = subs.renewed(sub, now_ms=1_300, max_renewal_ms=MAX)
    assert subs.plan(sub, 1_400) == (None, 2_300)
    assert subs.plan(sub, 60_000)[0] is Action.RENEW  # renewal due too: it goes first


def test_linger_then_stop_then_dormant() -> None:
    sub = subs.unwanted(_active(interval=600_000), now_ms=100, linger_ms=60_000)
    assert not sub.wanted and sub.linger_until_ms == 60_100
    assert subs.plan(sub, 200) == (None, 60_100)  # renewals continue while lingering
    assert subs.plan(sub, 60_100) == (Action.STOP, None)
    sub = subs.stopping(sub)
    assert sub.pending_deletes == (("a.test", "abcd1234"),)
    assert subs.plan(sub, 60_100) == (Action.DELETE, None)
    sub = subs.deleted(sub, "a.test", "abcd1234")
    assert sub.state is SubState.DORMANT and subs.plan(sub, 60_200) == (None, None)
    assert not sub.accepts_events


def test_wanted_again_while_lingering_keeps_the_peek() -> None:
    sub = subs.unwanted(_active(), now_ms=100, linger_ms=60_000)
    sub = subs.wanted(sub, ("b.test",))
    assert sub.wanted and sub.linger_until_ms is None and sub.state is SubState.ACTIVE
    assert sub.candidates == ("b.test", "a.test")


def test_dormant_room_wanted_again_is_repeeked() -> None:
    dormant = subs.deleted(
        subs.stopping(subs.unwanted(_active(), now_ms=0, linger_ms=0)), "a.test", "abcd1234"
    )
    sub = subs.wanted(dormant)
    assert sub.state is SubState.LAPSED and subs.plan(sub, 0) == (Action.PEEK, None)


def test_ended_rooms_delete_and_stay_ended() -> None:
    sub = subs.ended(_active(), "history_visibility changed to 'shared'")
    assert sub.state is SubState.ENDED and not sub.wanted
    assert sub.pending_deletes == (("a.test", "abcd1234"),)
    sub = subs.deleted(sub, "a.test", "abcd1234")
    assert subs.plan(sub, 0) == (None, None)
    assert sub.ended_reason == "history_visibility changed to 'shared'"


def test_failed_start() -> None:
    sub = subs.start_failed(Subscription("!r:a.test"), "a.test: unreachable")
    assert sub.state is SubState.FAILED and subs.plan(sub, 0) == (None, None)
    assert subs.wanted(sub).state is SubState.STARTING
