"""systemd credentials: secret files handed over by the service manager (systemd.exec(5),
"Credentials"; ``LoadCredential=``).

The shipped unit loads the directory ``/etc/peekproxy/credentials/`` with
``LoadCredential=peekproxy:/etc/peekproxy/credentials``; systemd then copies each file
``NAME`` of it to ``$CREDENTIALS_DIRECTORY/peekproxy_NAME``, readable by the service's
(dynamic) user alone. A config key listed in :data:`CREDENTIAL_KEYS` that is set neither in
the file nor by an environment override takes the path of its credential when that file
exists, so an admin only drops the files they use into the directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CREDENTIAL_KEYS", "CREDENTIAL_PREFIX", "credential_files", "credentials_for_unset_keys"]

#: The ID prefix systemd gives the files of the unit's credentials directory
#: (``LoadCredential=peekproxy:/etc/peekproxy/credentials``).
CREDENTIAL_PREFIX = "peekproxy_"

#: Config key path -> file name in ``/etc/peekproxy/credentials/``.
CREDENTIAL_KEYS: dict[tuple[str, ...], str] = {
    ("server", "signing_key_file"): "signing.key",
    ("delegation", "shared_secret_file"): "delegation.secret",
    ("upstream", "access_token_file"): "upstream.token",
    ("listeners", "federation", "tls_certificate_file"): "tls.crt",
    ("listeners", "federation", "tls_private_key_file"): "tls.key",
    ("store", "password_file"): "store_password",
}


def credential_files(environ: Mapping[str, str] | None = None) -> dict[tuple[str, ...], Path]:
    """The credentials present in ``$CREDENTIALS_DIRECTORY`` (of ``environ``, default
    ``os.environ``), by the config key path they stand for: ``{("delegation",
    "shared_secret_file"): Path(".../peekproxy_delegation.secret"), ...}``; a file that is
    there but cannot be read is listed too, so that the config check names it. Empty when
    the variable is unset (not run by systemd, or a unit without credentials)."""
    directory = (os.environ if environ is None else environ).get("CREDENTIALS_DIRECTORY")
    if not directory:
        return {}
    found = {}
    for parts, name in CREDENTIAL_KEYS.items():
        path = Path(directory) / f"{CREDENTIAL_PREFIX}{name}"
        try:
            path.stat()
        except FileNotFoundError:
            continue
        except OSError:
            pass  # there but unusable (permissions): the key's own check says why
        found[parts] = path
    return found


def credentials_for_unset_keys(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[tuple[str, ...], tuple[Path, str]]:
    """The credentials (:func:`credential_files`) whose key the parsed config ``data`` (the
    file with its environment overrides applied) leaves unset: key path -> (file, the label
    problems name it by, ``"credential peekproxy_tls.key"``)."""
    return {
        parts: (path, f"credential {path.name}")
        for parts, path in credential_files(environ).items()
        if _unset(data, parts)
    }


def _unset(data: Mapping[str, Any], parts: tuple[str, ...]) -> bool:
    node: Any = data
    for part in parts:
        if not isinstance(node, Mapping) or part not in node:
            return True
        node = node[part]
    return False
