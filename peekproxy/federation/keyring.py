"""Keyring: other servers' verify keys, fetched, checked, cached and persisted.

* Fetch ``GET /_matrix/key/v2/server`` from the server itself (SSAPI §Publishing Keys): the
  document's ``server_name`` must match and it must be self-signed by one of its
  ``verify_keys``.
* Else ask each configured notary (``POST /_matrix/key/v2/query``, SSAPI §Querying Keys
  Through Another Server) with ``minimum_valid_until_ts``; every answer must be self-signed by
  the origin *and* signed by the notary.
* Keys are cached in memory and in the store, by ``valid_until_ts``. The effective validity
  is ``min(valid_until_ts, fetched_ts + 7 days)`` (the cap the spec requires for room
  versions 5 and later; room versions 1–4 ignore ``valid_until_ts``). ``old_verify_keys``
  count for events sent before their ``expired_ts``, never for requests.
* Events (room versions 5+) need a key valid at their ``origin_server_ts``:
  :meth:`Keyring.fetch_signer_keys` asks for that as ``minimum_valid_until_ts``, so a cached
  key that expires earlier is fetched again, from the server and then the notaries, before
  an event is rejected for it.
* Abuse limits: key IDs that are not ``ed25519:[A-Za-z0-9_]+`` are refused without a fetch;
  a failed fetch of a server is not repeated for 30 s (doubling up to 10 min); a key ID a
  fresh document did not contain, or did not vouch for until the time asked, is not asked
  for again (for that time or later) for 60 s.
* First seen wins: once a key ID is known with some key bytes, different bytes under the
  same ID are ignored (and logged).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from signedjson.key import decode_verify_key_bytes, encode_verify_key_base64
from signedjson.sign import SignatureVerifyException, verify_signed_json
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from peekproxy.core.pdu_signatures import VerifyKeyInfo, signer_key_ids, signer_key_validity
from peekproxy.core.room_versions import RoomVersion
from peekproxy.federation.client import FederationClient, FederationError
from peekproxy.outage import OUTAGE
from peekproxy.store import ServerKeyRow, Storage, StoreError

__all__ = ["KEY_VALIDITY_CAP_MS", "KeyFetchError", "Keyring", "StoredKey", "TrustedNotary"]

log = logging.getLogger(__name__)

KEY_VALIDITY_CAP_MS = 7 * 24 * 3600 * 1000


class KeyFetchError(Exception):
    """No usable key could be obtained; the message says what was tried."""


_KEY_ID = re.compile(r"^ed25519:[A-Za-z0-9_]+\Z")
FAILURE_HOLD_S = 30.0
FAILURE_HOLD_MAX_S = 600.0
MISSING_KEY_HOLD_S = 60.0


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One verify key of one server. Times in ms since the epoch."""

    server_name: str
    key_id: str
    verify_key: VerifyKey
    valid_until_ts: int
    expired_ts: int | None
    fetched_ts: int

    @property
    def effective_valid_until_ts(self) -> int:
        """``valid_until_ts`` capped at 7 days after the fetch."""
        return min(self.valid_until_ts, self.fetched_ts + KEY_VALIDITY_CAP_MS)

    @property
    def is_old(self) -> bool:
        return self.expired_ts is not None

    def info(self) -> VerifyKeyInfo:
        """The form :func:`peekproxy.core.pdu.check_pdu` consumes."""
        if self.is_old:
            return VerifyKeyInfo(self.verify_key, None, self.expired_ts)
        return VerifyKeyInfo(self.verify_key, self.effective_valid_until_ts, None)


@dataclass(frozen=True, slots=True)
class TrustedNotary:
    server_name: str
    verify_keys: Mapping[str, str]  # key ID -> unpadded base64; empty: fetch from the notary


def _decode(key_id: str, key_base64: str) -> VerifyKey:
    key: VerifyKey = decode_verify_key_bytes(key_id, decode_base64(key_base64))
    return key


