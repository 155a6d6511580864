"""Canonical JSON (APPX §Canonical JSON): strict parsing, validation and encoding.

* :func:`encode_canonical` gives the bytes that are hashed and signed (``canonicaljson``:
  UTF-8, no insignificant whitespace, keys sorted by code point).
* :func:`check_canonical` says why a parsed value is not valid strict canonical JSON
  (floats, integers outside ±(2^53-1), strings that are not valid Unicode). Room
  versions 6+ drop events that fail it (rooms ``v6-canonical-json.md``); v1-v5 must not.
* :func:`loads_strict` parses JSON text, refusing what can never be hashed or signed:
  ``NaN``/``Infinity``, lone surrogates, duplicate keys, non-UTF-8 bytes; with
  ``canonical=True`` also everything :func:`check_canonical` refuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "MAX_SAFE_INTEGER",
    "CanonicalJSONError",
    "check_canonical",
    "check_canonical_numbers",
    "encode_canonical",
    "loads_strict",
]

#: 2^53 - 1: the largest magnitude of an integer in canonical JSON.
MAX_SAFE_INTEGER = 2**53 - 1

#: A ``\\uD800``-``\\uDFFF`` escape: only then can ``json.loads`` produce a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


#: canonicaljson's encoder settings (``canonicaljson._canonical_encoder``), minus the
#: circular-reference check, which parsed JSON cannot need and which costs ~15% on PDUs.
#: ``tests/test_events.py`` checks the output against ``encode_canonical_json``.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    separators=(",", ":"),
    sort_keys=True,
    check_circular=False,
    default=_not_json,
)


class CanonicalJSONError(ValueError):
    """The JSON text or value cannot be used as (strict) canonical JSON."""


def encode_canonical(value: Any) -> bytes:
    """The canonical JSON encoding of ``value`` (APPX §Canonical JSON), as UTF-8 bytes.

    No strictness checks are made here (floats are encoded as Python writes them); use
    :func:`check_canonical` for those.

    Raises:
        ValueError: NaN or infinity, or a lone surrogate (``UnicodeEncodeError``).
        TypeError: a value that is not JSON (or a non-string key that cannot be sorted).
        RecursionError: the value is nested too deeply.
    """
    return _ENCODER.encode(value).encode("utf-8")


def check_canonical(value: Any) -> str | None:
    """Why ``value`` is not strict canonical JSON, or ``None`` when it is.

    Refused: floats (including NaN and infinities), integers outside ±(2^53-1), strings or
    keys that contain lone surrogates (they have no UTF-8 encoding), non-string keys, and
    anything that is not a dict, list, str, int, bool or ``None``. Never raises; a value
    nested too deeply for Python's recursion limit is reported as such.
    """
    try:
        return _check(value)
    except RecursionError:
        return "JSON value nested too deeply"


def check_canonical_numbers(value: Any) -> str | None:
    """Like :func:`check_canonical`, but for a value already known to encode: it skips
    strings and keys (checked for free when :func:`encode_canonical` succeeded, which it
    cannot on a lone surrogate) and only refuses floats, out-of-range integers and
    non-JSON types. About twice as fast; used on the PDU hot path.
    """
    try:
        return _check_numbers(value)
    except RecursionError:
        return "JSON value nested too deeply"


def _check_numbers(value: Any) -> str | None:
    kind = type(value)
    if kind is dict:
        for item in value.values():
            if type(item) is not str:
                problem = _check_numbers(item)
                if problem is not None:
                    return problem
        return None
    if kind is list:
        for item in value:
            if type(item) is not str:
                problem = _check_numbers(item)
                if problem is not None:
                    return problem
        return None
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return None
        return "JSON integer out of range"
    if kind is str or kind is bool or value is None:
        return None
    if kind is float:
        return "Bad JSON value: float"
    return f"not a JSON value: {kind.__name__}"


def _check(value: Any) -> str | None:
    kind = type(value)
    if kind is str:
        return None if _encodable(value) else "string is not valid Unicode (lone surrogate)"
    if kind is int:
        if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            return None
        return "JSON integer out of range"
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return "JSON object key is not a string"
            if not _encodable(key):
                return "JSON object key is not valid Unicode (lone surrogate)"
            problem = _check(item)
            if problem is not None:
                return problem
        return None
    if kind is list:
        for item in value:
            problem = _check(item)
            if problem is not None:
                return problem
        return None
    if value is None or kind is bool:
        return None
    if kind is float:
        return "Bad JSON value: float"
    return f"not a JSON value: {kind.__name__}"


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(name: str) -> Any:
    raise CanonicalJSONError(f"{name} is not allowed in JSON")


def _reject_float(text: str) -> Any:
    raise CanonicalJSONError(f"Bad JSON value: float ({text[:40]})")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CanonicalJSONError(f"duplicate key {key[:40]!r} in JSON object")
            seen.add(key)
    return result


def loads_strict(data: bytes | str, *, canonical: bool = False) -> Any:
    """Parse JSON text, refusing what cannot be canonical JSON.

    Always refused: bytes that are not UTF-8, ``NaN``/``Infinity``/``-Infinity``, lone
    surrogates (raw or escaped, in strings or keys), duplicate object keys, nesting deeper
    than Python's recursion limit. With ``canonical=True`` (room versions 6+), also floats
    and integers outside ±(2^53-1). Leading/trailing whitespace is allowed.

    Raises:
        CanonicalJSONError: with a one-line reason (also for plain syntax errors).
    """
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CanonicalJSONError(f"JSON text is not UTF-8: {e.reason}") from None
    elif isinstance(data, str):
        text = data
        if not _encodable(text):
            raise CanonicalJSONError("JSON text contains a lone surrogate")
    else:
        raise CanonicalJSONError(f"expected bytes or str, not {type(data).__name__}")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_reject_float if canonical else float,
            object_pairs_hook=_object_without_duplicates,
        )
    except CanonicalJSONError:
        raise
    except json.JSONDecodeError as e:
        raise CanonicalJSONError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise CanonicalJSONError("JSON text nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python allows
        raise CanonicalJSONError(f"invalid JSON: {e}") from None
    if canonical:
        problem = check_canonical(value)
        if problem is not None:
            raise CanonicalJSONError(problem)
    elif _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise CanonicalJSONError("string is not valid Unicode (lone surrogate)")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return not _encodable(value)
    if isinstance(value, dict):
        return any(not _encodable(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False
