"""The testbed's outgoing event stream: one sender per destination server.

Events are pushed with signed ``PUT /_matrix/federation/v1/send/{txnId}`` transactions of at
most 50 PDUs, in order. A transaction is retried with the same txnId (back-off from 0.2 s,
doubling up to 30 s) until the destination answers 200, as SSAPI §Transactions requires.
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
    RemoteError,
    path_segment,
)
from peekproxy.testbed.faults import Faults

__all__ = ["DestinationSender", "SentTransaction"]

log = logging.getLogger("peekproxy.testbed.sender")

MAX_PDUS = 50


@dataclass
class SentTransaction:
    """One transaction as the destination saw it (or did not: ``dropped``)."""

    txn_id: str
    event_ids: list[str]
    status: str  # "sent", "dropped", "failed: <reason>"

    def to_json(self) -> dict[str, Any]:
        return {"txn_id": self.txn_id, "event_ids": self.event_ids, "status": self.status}


@dataclass
class DestinationSender:
    """Queue and deliver PDUs to one destination; run :meth:`run` in a nursery."""

    destination: str
    origin: str
    client: FederationClient
    faults: Faults
    on_delivered: Callable[[], None] = lambda: None
    pending: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    transactions: list[SentTransaction] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
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

    async def wait_idle(self) -> None:
        """Wait until everything queued so far has been handled."""
        if self.pending:
            await self._idle.wait()

    def _next_txn_id(self) -> str:
        self._counter += 1
        return f"{int(time.time() * 1000)}.{self._counter}.{secrets.token_hex(2)}"

    async def run(self) -> None:
        while True:
            if not self.pending:
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.faults.reorder_next and len(self.pending) < 2:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.faults.take("reorder_next"):
                first, second = self.pending.popleft(), self.pending.popleft()
                await self._deliver([second])
                await self._deliver([first])
                continue
            batch = [self.pending.popleft() for _ in range(min(MAX_PDUS, len(self.pending)))]
            await self._deliver(batch)

    async def _deliver(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        if self.faults.delay_ms:
            await trio.sleep(self.faults.delay_ms / 1000)
        event_ids = [event_id for event_id, _ in batch]
        txn_id = self._next_txn_id()
        if self.faults.take("drop_next"):
            self.transactions.append(SentTransaction(txn_id, event_ids, "dropped"))
            self.on_delivered()
            return
        body: dict[str, Any] = {
            "origin": self.origin,
            "origin_server_ts": int(time.time() * 1000),
            "pdus": [pdu for _, pdu in batch],
        }
        status = await self._put_until_ok(txn_id, body)
        self.transactions.append(SentTransaction(txn_id, event_ids, status))
        self.on_delivered()
        if self.faults.take("duplicate_next"):
            status = await self._put_until_ok(txn_id, body)
            self.transactions.append(SentTransaction(txn_id, event_ids, status))
        if self.faults.take("resend_next"):
            again = self._next_txn_id()
            status = await self._put_until_ok(
                again, body | {"origin_server_ts": body["origin_server_ts"] + 1}
            )
            self.transactions.append(SentTransaction(again, event_ids, status))
        self.on_delivered()

    async def _put_until_ok(self, txn_id: str, body: dict[str, Any]) -> str:
        delay = 0.2
        path = f"/_matrix/federation/v1/send/{path_segment(txn_id)}"
        while True:
            try:
                await self.client.put_json(self.destination, path, body)
                return "sent"
            except DestinationBackingOff as e:
                await trio.sleep(e.retry_in)
                continue
            except RemoteError as e:
                if not e.retryable:
                    log.warning("%s refused transaction %s: %s", self.destination, txn_id, e)
                    return f"failed: {e.reason}"
                reason = str(e)
            except FederationError as e:
                if not e.retryable:
                    log.warning("cannot send transaction %s: %s", txn_id, e)
                    return f"failed: {e.reason}"
                reason = str(e)
            log.info(
                "transaction %s to %s failed (%s); retrying in %.1fs",
                txn_id,
                self.destination,
                reason,
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)