def parse_key_document(document: Any, server_name: str, fetched_ts: int) -> dict[str, StoredKey]:
    """Check a key document (self-signature, server name) and return its keys.

    Raises:
        KeyFetchError: wrong shape, wrong server name, or not self-signed.
    """
    if not isinstance(document, dict):
        raise KeyFetchError(f"key document for {server_name} is not an object")
    if document.get("server_name") != server_name:
        raise KeyFetchError(
            f"key document is for {document.get('server_name')!r}, not {server_name!r}"
        )
    valid_until = document.get("valid_until_ts")
    verify_keys = document.get("verify_keys")
    if not isinstance(valid_until, int) or not isinstance(verify_keys, dict):
        raise KeyFetchError(f"key document for {server_name} lacks valid_until_ts/verify_keys")
    keys: dict[str, StoredKey] = {}
    try:
        for key_id, entry in verify_keys.items():
            if not key_id.startswith("ed25519:"):
                continue
            keys[key_id] = StoredKey(
                server_name, key_id, _decode(key_id, entry["key"]), valid_until, None, fetched_ts
            )
        old = document.get("old_verify_keys") or {}
        for key_id, entry in old.items():
            if key_id.startswith("ed25519:") and key_id not in keys:
                keys[key_id] = StoredKey(
                    server_name,
                    key_id,
                    _decode(key_id, entry["key"]),
                    0,
                    int(entry["expired_ts"]),
                    fetched_ts,
                )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise KeyFetchError(f"malformed key in key document for {server_name}: {e}") from None
    signers = (document.get("signatures") or {}).get(server_name) or {}
    for key_id in signers:
        key = keys.get(key_id)
        if key is None or key.is_old:
            continue
        try:
            verify_signed_json(document, server_name, key.verify_key)
        except SignatureVerifyException:
            continue
        return keys
    raise KeyFetchError(f"key document for {server_name} is not signed by {server_name}")


