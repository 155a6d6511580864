"""The room directory over federation: a room ID, or an alias resolved at its server.

:meth:`RoomDirectory.resolve` turns what a device asked to peek (a room ID or a
``#alias:server``) into the room ID and the servers the directory names (SSAPI §Querying
directory information, ``GET /_matrix/federation/v1/query/directory``).
:class:`~peekproxy.services.syncing.Syncing` asks it before a room is followed and adds those
servers to the candidates (:func:`peekproxy.core.outcomes.candidate_servers`).

In front mode the fronted homeserver's own aliases are resolved through its client API
(:meth:`peekproxy.services.client_api_follower.ClientApiFollower.directory_entry`); their
entries are checked as the federation ones are.

May import: ``peekproxy.core``, ``peekproxy.federation`` and ``peekproxy.services.errors``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, RoomId
from peekproxy.federation.client import FederationClient, FederationError, RemoteError
from peekproxy.services.errors import PeekError

__all__ = ["LocalAliases", "RoomDirectory"]

#: The directory entry (unchecked JSON, as the federation query answers it) of an alias of
#: the fronted homeserver, read through its client API; ``None`` for another server's alias
#: (front mode: ``ClientApiFollower.directory_entry``).
LocalAliases = Callable[[str], Awaitable[Any | None]]


class RoomDirectory:
    """Room IDs and aliases, resolved over federation through ``client`` (the fronted
    homeserver's own aliases through ``local_aliases`` first, when given: the homeserver may
    not reach peekproxy's own server name over federation)."""

    def __init__(
        self, *, client: FederationClient, local_aliases: LocalAliases | None = None
    ) -> None:
        self.client = client
        self.local_aliases = local_aliases

    async def resolve(self, room_id_or_alias: str) -> tuple[str, list[str]]:
        """A room ID, or an alias resolved over federation (the fronted homeserver's own
        aliases through ``local_aliases``): (room ID, servers from the directory). For an
        alias the servers are those its server listed, then that server itself; for a room
        ID, ``[]``.

        Raises:
            PeekError: 400 malformed, 404 unknown alias, 502 directory unreachable.
        """
        try:
            if room_id_or_alias.startswith("#"):
                alias = RoomAlias.parse(room_id_or_alias)
            else:
                return str(RoomId.parse(room_id_or_alias)), []
        except InvalidIdentifier as e:
            raise PeekError(400, "M_INVALID_PARAM", str(e)) from None  # e names the value, cut
        server = str(alias.server_name)
        answer = None
        if self.local_aliases is not None:
            answer = await self.local_aliases(str(alias))
        if answer is None:
            answer = await self._query_directory(alias, server)
        room_id = answer.get("room_id") if isinstance(answer, dict) else None
        servers = answer.get("servers") if isinstance(answer, dict) else None
        try:
            RoomId.parse(str(room_id))
        except InvalidIdentifier:
            raise PeekError(
                502, "M_UNKNOWN", f"{server} answered the alias lookup with no valid room_id"
            ) from None
        listed = [s for s in servers if isinstance(s, str)] if isinstance(servers, list) else []
        return str(room_id), [*listed, server]

    async def _query_directory(self, alias: RoomAlias, server: str) -> Any:
        """The alias's directory entry from its server over federation (unchecked JSON).

        Raises:
            PeekError: 404 unknown alias, 502 directory unreachable.
        """
        try:
            return await self.client.get_json(
                server, "/_matrix/federation/v1/query/directory", query={"room_alias": str(alias)}
            )
        except RemoteError as e:
            if e.status == 404:
                raise PeekError(404, "M_NOT_FOUND", f"{alias} not found on {server}") from None
            raise PeekError(
                502, "M_UNKNOWN", f"alias lookup at {server} failed: {e.reason}"
            ) from None
        except FederationError as e:
            raise PeekError(
                502, "M_UNKNOWN", f"alias lookup at {server} failed: {e.reason}"
            ) from None
