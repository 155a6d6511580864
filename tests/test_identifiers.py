"""Sigil identifiers: room IDs (both forms), aliases, user IDs, event IDs (APPX §Identifiers)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peekproxy.core.identifiers import (
    EventId,
    InvalidIdentifier,
    RoomAlias,
    RoomId,
    ServerName,
    UserId,
)

HASH_ROOM_ID = "!Ebs45sjfzusd2e7o8S-D-XoUPlbQKc1otQshU5Hl_ac"


def test_room_id_with_server() -> None:
    room = RoomId.parse("!abc:example.org:8448")
    assert room.opaque == "abc"
    assert room.server_name == ServerName("example.org", 8448)
    assert not room.is_hash_form
    assert str(room) == "!abc:example.org:8448"


def test_room_id_v12_hash_form_has_no_server() -> None:
    room = RoomId.parse(HASH_ROOM_ID)
    assert room.server_name is None and room.is_hash_form
    assert str(room) == HASH_ROOM_ID


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc:example.org", "must start with '!'"),
        ("!:example.org", "empty localpart"),
        ("!abc", "43 URL-safe base64"),
        ("!" + "A" * 42 + "+", "43 URL-safe base64"),
        ("!abc:exa mple.org", "bad hostname"),
        ("!abc:example.org:99999", "bad port"),
        ("!a\x00b:example.org", "NUL"),
        ("!" + "a" * 250 + ":example.org", "255 bytes"),
        ("!\ud800:example.org", "surrogate"),
    ],
)
def test_bad_room_ids(value: str, message: str) -> None:
    with pytest.raises(InvalidIdentifier, match=message):
        RoomId.parse(value)


def test_room_id_limit_counts_bytes_not_characters() -> None:
    server = ":example.org"
    fits = "!" + "a" * (255 - 1 - len(server)) + server
    assert RoomId.parse(fits).opaque.startswith("a")
    # 125 two-byte characters: 138 code points in all, but 263 bytes -> too long.
    with pytest.raises(InvalidIdentifier, match="255 bytes"):
        RoomId.parse("!" + "é" * 125 + server)


def test_room_alias() -> None:
    alias = RoomAlias.parse("#fixture-v12:hs-alpha.test")
    assert (alias.localpart, str(alias.server_name)) == ("fixture-v12", "hs-alpha.test")
    assert str(alias) == "#fixture-v12:hs-alpha.test"
    assert RoomAlias.parse("#日本語:[::1]:8448").server_name == ServerName("::1", 8448)
    for bad in ("fixture:hs-alpha.test", "#fixture", "#:hs-alpha.test", "#a:b:c"):
        with pytest.raises(InvalidIdentifier):
            RoomAlias.parse(bad)


def test_user_id_is_lenient_about_historical_localparts() -> None:
    user = UserId.parse("@alice:hs-alpha.test")
    assert user.is_compliant and str(user) == "@alice:hs-alpha.test"
    historical = UserId.parse("@Half-Shot:half-shot.uk")
    assert not historical.is_compliant
    assert historical.localpart == "Half-Shot"
    assert UserId.parse("@a!#$%&'()*b:localhost:8448").server_name.port == 8448


@pytest.mark.parametrize(
    "value",
    ["alice:hs-alpha.test", "@alice", "@:hs-alpha.test", "@alice:", "@alice:bad_host!", ""],
)
def test_bad_user_ids(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        UserId.parse(value)


def test_non_strings_are_invalid_identifiers() -> None:
    for kind in (RoomId, RoomAlias, UserId, EventId):
        with pytest.raises(InvalidIdentifier, match="must be a string"):
            kind.parse(42)  # type: ignore[arg-type]


def test_event_ids() -> None:
    v1 = EventId.parse("$yvN1b43rlmcOs5fY:localhost")
    assert v1.server_name == ServerName("localhost")
    assert str(v1) == "$yvN1b43rlmcOs5fY:localhost"
    v3 = EventId.parse("$RrGxF28UrHLmoASHndYb9Jb/1SFww2ptmtur9INS438")
    assert v3.server_name is None
    assert EventId.parse("$odd:not a server").server_name is None
    for bad in ("", "$", "RrGx", "$" + "a" * 255, "$a\x00"):
        with pytest.raises(InvalidIdentifier):
            EventId.parse(bad)
    assert len(str(EventId.parse("$" + "a" * 254))) == 255


def test_identifiers_are_frozen() -> None:
    user = UserId.parse("@alice:hs-alpha.test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        user.localpart = "mallory"  # type: ignore[misc]


_localparts = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789._=-/+", min_size=1, max_size=40
)
_hosts = st.from_regex(r"\A[a-z0-9]([a-z0-9\-]{0,20}\.){0,3}[a-z]{2,10}\Z")
_ports = st.none() | st.integers(min_value=1, max_value=65535)


@given(_localparts, _hosts, _ports)
def test_user_id_round_trips(localpart: str, host: str, port: int | None) -> None:
    server = host if port is None else f"{host}:{port}"
    text = f"@{localpart}:{server}"
    user = UserId.parse(text)
    assert str(user) == text and user.is_compliant
    assert UserId.parse(str(user)) == user
    assert str(RoomAlias.parse(f"#{localpart}:{server}")) == f"#{localpart}:{server}"
    assert str(RoomId.parse(f"!{localpart}:{server}")) == f"!{localpart}:{server}"


@pytest.mark.parametrize(
    "parse, value",
    [
        (ServerName.parse, "b.test\n"),
        (ServerName.parse, "b.test:8448\n"),
        (UserId.parse, "@a:b.test\n"),
        (RoomId.parse, "!" + "A" * 43 + "\n"),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_valid_identifier(parse: Any, value: str) -> None:
    # Python's "$" also matches before a final newline; the grammar ends at the string's end.
    with pytest.raises(InvalidIdentifier):
        parse(value)
