"""Checks on receipt of a PDU, steps 4-6, for batches of one room's events that passed steps
1-3: the I/O shell around :func:`peekproxy.core.receipt.judge_batch`.

It gathers what a batch cites — stored events and their auth status, the auth events that
are nowhere (``GET /_matrix/federation/v1/event_auth``, else ``GET /event`` one by one;
checked in turn), and for live events the room's current state — and says what is shown and
what is stored unshown: soft-failed and rejected events, and the auth events fetched for
others. Used by ``/send`` (:mod:`peekproxy.services.ingest`), full renewal replies and the
first view (:mod:`peekproxy.services.subscriptions`), and ``/backfill``
(:func:`peekproxy.services.backfill.fill_gap`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from peekproxy.core.receipt import Judgement, cited_auth_ids, judge_batch
from peekproxy.core.room_versions import RoomVersion
from peekproxy.metrics import EVENT_AUTH
from peekproxy.services.following import Fetched
from peekproxy.services.missing_events import MissingEvents
from peekproxy.store import ReadTransaction, Storage, WriteTransaction

__all__ = ["AUTH_FETCH_MAX", "AUTH_FETCH_TIMEOUT_S", "AUTH_REQUESTS_MAX", "EventAuth", "Judged"]

log = logging.getLogger("peekproxy.peeks")

#: Auth events are fetched for at most :data:`AUTH_FETCH_MAX` events of one batch (one
#: ``/event_auth`` each, or ``/event`` for each auth event where that is refused), with at
#: most :data:`AUTH_REQUESTS_MAX` requests in all, within :data:`AUTH_FETCH_TIMEOUT_S`
#: seconds; events still lacking auth events are dropped (not stored: a later delivery may
#: bring them).
AUTH_FETCH_MAX = 10
AUTH_REQUESTS_MAX = 50
AUTH_FETCH_TIMEOUT_S = 10.0


@dataclass
class Judged:
    """A batch after steps 4-6: ``shown`` (event ID, PDU, redacted) in the order judged,
    and what is kept without being shown, by status (``accepted`` auth events fetched for
    the batch, ``soft_failed``, ``rejected``) with reasons; ``dropped``: event ID → reason
    for events whose auth events could not be had (not stored)."""

    shown: list[Fetched] = field(default_factory=list)
    unshown: dict[str, list[Fetched]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def rejected_or_dropped(self) -> list[str]:
        """The IDs of rejected and dropped events (their reasons in :attr:`reasons`):
        what a ``/send`` answers with an error. Soft-failed events are answered like
        accepted ones, as Synapse does."""
        return [*(e for e, _, _ in self.unshown.get("rejected", ())), *self.dropped]

    def store(self, tx: WriteTransaction, room_id: str) -> None:
        """Store the unshown events (before the shown ones are appended, so that these find
        their ``prev_events`` stored)."""
        for status, events in self.unshown.items():
            tx.store_unshown(room_id, events, status=status, reasons=self.reasons)


def _authoriser(pdu: Mapping[str, Any]) -> object:
    """A restricted join's authorising user (rooms/v8), whose membership its rules read."""
    content = pdu.get("content")
    return content.get("join_authorised_via_users_server") if isinstance(content, dict) else None


