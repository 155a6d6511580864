"""Where a command-line client finds the running daemon: its client listener URL and the
delegation secret, from ``--url`` / ``--secret-file`` or else from the config file.

Used by ``peekproxy status`` (:mod:`peekproxy.status_cli`) and ``peekproxy peek``
(:mod:`peekproxy.peek_cli`); a client of the delegation or
admin API needs nothing else. With both ``--url`` and ``--secret-file`` no config file is
read at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peekproxy.terminal import terminal_safe

__all__ = ["DaemonTarget", "TargetError", "answer_error", "client_url_of_bind", "daemon_target"]

#: Wildcard binds are reached on the loopback address of the same family.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}


class TargetError(Exception):
    """The daemon cannot be found from the arguments and config (a usage error, exit 2);
    the message is one line."""


@dataclass(frozen=True)
class DaemonTarget:
    """``url``: the client listener's base URL (no trailing ``/``); ``secret``: the
    delegation secret; ``server_name``: the config's, when a config was read."""

    url: str
    secret: str
    server_name: str | None = None


def client_url_of_bind(bind: str) -> str:
    """``http://host:port`` for a ``listeners.client.bind`` value (a wildcard host is
    reached on loopback)."""
    host, _, port = bind.rpartition(":")
    return f"http://{_LOOPBACK.get(host, host)}:{port}"


def answer_error(response: Any) -> str:
    """What the daemon's error answer says, on one line safe to print: ``errcode: error``
    of its Matrix error JSON, else the first 200 characters of the body (its errors quote
    remote servers' answers: :func:`~peekproxy.terminal.terminal_safe`)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = f"{data.get('errcode')}: {data.get('error')}"
    else:
        text = str(response.text)[:200]
    return terminal_safe(text)


def _is_base_url(url: str) -> bool:
    """Whether ``url`` is ``http(s)://HOST[:PORT]`` (a path is allowed) with a valid port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    except ValueError:  # e.g. an unclosed IPv6 literal, a port that is not a number
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _secret_of(path: Path, key: str) -> str:
    from peekproxy.api.delegation_params import SecretFileError, read_secret

    try:
        secret = read_secret(path)
    except SecretFileError as e:
        raise TargetError(f"{key}: {e}") from None
    assert secret is not None
    return secret


def daemon_target(
    *, url: str | None, secret_file: str | None, config: str | None = None
) -> DaemonTarget:
    """The daemon to talk to: ``url`` and the secret in ``secret_file`` when both are
    given; what is missing comes from the config file ``config`` (default
    ``$PEEKPROXY_CONFIG``, else ``./config.toml``): ``listeners.client.bind`` and
    ``delegation.shared_secret_file``. A config named by ``config`` is read even when both
    are given (its ``server_name`` is then known); otherwise, with both, none is read.

    Raises:
        TargetError: ``url`` is not ``http(s)://HOST[:PORT]``; the secret file cannot be
            read or is empty; the config cannot be read or is invalid; it sets no
            ``delegation.shared_secret_file``.
    """
    if url is not None and not _is_base_url(url):
        raise TargetError(f"--url: expected http(s)://HOST[:PORT], got {url!r}")
    if url is not None and secret_file is not None and config is None:
        return DaemonTarget(url.rstrip("/"), _secret_of(Path(secret_file), "--secret-file"))
    from peekproxy.config import ConfigError, load_config

    path = config or os.environ.get("PEEKPROXY_CONFIG", "config.toml")
    try:
        loaded = load_config(path, check_files=False)
    except ConfigError as e:
        detail = "; ".join(e.problems)
        detail = detail if str(path) in detail else f"{path}: {detail}"
        given = "" if config else " (or give --url and --secret-file)"
        raise TargetError(detail + given) from None
    if secret_file is not None:
        secret = _secret_of(Path(secret_file), "--secret-file")
    elif loaded.delegation.shared_secret_file is None:
        raise TargetError(
            f"{path}: delegation.shared_secret_file is not set; the admin and delegation "
            "APIs need it (or give --secret-file)"
        )
    else:
        secret = _secret_of(loaded.delegation.shared_secret_file, "delegation.shared_secret_file")
    base = url or client_url_of_bind(loaded.listeners.client.bind)
    return DaemonTarget(base.rstrip("/"), secret, loaded.server.server_name)
