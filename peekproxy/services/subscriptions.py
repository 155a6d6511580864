"""Remote subscriptions: one per remote room, followed through a :class:`RoomFollower`.

One task per subscribed room asks :func:`peekproxy.core.subscription.plan` what to do and
does it through the follower (:mod:`peekproxy.services.following`; today the MSC2444 peek of
:mod:`peekproxy.services.msc2444`): follow through the candidate servers, renew before the
following lapses, stop it when no device wants it any more (after ``peeks.linger``), follow
again after a lapse (recording a gap). Snapshots are stored here, with the subscription, in
one transaction. Device requests never wait for a renewal or a stop; they wait only for the
first following of a room nobody follows yet (:meth:`Subscriptions.want`).

Other services call: :meth:`~Subscriptions.room_lock` (held while a room's subscription and
its device peeks change together), :meth:`~Subscriptions.want` / :meth:`~Subscriptions.restore` /
:meth:`~Subscriptions.unwanted` (with that lock), :meth:`~Subscriptions.poke`,
:meth:`~Subscriptions.get`, :meth:`~Subscriptions.wait_for_setups`,
:meth:`~Subscriptions.refresh` and :meth:`~Subscriptions.end_peeking` (``/send`` ingest).
With several instances (``[cluster]``), only the holder of a room's lease follows it
(:mod:`peekproxy.services.subscription_cluster`, docs/cluster.md).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import trio

from peekproxy.core import subscription as subs
from peekproxy.core.backoff import backoff_delay
from peekproxy.core.outcomes import retry_not_before
from peekproxy.core.room_versions import room_version
from peekproxy.core.subscription import Action, Subscription, SubState
from peekproxy.logs import bind_log_fields
from peekproxy.metrics import LAPSES, RENEWALS, REPEEKS
from peekproxy.outage import retry_store_errors
from peekproxy.services.errors import PeekError
from peekproxy.services.event_auth import EventAuth, Judged
from peekproxy.services.following import (
    Fetched,
    Followed,
    FollowFailed,
    RenewalFailed,
    RoomFollower,
    RoomSnapshot,
    is_observer_handle,
)
from peekproxy.services.leases import Leases
from peekproxy.services.notifier import Notifier
from peekproxy.services.settings import PeekSettings, now_ms
from peekproxy.services.subscription_cluster import ClusterSubscriptions
from peekproxy.store import Storage, StoreError, WriteTransaction

__all__ = ["DELETE_BACKOFF_S", "SETUP_WAIT_S", "Subscriptions"]

log = logging.getLogger("peekproxy.peeks")

#: How long a ``/send`` waits for the peek of its room being set up meanwhile.
SETUP_WAIT_S = 30.0
#: Retries of failed DELETEs of a room: 1 s doubling to 5 min, ±20 % (re-peeks and renewals
#: back off in the subscription itself: ``subscription.RETRY_BACKOFF_MS``).
DELETE_BACKOFF_S = (1.0, 300.0)


class Subscriptions(ClusterSubscriptions):
    """Remote subscriptions (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Storage,
        follower: RoomFollower,
        notifier: Notifier,
        settings: PeekSettings,
        auth: EventAuth,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.auth = auth
        self.follower = follower
        self.notifier = notifier
        self.settings = settings
        self.clock_ms = clock_ms
        #: The subscription of each remote room known, by room ID.
        self.by_room: dict[str, Subscription] = {}
        self._changed: dict[str, trio.Event] = {}
        self._tasks: set[str] = set()
        self._room_locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        #: Several instances on one database: the rooms this one follows (docs/cluster.md).
        self.leases: Leases | None = None
        if settings.cluster is not None:
            self.leases = Leases(store=store, settings=settings.cluster, clock_ms=clock_ms)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load subscriptions, resume them (renew at once; a lapse while down becomes a
        gap) and keep them going until cancelled."""
        now = self.clock_ms()
        loaded = await self.store.read(lambda tx: tx.load_subscriptions())
        if self.leases is not None:  # resume only the rooms this instance takes
            loaded = await self._take_free(loaded)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            spread = subs.resume_spread_ms(len(loaded))
            resumed = [self._resume(sub, now, spread) for sub in loaded]

            def save_all(
                tx: WriteTransaction,
            ) -> None:  # one transaction: one fsync, not one per room
                for sub in resumed:
                    tx.save_subscription(sub)

            await self.store.write(save_all)
            for old, sub in zip(loaded, resumed, strict=True):
                _count_lapse(old, sub)
                self.by_room[sub.room_id] = sub
                self._ensure_task(sub.room_id)
            if loaded:
                log.info("resumed %d subscriptions", len(loaded))
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:  # stopping: a poke from a task still ending starts no task
                self._nursery = None

    @staticmethod
    def _resume(sub: Subscription, now_ms: int, spread_ms: int) -> Subscription:
        # Renewals (and re-peeks) after a restart are spread out, each still in time.
        return subs.resumed(sub, now_ms=now_ms, draw=random.random(), spread_ms=spread_ms)

    def get(self, room_id: str) -> Subscription | None:
        """The subscription of ``room_id``, if the room was ever followed."""
        return self.by_room.get(room_id)

    def observed(self, room_id: str) -> bool:
        """Whether ``room_id`` is followed by an observer join that takes its events (the
        observer is in the room: docs/observer-join.md)."""
        sub = self.by_room.get(room_id)
        return sub is not None and sub.accepts_events and is_observer_handle(sub.peek_id)

    def room_version_of(self, room_id: str) -> str | None:
        """The room version of a followed room (``None``: unknown or not followed yet)."""
        sub = self.by_room.get(room_id)
        return sub.room_version if sub is not None else None

    def _ensure_task(self, room_id: str) -> None:
        if room_id in self._tasks or self._nursery is None or not self.owns(room_id):
            return
        self._tasks.add(room_id)
        self._nursery.start_soon(
            retry_store_errors,
            self.store.ping,
            f"the task of {room_id}",
            self._run_subscription,
            room_id,
        )

    def poke(self, room_id: str) -> None:
        """The room's subscription changed: its task (started if none runs) plans again."""
        event = self._changed.pop(room_id, None)
        if event is not None:
            event.set()
        self._ensure_task(room_id)

    def room_lock(self, room_id: str) -> trio.Lock:
        """The lock held while the room's subscription (and its device peeks) change; the
        first following of a room holds it until its snapshot is stored."""
        return self._room_locks.setdefault(room_id, trio.Lock())

    async def _save(self, sub: Subscription) -> None:
        _count_lapse(self.by_room.get(sub.room_id), sub)
        self.by_room[sub.room_id] = sub
        await self.store.write(lambda tx: tx.save_subscription(sub))

    # -- for the other services ------------------------------------------------------------

    async def want(self, room_id: str, candidates: tuple[str, ...]) -> Subscription:
        """A device wants ``room_id`` (call with :meth:`room_lock` held): follow it through
        ``candidates`` unless it is followed already; returns the subscription, stored.

        Raises:
            PeekError: 503 ``max_remote_peeks`` reached; else as :meth:`_establish` (on an
                instance that does not follow the room: as :meth:`_follow_or_view`).
        """
        bind_log_fields(room_id=room_id)  # the request's task: the room it peeks
        viewed = await self._follow_or_view(room_id) if self.leases is not None else None
        if viewed is not None:
            return viewed
        sub = self.by_room.get(room_id)
        if sub is None:
            live = sum(
                1 for s in self.by_room.values() if s.wanted and s.state is not SubState.FAILED
            )
            if live >= self.settings.live.max_remote_peeks:
                raise PeekError(
                    503,
                    "M_RESOURCE_LIMIT_EXCEEDED",
                    "this server peeks as many rooms as it may",
                )
            sub = Subscription(room_id=room_id, candidates=candidates)
        sub = subs.wanted(sub, candidates)
        if not sub.has_remote_peek:
            try:
                sub = await self._establish(sub, gap=sub.room_version is not None)
            except PeekError as e:
                await self._after_failed_start(room_id, e)
                raise
        await self._save(sub)
        return sub

    async def restore(self, room_id: str) -> None:
        """A device's dormant peek of a followed room becomes active again (call with
        :meth:`room_lock` held): follow the room again (with a gap) unless another device
        kept it followed.

        Raises:
            PeekError: the room could not be followed again; its task retries after the
                back-off (unless the room is not peekable, 403). The subscription is saved.
        """
        if not self.owns(room_id) and not await self._take_over(room_id):
            return  # its owner sees the device peek active again and follows the room
        sub = subs.wanted(self.by_room[room_id])
        failure: PeekError | None = None
        if not sub.has_remote_peek:
            try:
                sub = await self._establish(sub, gap=True)
            except PeekError as e:
                failure = e
                sub = self.by_room[room_id]
                if e.status != 403:  # the room's task retries after the back-off
                    sub = self._repeek_failed(sub, e)
        await self._save(sub)
        if failure is not None:
            raise failure

    async def unwanted(self, room_id: str, now_ms: int) -> None:
        """No device wants ``room_id`` any more (call with :meth:`room_lock` held): the
        following stops after ``linger_ms`` (an observer join: after the observer's own
        ``linger_ms``, so that idle and restore do not spam membership events)."""
        sub = self.by_room.get(room_id)
        if sub is not None and self.owns(room_id):  # an owner elsewhere counts the peeks
            linger_ms = self.settings.linger_ms
            observer = self.settings.observer
            if observer is not None and is_observer_handle(sub.peek_id):
                linger_ms = observer.linger_ms
            await self._save(subs.unwanted(sub, now_ms=now_ms, linger_ms=linger_ms))

    async def end_peeking(self, room_id: str, reason: str) -> None:
        """The room is no longer peekable (protocol.md decision 10): its subscription and
        every device peek of it end. On an instance that does not follow the room, the
        owner is asked to end the subscription (through the room's lease)."""
        if not self.owns(room_id):
            await self.store.write(lambda tx: tx.request_end(room_id, reason))
            self.by_room[room_id] = subs.ended(self.by_room[room_id], reason)
            await self._end_device_peeks(room_id)
            log.info("%s is no longer peekable (%s): its owner is told", room_id, reason)
            return
        async with self.room_lock(room_id):
            await self._save(subs.ended(self.by_room[room_id], reason))
        await self._end_device_peeks(room_id)
        self.poke(room_id)
        log.info("%s is no longer peekable (%s): peeks ended", room_id, reason)

    async def wait_for_setups(self, room_ids: Iterable[str]) -> None:
        """Wait (at most :data:`SETUP_WAIT_S`) for the peeks being set up of ``room_ids``.
        A target pushes a room's events as soon as it has answered the peek's PUT, while
        peekproxy is still checking the answer and fetching the first view; refused, such an
        event would not be sent again (until a later event brings it with
        ``get_missing_events``, or never in a quiet room)."""
        for room_id in room_ids:
            lock = self._room_locks.get(room_id)
            sub = self.by_room.get(room_id)
            if lock is None or not lock.locked() or (sub is not None and sub.accepts_events):
                continue
            with trio.move_on_after(SETUP_WAIT_S):
                async with lock:  # the set-up holds the room's lock until it is stored
                    pass

    def _repeek_failed(self, sub: Subscription, error: PeekError) -> Subscription:
        """``sub`` after a failed (re-)peek: its back-off grows, not shorter than the
        remote's ``retry_after_ms`` (core.subscription.repeek_failed)."""
        now = self.clock_ms()
        retry_after_ms = error.extra.get("retry_after_ms")
        return subs.repeek_failed(
            sub,
            now_ms=now,
            draw=random.random(),
            not_before_ms=retry_not_before(now, retry_after_ms),
        )

    async def _after_failed_start(self, room_id: str, error: PeekError) -> None:
        """A device's peek failed. Devices already peeking the room keep their subscription
        retrying (it stays lapsed); otherwise nobody wants the room, and it does not count
        towards ``max_remote_peeks``."""
        sub = self.by_room[room_id]
        others = await self.store.read(lambda tx: tx.device_peek_count(room_id))
        if others and sub.state is SubState.FAILED and sub.room_version is not None:
            # Every candidate just failed: the room's task retries after the back-off.
            sub = self._repeek_failed(replace(sub, wanted=True), error)
        elif not others:
            sub = replace(sub, wanted=False)
        await self._save(sub)
        self.poke(room_id)

    async def _establish(self, sub: Subscription, *, gap: bool) -> Subscription:
        """Follow the room through its candidates; store the first snapshot.

        Raises:
            PeekError: every candidate failed (the summary names each and why).
        """
        room_id = sub.room_id
        sub = subs.replace_peek(sub)
        try:
            followed = await self.follower.follow(room_id, sub.candidates)
        except FollowFailed as failed:
            if gap:
                REPEEKS.labels("failed").inc()
            sub = replace(sub, pending_deletes=(*sub.pending_deletes, *failed.abandoned))
            error = failed.error
            if failed.rate_limited:
                await self._save(subs.start_failed(sub, error.error))
                raise error from None
            if error.status == 403:
                sub = subs.ended(sub, error.error)
            else:
                sub = subs.start_failed(sub, error.error)
            await self._save(sub)
            self.poke(room_id)
            raise error from None
        sub = subs.started(
            replace(sub, pending_deletes=(*sub.pending_deletes, *followed.abandoned)),
            server=followed.server,
            peek_id=followed.handle,
            room_version=followed.snapshot.room_version,
            remote_interval_ms=followed.interval_ms,
            now_ms=followed.at_ms,
            max_renewal_ms=self.settings.renewal_max_ms,
        )
        await self._store_snapshot(sub, followed, gap=gap)
        if gap:
            REPEEKS.labels("ok").inc()
        log.info(
            "peeking %s through %s (peek %s, interval %d ms%s)",
            room_id,
            followed.server,
            followed.handle,
            followed.interval_ms,
            ", after a gap" if gap else "",
        )
        return sub

    async def _store_snapshot(self, sub: Subscription, followed: Followed, *, gap: bool) -> None:
        """Store a new snapshot with the newest events before its latest event, fetched
        from the followed server (``followed.history``): the first sync then shows up to
        the timeline limit of them, as on a join; a gap precedes them when older history is
        missing."""
        validated, found = followed.snapshot, followed.history
        judged = None
        if found is not None and not followed.trusted:
            # The snapshot's events may be its history's auth events.
            judged = await self.auth.judge(
                sub.room_id,
                room_version(validated.room_version),
                found[0],
                server=followed.server,
                live=False,
                context=validated.events,
            )
            found = (judged.shown, found[1])
        now = self.clock_ms()

        def write(tx: WriteTransaction) -> None:
            if judged is not None:
                judged.store(tx, sub.room_id)
            tx.store_snapshot(
                sub.room_id,
                events=validated.events,
                redacted=validated.redacted,
                state=validated.state,
                latest_event_id=validated.latest_event_id,
                gap=gap,
                now_ms=now,
                history=None if found is None else found[0],
                history_complete=found is not None and found[1],
            )
            tx.save_subscription(sub)

        await self.store.write(write)
        self.by_room[sub.room_id] = sub
        self.notifier.notify_room(sub.room_id)

    # -- the subscription task ------------------------------------------------------------

    async def _run_subscription(self, room_id: str) -> None:
        delete_failures = 0
        store_failed = False
        try:
            while True:
                bind_log_fields(fresh=True, room_id=room_id)  # not those of who started it
                if not self.owns(room_id):
                    return  # another instance follows it now (fencing: docs/cluster.md)
                changed = self._changed.setdefault(room_id, trio.Event())
                sub = self.by_room[room_id]
                action, wake = subs.plan(sub, self.clock_ms())
                if action is None:
                    if wake is None:
                        if sub.state in (SubState.DORMANT, SubState.FAILED, SubState.ENDED):
                            if self.leases is not None:  # nothing to look after
                                await self.leases.release(room_id)
                            return  # a later peek starts a new task
                        await changed.wait()
                    else:
                        with trio.move_on_after(max(0.0, (wake - self.clock_ms()) / 1000)):
                            await changed.wait()
                    continue
                if action is Action.RENEW:
                    await self._renew(room_id)
                elif action is Action.STOP:
                    async with self.room_lock(room_id):
                        await self._stop_unless_wanted(room_id)
                elif action is Action.DELETE:
                    if await self._delete_pending(room_id):
                        delete_failures = 0
                    else:
                        delete_failures += 1
                        delay = backoff_delay(delete_failures, *DELETE_BACKOFF_S, random.random())
                        async with self.room_lock(room_id):
                            retry_at = self.clock_ms() + int(delay * 1000)
                            await self._save(subs.delete_failed(self.by_room[room_id], retry_at))
                elif action is Action.PEEK:
                    async with self.room_lock(room_id):
                        sub = self.by_room[room_id]
                        if subs.plan(sub, self.clock_ms())[0] is not Action.PEEK:
                            continue
                        try:
                            sub = await self._establish(sub, gap=sub.room_version is not None)
                        except PeekError as e:
                            # _establish saved the failed attempt (its old peek queued for
                            # DELETE); the room waits out its back-off in plan(), which a
                            # poke cannot cut short.
                            sub = self.by_room[room_id]
                            if e.status == 403:
                                sub = subs.ended(sub, e.error)
                                await self._end_device_peeks(room_id)
                            else:
                                sub = self._repeek_failed(sub, e)
                            log.warning(
                                "re-peek of %s failed (%d in a row): %s",
                                room_id,
                                sub.failures,
                                e.error,
                            )
                        await self._save(sub)
        except StoreError:
            store_failed = True  # still the room's task: run again after the back-off
            raise
        finally:
            if not store_failed:
                self._tasks.discard(room_id)

    async def _renew(self, room_id: str) -> None:
        sub = self.by_room[room_id]
        assert sub.server is not None and sub.peek_id is not None
        peek_id = sub.peek_id
        bind_log_fields(destination=sub.server, peek_id=peek_id)  # until the task's next plan
        renewal = await self.follower.renew(room_id, sub.server, peek_id)
        RENEWALS.labels("failed" if isinstance(renewal, RenewalFailed) else "ok").inc()
        if isinstance(renewal, RenewalFailed) or renewal.snapshot is None:
            async with self.room_lock(room_id):
                current = self.by_room[room_id]
                if current.peek_id != peek_id:
                    return
                if isinstance(renewal, RenewalFailed):
                    current = subs.renewal_failed(
                        current, refused=renewal.refused, now_ms=renewal.at_ms, draw=random.random()
                    )
                else:
                    current = subs.renewed(
                        current, now_ms=renewal.at_ms, max_renewal_ms=self.settings.renewal_max_ms
                    )
                    log.debug("renewed peek %s of %s", peek_id, room_id)
                await self._save(current)
            return
        async with self.room_lock(room_id):
            current = self.by_room[room_id]
            if current.peek_id != peek_id:
                return
            renewed = subs.renewed(
                current,
                now_ms=renewal.at_ms,
                max_renewal_ms=self.settings.renewal_max_ms,
                remote_interval_ms=renewal.interval_ms,
            )
            changed, gap = await self._store_renewal(renewed, renewal.snapshot, renewal.fill)
        if changed:
            self.notifier.notify_room(room_id)
        if gap:
            log.info("renewal reply for %s shows events we cannot fetch: recorded a gap", room_id)

    async def _store_renewal(
        self,
        sub: Subscription,
        validated: RoomSnapshot,
        fill: Sequence[Fetched],
    ) -> tuple[bool, bool]:
        """Store a full renewal reply: the fetched events and its latest event appended in
        DAG order (a gap only before what could not be fetched), then its state. A reply
        whose latest event we hold already changes nothing but the state, and that only
        when that event is still our newest. Returns whether the room changed and whether a
        gap was recorded."""
        now = self.clock_ms()
        room_id, latest = sub.room_id, validated.latest_event_id
        judged = Judged()
        if fill:
            rules = room_version(validated.room_version)
            judged = await self.auth.judge(room_id, rules, fill, server=sub.server or "", live=True)
            fill = judged.shown

        def write(tx: WriteTransaction) -> tuple[bool, bool]:
            tx.save_subscription(sub)
            judged.store(tx, room_id)
            if tx.known_event_ids([latest]):
                newest = tx.newest_event_ids(room_id, 1) == [latest]
                if newest and tx.current_state_ids(room_id) != validated.state:
                    tx.replace_state(room_id, validated.state)
                    return True, False
                return False, False
            _, gap = tx.append_in_dag_order(
                room_id,
                [*fill, (latest, validated.events[latest], latest in validated.redacted)],
                now_ms=now,
            )
            tx.store_snapshot(
                room_id,
                events=validated.events,
                redacted=validated.redacted,
                state=validated.state,
                latest_event_id=latest,
                gap=False,
                now_ms=now,
            )
            return True, gap

        changed, gap = await self.store.write(write)
        self.by_room[room_id] = sub
        return changed, gap

    async def _delete_pending(self, room_id: str) -> bool:
        """Stop every following pending a stop (a DELETE of each old peek); True when none
        is left."""
        sub = self.by_room[room_id]
        for server, peek_id in sub.pending_deletes:
            bind_log_fields(destination=server, peek_id=peek_id)
            if not await self.follower.stop(room_id, server, peek_id):
                continue
            async with self.room_lock(room_id):
                await self._save(subs.deleted(self.by_room[room_id], server, peek_id))
            log.info("stopped peek %s of %s at %s", peek_id, room_id, server)
        return not self.by_room[room_id].pending_deletes

    async def _end_device_peeks(self, room_id: str) -> None:
        now = self.clock_ms()
        ended = await self.store.write(lambda tx: tx.end_room_peeks(room_id, now))
        if ended:
            log.info("ended %d device peeks of %s", ended, room_id)
        self.notifier.notify_room(room_id)


def _count_lapse(old: Subscription | None, new: Subscription) -> None:
    """``peekproxy_lapses_total``: an active following became lapsed."""
    if new.state is SubState.LAPSED and old is not None and old.state is SubState.ACTIVE:
        LAPSES.inc()
