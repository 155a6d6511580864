"""Server access control lists: whether ``m.room.server_acl`` lets a server in.

Client-server API §Server Access Control Lists (ACLs) for rooms, applied in the order
Synapse applies them (``synapse.storage.controllers.state.server_acl_evaluator_from_event``
and its Rust ``ServerAclEvaluator``):

1. The server name is matched **without its port**; an IPv6 literal keeps its brackets
   (``[::1]``).
2. ``allow_ip_literals: false`` (default ``true``; a non-boolean counts as ``true``) denies an
   IPv4 or IPv6 literal.
3. A match in ``deny`` denies.
4. A match in ``allow`` allows.
5. Anything else is denied (an ACL with no ``allow`` denies everyone).

Globs: ``*`` is any run of characters (also none), ``?`` exactly one; they match the whole
host, case-insensitively. Non-string entries and a non-list ``allow``/``deny`` are ignored. A
server name that is not a valid server name is denied. No ACL event at all allows everyone.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from peekproxy.core.identifiers import InvalidIdentifier, ServerName

__all__ = ["acl_glob", "acl_host", "server_allowed"]


@functools.lru_cache(maxsize=1024)
def acl_glob(pattern: str) -> re.Pattern[str]:
    """An ACL glob as a case-insensitive whole-host regex (use ``fullmatch``)."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def acl_host(server_name: str) -> str | None:
    """The host an ACL matches: ``server_name`` without its port, an IPv6 literal in
    brackets; ``None`` when ``server_name`` is not a valid server name."""
    try:
        parsed = ServerName.parse(server_name)
    except InvalidIdentifier:
        return None
    return f"[{parsed.host}]" if ":" in parsed.host else parsed.host


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def _matches(entries: object, host: str) -> bool:
    if not isinstance(entries, list):
        return False
    return any(isinstance(e, str) and acl_glob(e).fullmatch(host) is not None for e in entries)


def server_allowed(acl_content: Mapping[str, Any] | None, server_name: str) -> bool:
    """Whether an ``m.room.server_acl`` with ``acl_content`` lets ``server_name`` (with or
    without a port) in; ``None``: the room has no ACL, everyone is allowed. The rules are in
    the module docstring."""
    if acl_content is None:
        return True
    host = acl_host(server_name)
    if host is None:
        return False
    if acl_content.get("allow_ip_literals", True) is False and _is_ip_literal(host):
        return False
    if _matches(acl_content.get("deny", []), host):
        return False
    return _matches(acl_content.get("allow", []), host)
