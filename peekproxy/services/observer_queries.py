"""What other servers ask about the observer user, answered so that they do not retry.

A server that shares a room with the observer (docs/observer-join.md) asks about it when its
own users look at the room's members (research §5 of issue 13, Synapse 1.163):

* ``GET /user/devices/{userId}``: a 404 makes Synapse retry every 30 s for as long as the
  room is shared; ``{"user_id", "stream_id": 0, "devices": []}`` stops it.
* ``POST /user/keys/query``: ``{"device_keys": {user: {}}}`` (no devices).
* ``POST /user/keys/claim``: ``{"one_time_keys": {}}`` (no one-time keys).
* ``GET /query/profile``: ``{"displayname": <observer display name>}``.

Users of other servers get Synapse's ``400 M_UNKNOWN "User is not hosted on this
homeserver"``; users of ours other than the observer (and the observer when the fallback
is off) are unknown: ``404 M_NOT_FOUND`` (key queries: no devices).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peekproxy.services.errors import PeekError
from peekproxy.services.settings import ObserverSettings

__all__ = ["ObserverQueries"]


class ObserverQueries:
    """The observer user's devices, keys and profile (see the module docstring).

    Args:
        observer: the observer (``None``: no user is known).
        server_name: our server name (users ``@…:<server_name>`` are ours); default: the
            observer's; ``None`` with no observer: no user is ours.
    """

    def __init__(
        self, *, observer: ObserverSettings | None, server_name: str | None = None
    ) -> None:
        if server_name is None and observer is not None:
            server_name = observer.server_name
        self.server_name = server_name
        self.observer = observer

    def _check_ours(self, user_ids: Iterable[str]) -> None:
        for user_id in user_ids:
            if self.server_name is None or user_id.partition(":")[2] != self.server_name:
                raise PeekError(400, "M_UNKNOWN", "User is not hosted on this homeserver")

    def _known(self, user_id: str) -> ObserverSettings:
        self._check_ours([user_id])
        if self.observer is None or user_id != self.observer.user_id:
            raise PeekError(404, "M_NOT_FOUND", f"unknown user {user_id}")
        return self.observer

    def user_devices(self, user_id: str) -> dict[str, Any]:
        """``GET /user/devices/{userId}`` (SSAPI §Device Management): the observer has no
        devices. Raises: PeekError 400 (not ours) / 404 (unknown)."""
        self._known(user_id)
        return {"user_id": user_id, "stream_id": 0, "devices": []}

    def keys_query(self, user_ids: Iterable[str]) -> dict[str, Any]:
        """``POST /user/keys/query`` (SSAPI §End-to-End Encryption): no device keys for any
        of ``user_ids`` (ours). Raises: PeekError 400 (a user not ours)."""
        users = list(user_ids)
        self._check_ours(users)
        return {"device_keys": {user_id: {} for user_id in users}}

    def keys_claim(self, user_ids: Iterable[str]) -> dict[str, Any]:
        """``POST /user/keys/claim``: no one-time keys. Raises: PeekError 400 (not ours)."""
        self._check_ours(user_ids)
        return {"one_time_keys": {}}

    def profile(self, user_id: str, field: str | None) -> dict[str, Any]:
        """``GET /query/profile`` (SSAPI §Querying for information): the observer's display
        name (``field``: only that field; it has no ``avatar_url`` nor other fields).
        Raises: PeekError 400 (not ours) / 404 (unknown)."""
        observer = self._known(user_id)
        if field is None or field == "displayname":
            return {"displayname": observer.displayname}
        return {}
