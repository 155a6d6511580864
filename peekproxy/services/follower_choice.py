"""Front mode's :class:`~peekproxy.services.following.RoomFollower`: rooms the fronted
homeserver can show through its client API are followed so, the others by MSC2444 peeks.

A room whose candidate servers include the fronted homeserver's server name is first
followed through the homeserver's client API
(:class:`~peekproxy.services.client_api_follower.ClientApiFollower`); when that fails for
any reason but the room not being peekable (403: it ends there), the other candidates are
tried with MSC2444 (:class:`~peekproxy.services.msc2444.Msc2444Peeks`). Renewals and stops
go to the follower whose handle it is (the client-API follower's handles carry a prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

from peekproxy.services.client_api_follower import ClientApiFollower, is_client_api_handle
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
    RoomFollower,
)

__all__ = ["FollowerChoice"]


class FollowerChoice:
    """The fronted homeserver's own rooms through ``local``, the others through
    ``remote`` (see the module docstring)."""

    def __init__(self, *, local: ClientApiFollower, remote: RoomFollower) -> None:
        self.local = local
        self.remote = remote

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        """Follow through the homeserver's client API when it is a candidate, else (or
        when it cannot read the room) through the other candidates by MSC2444.

        Raises:
            FollowFailed: 403 from the homeserver (the room is not peekable); else every
                candidate failed (the error names the homeserver's failure too).
        """
        server = await self.local.server_name()
        if server is None or server not in candidates:
            return await self.remote.follow(room_id, candidates)
        try:
            return await self.local.follow(room_id, candidates)
        except FollowFailed as failed:
            others = [c for c in candidates if c != server]
            if failed.error.status == 403 or not others:
                raise
            local_error = failed.error.error
        try:
            return await self.remote.follow(room_id, others)
        except FollowFailed as failed:
            error = failed.error
            raise FollowFailed(
                PeekError(
                    error.status, error.errcode, f"{local_error}; {error.error}", **error.extra
                ),
                rate_limited=failed.rate_limited,
                abandoned=failed.abandoned,
            ) from None

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        """Renew through the follower whose ``handle`` it is."""
        return await self._of(handle).renew(room_id, server, handle)

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        """Stop through the follower whose ``handle`` it is."""
        return await self._of(handle).stop(room_id, server, handle)

    def _of(self, handle: str) -> RoomFollower:
        return self.local if is_client_api_handle(handle) else self.remote
