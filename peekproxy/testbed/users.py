"""User IDs as the admin API names them: a localpart (``alice``, a user of this testbed) or a
full user ID (``@alice:server``), checked against the spec's grammar (Appendices §User
Identifiers)."""

from __future__ import annotations

from peekproxy.api.errors import MatrixError
from peekproxy.core.identifiers import InvalidIdentifier, UserId

__all__ = ["any_user_id", "local_user_id", "remote_user_id"]


def _parse(full: str) -> UserId:
    try:
        return UserId.parse(full)
    except InvalidIdentifier as e:
        raise MatrixError(400, "M_INVALID_PARAM", f"bad user ID: {e}") from None


def local_user_id(server_name: str, user: str) -> str:
    """``alice`` or ``@alice:<server_name>`` as a full user ID.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM``: not a valid, compliant user ID of
            ``server_name``.
    """
    full = user if user.startswith("@") else f"@{user}:{server_name}"
    parsed = _parse(full)
    if full.partition(":")[2] != server_name:
        raise MatrixError(400, "M_INVALID_PARAM", f"{full!r} is not a user of this server")
    if not parsed.is_compliant:
        raise MatrixError(
            400,
            "M_INVALID_PARAM",
            f"bad user ID {full!r}: the localpart may only use a-z 0-9 . _ = - / +",
        )
    return full


def any_user_id(server_name: str, user: str) -> str:
    """``alice`` (of ``server_name``) or a full user ID of any server, as a full user ID.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM``: not a valid user ID.
    """
    full = user if user.startswith("@") else f"@{user}:{server_name}"
    _parse(full)
    return full


def remote_user_id(user_id: str) -> str:
    """``user_id``, a full user ID of a simulated remote server, checked.

    Raises:
        MatrixError: 400 ``M_INVALID_PARAM``: not a valid user ID.
    """
    _parse(user_id)
    return user_id
