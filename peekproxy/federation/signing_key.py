"""peekproxy's own ed25519 signing key and the key document it publishes.

The key file uses the signedjson / Synapse format: one line ``ed25519 <version> <base64 seed>``.
The key document follows the spec's server-server API §Publishing Keys
(``GET /_matrix/key/v2/server``).
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.sign import sign_json
from signedjson.types import SigningKey

__all__ = [
    "SigningKeyError",
    "key_id",
    "load_signing_key",
    "server_key_document",
    "write_new_signing_key",
]

_VERSION_ALPHABET = string.ascii_letters + string.digits


class SigningKeyError(Exception):
    """The signing key file cannot be created or used."""


def key_id(signing_key: SigningKey) -> str:
    """The key ID, ``ed25519:<version>``, of a signedjson signing key."""
    return f"{signing_key.alg}:{signing_key.version}"


def write_new_signing_key(path: Path, version_prefix: str = "a_") -> SigningKey:
    """Generate a fresh ed25519 key and write it to ``path`` with mode 0600.

    The version is ``version_prefix`` followed by four random letters or digits.

    Raises:
        SigningKeyError: the file already exists, or cannot be written.
    """
    version = version_prefix + "".join(secrets.choice(_VERSION_ALPHABET) for _ in range(4))
    signing_key = generate_signing_key(version)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise SigningKeyError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as stream:
        write_signing_keys(stream, [signing_key])
    return signing_key


def load_signing_key(path: Path) -> SigningKey:
    """Read the one signing key in ``path``.

    Raises:
        SigningKeyError: missing or unreadable file, or not exactly one ed25519 key in it.
    """
    try:
        with open(path) as stream:
            keys = read_signing_keys(stream)
    except FileNotFoundError:
        raise SigningKeyError(
            f"signing key file not found: {path} "
            f"(create one with: peekproxy generate-signing-key {path})"
        ) from None
    except OSError as e:
        raise SigningKeyError(f"cannot read signing key file {path}: {e.strerror}") from None
    except Exception:  # signedjson raises assorted errors on malformed lines
        raise SigningKeyError(
            f"{path} is not a signing key file (expected 'ed25519 <version> <base64 seed>')"
        ) from None
    if len(keys) != 1:
        raise SigningKeyError(f"{path} must hold exactly one signing key, found {len(keys)}")
    signing_key: SigningKey = keys[0]
    return signing_key


def server_key_document(
    server_name: str,
    signing_key: SigningKey,
    *,
    now_ms: int,
    valid_for_ms: int,
    old_verify_keys: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """Build and self-sign the key document for ``GET /_matrix/key/v2/server``.

    Args:
        server_name: our server name.
        signing_key: the current key; it goes in ``verify_keys`` and signs the document.
        now_ms: the current time, ms since the epoch.
        valid_for_ms: how long the document is valid; ``valid_until_ts = now_ms + valid_for_ms``.
        old_verify_keys: key ID → (unpadded base64 public key, ``expired_ts`` in ms).

    Returns:
        ``{"server_name", "verify_keys", "old_verify_keys", "valid_until_ts", "signatures"}``.
    """
    document: dict[str, Any] = {
        "server_name": server_name,
        "verify_keys": {
            key_id(signing_key): {"key": encode_verify_key_base64(get_verify_key(signing_key))}
        },
        "old_verify_keys": {
            kid: {"key": key, "expired_ts": expired_ts}
            for kid, (key, expired_ts) in (old_verify_keys or {}).items()
        },
        "valid_until_ts": now_ms + valid_for_ms,
    }
    signed: dict[str, Any] = sign_json(document, server_name, signing_key)
    return signed
