"""U+0000 in the strings the store indexes (pure).

PostgreSQL's ``TEXT`` cannot hold NUL (psycopg raises ``DataError``), SQLite's can: so that
both backends behave alike, a PDU or EDU whose strings stored outside its JSON (IDs, types,
state keys, references) contain U+0000 is refused before anything reaches the store. The JSON
itself (``pdu_json``, ``content_json``) holds NUL escaped as ``\\u0000``, so ``content``
values may contain it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NUL_REASON", "has_nul", "pdu_nul_problem"]

#: The per-PDU error of a PDU refused for a NUL character.
NUL_REASON = "a string of the PDU contains U+0000"


def has_nul(*values: object) -> bool:
    """Whether any of ``values`` is a ``str`` holding U+0000 (non-strings are ignored)."""
    return any(isinstance(v, str) and "\x00" in v for v in values)


def _refs_have_nul(refs: object) -> bool:
    """``prev_events`` / ``auth_events``: event IDs (v3+) or ``[event_id, hashes]`` pairs."""
    if not isinstance(refs, list):
        return False
    for ref in refs:
        if has_nul(ref):
            return True
        if isinstance(ref, list) and ref and has_nul(ref[0]):
            return True
    return False


def pdu_nul_problem(pdu: Any) -> str | None:
    """:data:`NUL_REASON` when a string of ``pdu`` (a PDU as parsed from JSON, anything
    accepted) that the store writes or looks up outside the JSON contains U+0000, else
    ``None``: every top-level string (``event_id``, ``room_id``, ``sender``, ``type``,
    ``state_key``, ``redacts``, ``origin``...), the event IDs of ``prev_events`` and
    ``auth_events``, and ``content.redacts`` / ``content.membership``. Never raises."""
    if not isinstance(pdu, dict):
        return None
    if any(has_nul(value) for value in pdu.values()):
        return NUL_REASON
    if _refs_have_nul(pdu.get("prev_events")) or _refs_have_nul(pdu.get("auth_events")):
        return NUL_REASON
    content = pdu.get("content")
    if isinstance(content, dict) and has_nul(content.get("redacts"), content.get("membership")):
        return NUL_REASON
    return None
