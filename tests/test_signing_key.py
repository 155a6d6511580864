"""Signing key files and the key document (SSAPI §Publishing Keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
from signedjson.key import decode_signing_key_base64, decode_verify_key_bytes, get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from peekproxy.federation.signing_key import (
    SigningKeyError,
    load_signing_key,
    server_key_document,
    write_new_signing_key,
)

# Spec appendix §Cryptographic Test Vectors.
SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
PUBLIC = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"


def test_key_document_from_the_spec_key() -> None:
    key = decode_signing_key_base64("ed25519", "1", SEED)
    document = server_key_document(
        "domain",
        key,
        now_ms=1_000,
        valid_for_ms=86_400_000,
        old_verify_keys={"ed25519:0": ("b2xk", 500)},
    )
    assert document["verify_keys"] == {"ed25519:1": {"key": PUBLIC}}
    assert document["old_verify_keys"] == {"ed25519:0": {"key": "b2xk", "expired_ts": 500}}
    assert document["valid_until_ts"] == 86_401_000
    assert list(document["signatures"]) == ["domain"]
    verify_signed_json(document, "domain", get_verify_key(key))
    published = decode_verify_key_bytes("ed25519:1", decode_base64(PUBLIC))
    document["valid_until_ts"] += 1  # any change breaks the self-signature
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(document, "domain", published)


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match=r"not found.*generate-signing-key"):
        load_signing_key(tmp_path / "absent.key")
    junk = tmp_path / "junk.key"
    junk.write_text("this is not a key\n")
    with pytest.raises(SigningKeyError, match="not a signing key file"):
        load_signing_key(junk)
    two = tmp_path / "two.key"
    two.write_text(f"ed25519 a {SEED}\ned25519 b {SEED}\n")
    with pytest.raises(SigningKeyError, match="exactly one"):
        load_signing_key(two)


def test_written_key_round_trips(tmp_path: Path) -> None:
    written = write_new_signing_key(tmp_path / "k")
    loaded = load_signing_key(tmp_path / "k")
    assert loaded.encode() == written.encode() and loaded.version == written.version
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        write_new_signing_key(tmp_path / "k")