class Keyring:
    """Holds verify keys; fetches missing ones. Use one per daemon.

    Args:
        client: an (unsigned is fine) federation client for key fetches.
        store: where keys persist across restarts (``None``: memory only).
        notaries: notaries to ask when a server cannot be reached.
        clock_ms: wall clock in ms since the epoch.
    """

    def __init__(
        self,
        client: FederationClient,
        store: Storage | None = None,
        notaries: Sequence[TrustedNotary] = (),
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._client = client
        self._store = store
        self._notaries = list(notaries)
        self._clock_ms = clock_ms
        self._keys: dict[tuple[str, str], StoredKey] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._failed: dict[str, tuple[float, float, str]] = {}  # until, hold, message
        self._missing: dict[tuple[str, str], float] = {}
        #: (server, key ID) → (until, minimum_valid_until_ts): a fresh fetch did not make the
        #: key valid until that minimum; not asked again for it (or later) until ``until``.
        self._short: dict[tuple[str, str], tuple[float, int]] = {}

    # -- cache -------------------------------------------------------------------------------

    async def load(self) -> int:
        """Load persisted keys; returns how many."""
        if self._store is None:
            return 0
        rows = await self._store.read(lambda tx: tx.server_keys())
        for server_name, key_id, key_b64, valid_until, expired, fetched in rows:
            self._keys[(server_name, key_id)] = StoredKey(
                server_name, key_id, _decode(key_id, key_b64), valid_until, expired, fetched
            )
        return len(rows)

    def cached(self, server_name: str, key_id: str) -> StoredKey | None:
        return self._keys.get((server_name, key_id))

    def lookup(self, server_name: str, key_id: str) -> VerifyKeyInfo | None:
        """A :class:`KeyLookup` over the cache, for :func:`check_pdu` (no I/O)."""
        key = self._keys.get((server_name, key_id))
        return key.info() if key is not None else None

    def add_trusted(self, key: StoredKey) -> None:
        """Put a key known by other means (e.g. configuration) into the cache."""
        self._keys.setdefault((key.server_name, key.key_id), key)

    async def _remember(self, keys: Iterable[StoredKey]) -> None:
        fresh: list[StoredKey] = []
        for key in keys:
            existing = self._keys.get((key.server_name, key.key_id))
            if existing is not None:
                if existing.verify_key.encode() != key.verify_key.encode():
                    log.warning(
                        "ignoring a different key under known key ID %s of %s (first seen wins)",
                        key.key_id,
                        key.server_name,
                    )
                    continue
                if (
                    existing.effective_valid_until_ts >= key.effective_valid_until_ts
                    and existing.expired_ts == key.expired_ts
                ):
                    continue
                if existing.is_old and not key.is_old:
                    continue  # once retired, a key stays retired
            self._keys[(key.server_name, key.key_id)] = key
            fresh.append(key)
        if fresh and self._store is not None:
            rows: list[ServerKeyRow] = [
                (
                    k.server_name,
                    k.key_id,
                    encode_verify_key_base64(k.verify_key),
                    k.valid_until_ts,
                    k.expired_ts,
                    k.fetched_ts,
                )
                for k in fresh
            ]
            try:
                await self._store.write(lambda tx: tx.save_server_keys(rows))
            except StoreError as e:  # the database away: the keys verify from memory as well
                # (a restart fetches them again); the request that needed them goes on.
                OUTAGE.failed("saving fetched server keys", e)

    # -- fetching ----------------------------------------------------------------------------

    def _satisfied(self, server_name: str, key_ids: Iterable[str], minimum: int) -> bool:
        wanted = list(key_ids)
        if not wanted:
            return any(
                s == server_name and not k.is_old and k.effective_valid_until_ts >= minimum
                for (s, _), k in self._keys.items()
            )
        for key_id in wanted:
            key = self._keys.get((server_name, key_id))
            if key is None:
                return False
            if not key.is_old and key.effective_valid_until_ts < minimum:
                return False
        return True

    async def fetch_keys(
        self,
        server_name: str,
        key_ids: Iterable[str] = (),
        *,
        minimum_valid_until_ts: int = 0,
        use_notaries: bool = True,
    ) -> None:
        """Make sure the cache holds ``key_ids`` of ``server_name`` (any current key when
        empty) valid until at least ``minimum_valid_until_ts``; fetch when it does not.

        Raises:
            KeyFetchError: a malformed key ID, or neither the server nor any notary gave
                usable keys; the message lists every source tried and why it failed.
        """
        key_ids = list(key_ids)
        for key_id in key_ids:
            if not _KEY_ID.match(key_id):
                raise KeyFetchError(f"{key_id!r} is not an ed25519 key ID (ed25519:<version>)")
        if self._satisfied(server_name, key_ids, minimum_valid_until_ts):
            return
        now = time.monotonic()
        failed = self._failed.get(server_name)
        if failed is not None and failed[0] > now:
            raise KeyFetchError(f"{failed[2]} (not retried for {failed[0] - now:.0f}s)")
        missing = [k for k in key_ids if self._missing.get((server_name, k), 0.0) > now]
        if missing:
            raise KeyFetchError(
                f"{server_name} did not publish {', '.join(missing)} when last asked"
            )
        short = [
            k
            for k in key_ids
            if (held := self._short.get((server_name, k))) is not None
            and held[0] > now
            and held[1] <= minimum_valid_until_ts
        ]
        if short:
            raise KeyFetchError(
                f"neither {server_name} nor a notary vouched for {', '.join(short)} until "
                f"{minimum_valid_until_ts} when last asked"
            )
        lock = self._locks.setdefault(server_name, trio.Lock())
        if lock.locked() and lock.statistics().owner is trio.lowlevel.current_task():
            raise KeyFetchError(f"cannot get keys of {server_name}: fetch loop")
        async with lock:
            if self._satisfied(server_name, key_ids, minimum_valid_until_ts):
                return
            try:
                await self._fetch_locked(server_name, key_ids, minimum_valid_until_ts, use_notaries)
            except KeyFetchError as e:
                previous = self._failed.get(server_name)
                hold = min(previous[1] * 2, FAILURE_HOLD_MAX_S) if previous else FAILURE_HOLD_S
                reached = any(k[0] == server_name for k in self._keys)
                if not reached:
                    self._failed[server_name] = (time.monotonic() + hold, hold, str(e))
                for key_id in key_ids:
                    if (server_name, key_id) not in self._keys:
                        self._missing[(server_name, key_id)] = time.monotonic() + MISSING_KEY_HOLD_S
                    elif minimum_valid_until_ts:
                        self._short[(server_name, key_id)] = (
                            time.monotonic() + MISSING_KEY_HOLD_S,
                            minimum_valid_until_ts,
                        )
                raise
            self._failed.pop(server_name, None)

    async def _fetch_locked(
        self, server_name: str, key_ids: list[str], minimum: int, use_notaries: bool
    ) -> None:
        errors: list[str] = []
        try:
            keys = await self._from_origin(server_name)
            await self._remember(keys.values())
            if self._satisfied(server_name, key_ids, minimum):
                return
            errors.append(
                f"{server_name}: did not publish {', '.join(key_ids) or 'a key'}"
                f" valid until {minimum}"
            )
        except (FederationError, KeyFetchError) as e:
            errors.append(f"{server_name}: {e}" if server_name not in str(e) else str(e))
        for notary in self._notaries if use_notaries else ():
            if notary.server_name == server_name:
                continue
            try:
                keys = await self._from_notary(notary, server_name, key_ids, minimum)
                await self._remember(keys.values())
            except (FederationError, KeyFetchError) as e:
                errors.append(f"notary {notary.server_name}: {e}")
                continue
            if self._satisfied(server_name, key_ids, minimum):
                return
            errors.append(f"notary {notary.server_name}: no such key")
        raise KeyFetchError(f"cannot get keys of {server_name}: " + "; ".join(errors))

    async def _from_origin(self, server_name: str) -> dict[str, StoredKey]:
        document = await self._client.get_json(server_name, "/_matrix/key/v2/server", signed=False)
        return parse_key_document(document, server_name, self._clock_ms())

    async def _notary_keys(self, notary: TrustedNotary) -> dict[str, VerifyKey]:
        if notary.verify_keys:
            return {kid: _decode(kid, b64) for kid, b64 in notary.verify_keys.items()}
        # A notary's own keys come from the notary itself, never through notaries.
        await self.fetch_keys(notary.server_name, use_notaries=False)
        return {
            kid: k.verify_key
            for (s, kid), k in self._keys.items()
            if s == notary.server_name and not k.is_old
        }

    async def _from_notary(
        self, notary: TrustedNotary, server_name: str, key_ids: list[str], minimum: int
    ) -> dict[str, StoredKey]:
        notary_keys = await self._notary_keys(notary)
        criteria = {"minimum_valid_until_ts": minimum or self._clock_ms()}
        body = {"server_keys": {server_name: {kid: criteria for kid in key_ids}}}
        answer = await self._client.post_json(
            notary.server_name, "/_matrix/key/v2/query", body, signed=False
        )
        documents = answer.get("server_keys") if isinstance(answer, dict) else None
        if not isinstance(documents, list):
            raise KeyFetchError("answer has no server_keys list")
        found: dict[str, StoredKey] = {}
        fetched = self._clock_ms()
        for document in documents:
            if not isinstance(document, dict) or document.get("server_name") != server_name:
                continue
            if not _signed_by_any(document, notary.server_name, notary_keys):
                raise KeyFetchError(f"answer for {server_name} is not signed by the notary")
            found.update(parse_key_document(document, server_name, fetched))
        if not found:
            raise KeyFetchError(f"no keys for {server_name}")
        return found

    # -- uses --------------------------------------------------------------------------------

    async def fetch_signer_keys(self, pdus: Iterable[Any], rules: RoomVersion) -> list[str]:
        """Fetch what :func:`~peekproxy.core.pdu.check_pdu` needs for ``pdus``: the
        key IDs each required signer signed with, and, for room versions 5 and later, valid
        until the newest ``origin_server_ts`` among its PDUs. A cached key that expires
        before that is fetched again with that ``minimum_valid_until_ts``: from the server,
        then from each notary (SSAPI §Retrieving server keys).

        Returns:
            One line per server whose keys could not be had (its PDUs then fail the
            signature check); ``[]`` when everything is in the cache.
        """
        pdus = list(pdus)
        minimums = signer_key_validity(pdus, rules)
        problems: list[str] = []
        for server, key_ids in signer_key_ids(pdus, rules).items():
            try:
                await self.fetch_keys(
                    server, key_ids, minimum_valid_until_ts=minimums.get(server, 0)
                )
            except KeyFetchError as e:
                problems.append(str(e))
        return problems

    async def request_key(self, origin: str, key_id: str) -> VerifyKey:
        """The key to check an X-Matrix request signature: a *current* key of ``origin``,
        valid now (refetched when the cached copy has expired).

        Raises:
            KeyFetchError: unknown, retired or expired key, or it cannot be fetched.
        """
        now = self._clock_ms()
        await self.fetch_keys(origin, [key_id], minimum_valid_until_ts=now)
        key = self._keys[(origin, key_id)]
        if key.is_old:
            raise KeyFetchError(f"{key_id} of {origin} is retired; requests need a current key")
        return key.verify_key


def _signed_by_any(document: Mapping[str, Any], signer: str, keys: Mapping[str, VerifyKey]) -> bool:
    for key_id in (document.get("signatures") or {}).get(signer) or {}:
        key = keys.get(key_id)
        if key is None:
            continue
        try:
            verify_signed_json(dict(document), signer, key)
        except SignatureVerifyException:
            continue
        return True
    return False
