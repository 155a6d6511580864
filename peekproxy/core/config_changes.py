"""Which settings a reload (SIGHUP) may change in a running daemon: the pure rules.

A config is compared as the flat mapping of its dotted keys to values
(:func:`flatten`, e.g. ``{"peeks.rate_limit_burst": 10, ...}``). :func:`changed_keys` lists
the keys whose values differ; :func:`split_changes` sorts them into the ones applied at
once (:data:`LIVE_KEYS`) and the ones that take effect only after a restart (binds, server
name, signing key, store, data directory, ...).

Files named by a live key (the delegation secret, the TLS pair) are read again on every
reload whether or not their path changed: a certificate or secret is usually replaced in
place. The TLS pair is live only while TLS stays on: turning it on or off is a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LIVE_KEYS", "TLS_KEYS", "Changes", "changed_keys", "flatten", "split_changes"]

#: The federation listener's TLS pair (live while both old and new values are set).
TLS_KEYS = frozenset(
    {"listeners.federation.tls_certificate_file", "listeners.federation.tls_private_key_file"}
)

#: Keys a reload applies at once (the TLS pair only while TLS stays on: :data:`TLS_KEYS`).
LIVE_KEYS = (
    frozenset(
        {
            "logging.level",
            "logging.access_log",
            "peeks.rate_limit_per_second",
            "peeks.rate_limit_burst",
            "peeks.max_peeks_per_device",
            "peeks.max_remote_peeks",
            "peeks.max_observed_rooms",
            "delegation.shared_secret_file",
            "server.shutdown_grace",
        }
    )
    | TLS_KEYS
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1]}`` → ``{"a.b": 1, "c": [1]}``: nested mappings become
    dotted keys; any other value (lists included) is a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two flat configs (a key present in
    only one counts as changed), sorted."""
    missing = object()
    return sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))


@dataclass(frozen=True)
class Changes:
    """A reload's changed keys: ``live`` are applied now, ``restart`` only after a restart."""

    live: tuple[str, ...]
    restart: tuple[str, ...]


def _is_live(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    if key in TLS_KEYS:  # a new pair for a listener that speaks TLS, and still will
        return all(side.get(k) is not None for side in (old, new) for k in TLS_KEYS)
    return key in LIVE_KEYS


def split_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None
) -> Changes:
    """Sort the changed ``keys`` (default: :func:`changed_keys` of the two flat configs)
    into live and restart-only ones, each sorted."""
    changed = changed_keys(old, new) if keys is None else sorted(keys)
    live = tuple(k for k in changed if _is_live(k, old, new))
    return Changes(live=live, restart=tuple(k for k in changed if k not in live))