class EventAuth:
    """Receipt steps 4-6 for one room's batches (module docstring)."""

    def __init__(self, *, store: Storage, missing: MissingEvents) -> None:
        self.store = store
        self.missing = missing

    async def judge(
        self,
        room_id: str,
        rules: RoomVersion,
        events: Sequence[Fetched],
        *,
        server: str,
        live: bool,
        context: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Judged:
        """Judge ``events`` (one room's (event ID, PDU, redacted), past steps 1-3).

        Args:
            server: where to fetch missing auth chains (the ``/send`` origin, the server
                backfilled from).
            live: new events (``/send``, a renewal's fill): steps 5 and 6 against the room's
                current state too; else history, step 4 only.
            context: accepted events not stored yet that the batch may cite (a new peek's
                snapshot, while its first view is fetched).

        Events stored already keep their stored status (accepted ones are shown again, so a
        retried delivery still appends them). Nothing is stored here: the caller stores
        :meth:`Judged.store` and the shown events in one write.
        """
        by_id = {event_id: (pdu, redacted) for event_id, pdu, redacted in events}
        ids = set(by_id)
        cited = {a for pdu, _ in by_id.values() for a in cited_auth_ids(pdu, rules)}
        users = {
            u
            for pdu, _ in by_id.values()
            for u in (pdu.get("sender"), pdu.get("state_key"), _authoriser(pdu))
            if isinstance(u, str) and u.startswith("@")
        }

        def read(
            tx: ReadTransaction,
        ) -> tuple[dict[str, tuple[dict[str, Any], str]], Any, list[str]]:
            judged = tx.judged_events([*ids, *cited])
            state = tx.auth_state(room_id, users) if live else None
            head = tx.newest_event_ids(room_id, 1) if live else []
            return judged, state, head

        judged, state, head = await self.store.read(read)
        result = Judged()
        batch = {}
        for event_id, (pdu, redacted) in by_id.items():
            status = judged.get(event_id, (None, None))[1]
            if status == "accepted":
                result.shown.append((event_id, pdu, redacted))
            elif status is None:
                batch[event_id] = pdu
            else:  # judged before: it keeps its verdict (and its stored row)
                result.unshown.setdefault(status, []).append((event_id, pdu, redacted))
                result.reasons[event_id] = f"{status.replace('_', '-')} when first received"
        stored = {**(context or {}), **{e: p for e, (p, s) in judged.items() if s != "rejected"}}
        rejected = {e for e, (_, s) in judged.items() if s == "rejected"}
        fetched = await self._fetch_auth_chains(
            room_id, rules, batch, server=server, known={*stored, *rejected}
        )
        for event_id, (pdu, redacted) in fetched.items():
            batch.setdefault(event_id, pdu)
            by_id.setdefault(event_id, (pdu, redacted))
        soft_failed = {e for e, (_, s) in judged.items() if s == "soft_failed"}
        judgement = judge_batch(
            batch,
            rules,
            stored=stored,
            rejected=rejected,
            soft_failed=soft_failed,
            state=state,
            head=head,
        )
        self._sort(judgement, result, by_id, set(fetched) - ids)
        return result

    @staticmethod
    def _sort(
        judgement: Judgement,
        result: Judged,
        by_id: dict[str, tuple[dict[str, Any], bool]],
        auth_only: set[str],
    ) -> None:
        def item(event_id: str) -> Fetched:
            return (event_id, *by_id[event_id])

        for event_id in judgement.accepted:
            if event_id in auth_only:
                result.unshown.setdefault("accepted", []).append(item(event_id))
            else:
                result.shown.append(item(event_id))
        EVENT_AUTH.labels("accepted").inc(len(judgement.accepted))
        for kind, part in (
            ("soft_failed", judgement.soft_failed),
            ("rejected", judgement.rejected),
        ):
            EVENT_AUTH.labels(kind).inc(len(part))
            for event_id, reason in part.items():
                result.unshown.setdefault(kind, []).append(item(event_id))
                result.reasons[event_id] = reason
                log.info("%s event %s: %s", kind.replace("_", "-"), event_id, reason)
        EVENT_AUTH.labels("dropped").inc(len(judgement.unknown))
        for event_id, reason in judgement.unknown.items():
            if event_id not in auth_only:
                result.dropped[event_id] = result.reasons[event_id] = reason
                log.info("dropped event %s: %s", event_id, reason)

    async def _fetch_auth_chains(
        self,
        room_id: str,
        rules: RoomVersion,
        batch: dict[str, dict[str, Any]],
        *,
        server: str,
        known: set[str],
    ) -> dict[str, tuple[dict[str, Any], bool]]:
        """The auth events that batch events cite and that are neither in the batch, nor
        stored, nor fetched for an earlier event (:meth:`MissingEvents.auth_chain`); for at
        most :data:`AUTH_FETCH_MAX` events, :data:`AUTH_REQUESTS_MAX` requests, within
        :data:`AUTH_FETCH_TIMEOUT_S` s."""
        fetched: dict[str, tuple[dict[str, Any], bool]] = {}
        asked, requests = 0, 0
        with trio.move_on_after(AUTH_FETCH_TIMEOUT_S):
            for event_id, pdu in list(batch.items()):
                lacking = [
                    a
                    for a in cited_auth_ids(pdu, rules)
                    if a not in known and a not in batch and a not in fetched
                ]
                if not lacking:
                    continue  # the common case: no set is built for it
                if asked >= AUTH_FETCH_MAX or requests >= AUTH_REQUESTS_MAX:
                    break
                asked += 1
                have = known | batch.keys() | fetched.keys()
                got, used = await self.missing.auth_chain(
                    server,
                    room_id,
                    event_id,
                    lacking,
                    rules,
                    known=have,
                    max_requests=AUTH_REQUESTS_MAX - requests,
                )
                requests += used
                for got_id, got_pdu, redacted in got:
                    if got_id not in have:
                        fetched[got_id] = (got_pdu, redacted)
        return fetched
