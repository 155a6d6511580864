"""The testbed's outgoing event stream: one sender per destination server.

Events are pushed with signed ``PUT /_matrix/federation/v1/send/{txnId}`` transactions of at
most 50 PDUs, in order; EDUs (typing, receipts) queued meanwhile ride along (at most 100 per
transaction, SSAPI §Transactions), or go alone when no PDU is waiting. A transaction is
retried with the same txnId (back-off from 0.2 s, doubling up to 30 s) until the destination
answers 200, as SSAPI §Transactions requires, as long as the failure is one that may pass: a
5xx, a 429, or a network error (DNS, connection, TLS, timeout). Anything else gives the
transaction up (status ``failed: <reason>``) and the sender goes on with the next one: a 4xx
other than 429, a destination the IP blacklist refuses, or an answer that is not usable (not
JSON, too large).
Faults (:class:`~peekproxy.testbed.faults.Faults`) bend these rules on purpose.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peekproxy.federation.client import (
    DestinationBackingOff,
    FederationClient,
    FederationError,
    path_segment,
)
from peekproxy.testbed.faults import Faults

__all__ = ["DestinationSender", "SendingTransaction", "SentTransaction"]

log = logging.getLogger("peekproxy.testbed.sender")

MAX_PDUS = 50
MAX_EDUS = 100


@dataclass
class SentTransaction:
    """One transaction as the destination saw it (or did not: ``dropped``)."""

    txn_id: str
    event_ids: list[str]
    status: str  # "sent", "dropped", "failed: <reason>"
    #: The ``edu_type`` of each EDU it carried.
    edu_types: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "txn_id": self.txn_id,
            "event_ids": self.event_ids,
            "edu_types": self.edu_types,
            "status": self.status,
        }


@dataclass
class SendingTransaction:
    """The transaction being sent (or waiting to be: ``delay_ms``, back-off) right now."""

    txn_id: str
    event_ids: list[str]
    attempts: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "txn_id": self.txn_id,
            "event_ids": self.event_ids,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


@dataclass
class DestinationSender:
    """Queue and deliver PDUs to one destination; run :meth:`run` in a nursery."""

    destination: str
    origin: str
    client: FederationClient
    faults: Faults
    #: Called after each transaction is handled (sent, dropped, given up) and after each
    #: failed attempt, so watchers can re-check the outbox.
    on_delivered: Callable[[], None] = lambda: None
    pending: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    pending_edus: deque[dict[str, Any]] = field(default_factory=deque)
    transactions: list[SentTransaction] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
    #: The transaction in flight (its events are no longer in ``pending``), or ``None``.
    sending: SendingTransaction | None = None
    _wakeup: trio.Event = field(default_factory=trio.Event)
    _idle: trio.Event = field(default_factory=trio.Event)
    _counter: int = 0

    def enqueue(self, event_id: str, pdu: dict[str, Any]) -> None:
        """Queue one event for delivery (applying the per-event faults)."""
        if self.faults.take("withhold_next"):
            self.withheld.append(event_id)
            return
        if self.faults.take("forge_next"):
            pdu = copy.deepcopy(pdu)
            for signatures in pdu.get("signatures", {}).values():
                for key_id in signatures:
                    signatures[key_id] = "A" * 86  # a well-formed but wrong signature
        self.pending.append((event_id, pdu))
        self._idle = trio.Event()
        self._wakeup.set()

    def enqueue_edu(self, edu: dict[str, Any]) -> None:
        """Queue one EDU (``{"edu_type": ..., "content": ...}``) for delivery."""
        self.pending_edus.append(edu)
        self._idle = trio.Event()
        self._wakeup.set()

    async def wait_idle(self) -> None:
        """Wait until everything queued so far has been handled (also the transaction in
        flight)."""
        if self.pending or self.pending_edus or self.sending is not None:
            await self._idle.wait()

    def _next_txn_id(self) -> str:
        self._counter += 1
        return f"{int(time.time() * 1000)}.{self._counter}.{secrets.token_hex(2)}"

    async def run(self) -> None:
        while True:
            if not self.pending and not self.pending_edus:
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.pending and self.faults.reorder_next and len(self.pending) < 2:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.pending and self.faults.take("reorder_next"):
                first = self.pending.popleft()
                second = self.pending.popleft()
                self.pending.appendleft(first)  # still pending while the second is sent
                await self._deliver([second])
                await self._deliver([self.pending.popleft()])
                continue
            batch = [self.pending.popleft() for _ in range(min(MAX_PDUS, len(self.pending)))]
            await self._deliver(batch)

    async def _deliver(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        event_ids = [event_id for event_id, _ in batch]
        edus = [self.pending_edus.popleft() for _ in range(min(MAX_EDUS, len(self.pending_edus)))]
        txn_id = self._next_txn_id()
        self.sending = SendingTransaction(txn_id, event_ids)
        try:
            await self._deliver_batch(txn_id, event_ids, batch, edus)
        finally:
            self.sending = None

    async def _deliver_batch(
        self,
        txn_id: str,
        event_ids: list[str],
        batch: list[tuple[str, dict[str, Any]]],
        edus: list[dict[str, Any]],
    ) -> None:
        edu_types = [str(edu.get("edu_type")) for edu in edus]
        if self.faults.delay_ms:
            await trio.sleep(self.faults.delay_ms / 1000)
        if self.faults.take("drop_next"):
            self.transactions.append(SentTransaction(txn_id, event_ids, "dropped", edu_types))
            self.on_delivered()
            return
        body: dict[str, Any] = {
            "origin": self.origin,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": [pdu for _, pdu in batch],
        }
        if edus:
            body["edus"] = edus
        status = await self._put_until_ok(txn_id, event_ids, body)
        self.transactions.append(SentTransaction(txn_id, event_ids, status, edu_types))
        self.on_delivered()
        if self.faults.take("duplicate_next"):
            status = await self._put_until_ok(txn_id, event_ids, body)
            self.transactions.append(SentTransaction(txn_id, event_ids, status))
        if self.faults.take("resend_next"):
            again = self._next_txn_id()
            status = await self._put_until_ok(
                again, event_ids, body | {"origin_server_ts": body["origin_server_ts"] + 1}
            )
            self.transactions.append(SentTransaction(again, event_ids, status))
        self.on_delivered()

    async def _put_until_ok(self, txn_id: str, event_ids: list[str], body: dict[str, Any]) -> str:
        sending = SendingTransaction(txn_id, event_ids)
        self.sending = sending
        delay = 0.2
        path = f"/_matrix/federation/v1/send/{path_segment(txn_id)}"
        while True:
            try:
                sending.attempts += 1
                await self.client.put_json(self.destination, path, body)
                return "sent"
            except DestinationBackingOff as e:
                sending.attempts -= 1  # nothing was sent
                sending.last_error = e.reason
                await trio.sleep(e.retry_in)
                continue
            except FederationError as e:
                sending.last_error = e.reason
                if not e.retryable:
                    log.warning(
                        "%s: transaction %s given up: %r", self.destination, txn_id, e.reason
                    )
                    return f"failed: {e.reason}"
            log.info(
                "transaction %s to %s failed (%r); retrying in %.1fs",
                txn_id,
                self.destination,
                sending.last_error,
                delay,
            )
            self.on_delivered()  # wake watchers: the outbox changed
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)
