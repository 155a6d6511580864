"""The :class:`~peekproxy.services.following.RoomFollower` of a daemon with more than one way
to follow a room: which one follows a room, and whose a following is.

* In front mode, a room whose candidate servers include the fronted homeserver's server
  name is first followed through the homeserver's client API
  (:class:`~peekproxy.services.client_api_follower.ClientApiFollower`); when that fails for
  any reason but the room not being peekable (403: it ends there), the other candidates
  are tried.
* The other candidates are peeked by MSC2444 (:class:`~peekproxy.services.msc2444.Msc2444Peeks`).
  When that fails and some candidates showed they lack MSC2444, and the observer join is on
  (``[peeks] fallback = "observer_join"``), the room is joined through those
  (:class:`~peekproxy.services.observer_join.ObserverJoin`); when it is off, the error says
  so and names them.

Renewals and stops go to the follower whose handle it is (the client-API follower's and the
observer's handles carry a prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from peekproxy.services.client_api_follower import ClientApiFollower, is_client_api_handle
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
    RoomFollower,
    is_observer_handle,
)
from peekproxy.services.msc2444 import Msc2444Peeks
from peekproxy.services.observer_join import ObserverJoin

__all__ = ["FollowerChoice", "transport_of"]


def transport_of(handle: str | None) -> str | None:
    """How a following named ``handle`` (``Subscription.peek_id``) reaches the room:
    ``client_api`` (the fronted homeserver's client API,
    :class:`~peekproxy.services.client_api_follower.ClientApiFollower`), ``observer_join``
    (:class:`~peekproxy.services.observer_join.ObserverJoin`), ``msc2444`` (an MSC2444 peek
    ID); ``None`` when the room is followed by nothing now (starting, failed, stopped)."""
    if handle is None:
        return None
    if is_client_api_handle(handle):
        return "client_api"
    if is_observer_handle(handle):
        return "observer_join"
    return "msc2444"


def _prefixed(failed: FollowFailed, before: str, after: str = "") -> FollowFailed:
    """``failed`` with ``before`` / ``after`` added to its error text."""
    error = failed.error
    return FollowFailed(
        PeekError(error.status, error.errcode, f"{before}{error.error}{after}", **error.extra),
        rate_limited=failed.rate_limited,
        abandoned=failed.abandoned,
    )


class FollowerChoice:
    """Rooms followed through ``local`` (the fronted homeserver's own, when given), by
    MSC2444 through ``remote``, or by ``observer`` joins (see the module docstring)."""

    def __init__(
        self,
        *,
        remote: Msc2444Peeks,
        local: ClientApiFollower | None = None,
        observer: ObserverJoin | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.observer = observer

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """Follow through the homeserver's client API when it is a candidate, else (or
        when it cannot read the room) through the other candidates: MSC2444 first, then
        the observer join through those that lack it.

        Raises:
            FollowFailed: 403 from the homeserver (the room is not peekable); else every
                way failed (the error names each candidate and why).
        """
        server = None if self.local is None else await self.local.server_name()
        if self.local is None or server is None or server not in candidates:
            return await self._remote(room_id, candidates)
        try:
            return await self.local.follow(room_id, candidates)
        except FollowFailed as failed:
            others = [c for c in candidates if c != server]
            if failed.error.status == 403 or not others:
                raise
            local_error = failed.error.error
        try:
            return await self._remote(room_id, others)
        except FollowFailed as failed:
            raise _prefixed(failed, f"{local_error}; ") from None

    async def _remote(self, room_id: str, candidates: Sequence[str]) -> Followed:
        try:
            return await self.remote.follow(room_id, candidates)
        except FollowFailed as failed:
            lacking = [c for c in candidates if self.remote.lacks_msc2444(c)]
            if not lacking or failed.error.status == 403:
                raise
            if self.observer is None or not self.observer.settings.joins:
                names = ", ".join(lacking)
                raise _prefixed(
                    failed,
                    "",
                    f" ({names} lack MSC2444 and the observer join is off: "
                    "[peeks] fallback, docs/observer-join.md)",
                ) from None
            abandoned = failed.abandoned
        try:
            followed = await self.observer.follow(room_id, lacking)
        except FollowFailed as joined:
            raise FollowFailed(
                joined.error,
                rate_limited=joined.rate_limited,
                abandoned=(*abandoned, *joined.abandoned),
            ) from None
        return replace(followed, abandoned=(*abandoned, *followed.abandoned))

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Renew through the follower whose ``handle`` it is."""
        return await self._of(handle).renew(room_id, server, handle)

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """Stop through the follower whose ``handle`` it is."""
        return await self._of(handle).stop(room_id, server, handle)

    def _of(self, handle: str) -> RoomFollower:
        if self.local is not None and is_client_api_handle(handle):
            return self.local
        if self.observer is not None and is_observer_handle(handle):
            return self.observer
        return self.remote
