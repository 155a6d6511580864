"""Room versions as data: one record per version, each switch where the spec puts it."""

from __future__ import annotations

import dataclasses

import pytest

from peekproxy.core.room_versions import (
    KNOWN_ROOM_VERSIONS,
    EventIdFormat,
    RoomVersion,
    UnknownRoomVersion,
    room_version,
)

VERSIONS = [str(n) for n in range(1, 13)]

#: (switch path, the first room version where it is true). From federation.md §3 and §8 and
#: the rooms/vN pages; None: true from v1 and dropped at the given version.
INTRODUCED = {
    "signatures.enforce_key_validity": 5,
    "format.strict_canonical_json": 6,
    "signatures.restricted_join_authoriser_signs": 8,
    "redaction.keep_join_rules_allow": 8,
    "redaction.keep_member_join_authorised_via_users_server": 9,
    "redaction.keep_all_create_content": 11,
    "redaction.keep_power_levels_invite": 11,
    "redaction.keep_redaction_redacts": 11,
    "redaction.keep_member_third_party_invite_signed": 11,
    "format.strict_event_byte_limits": 11,
    "format.room_id_is_create_event_hash": 12,
}
REMOVED = {
    "signatures.event_id_server_signs": 3,
    "redaction.keep_aliases_aliases": 6,
    "redaction.keep_origin_membership_prev_state": 11,
}


def _switch(rules: RoomVersion, path: str) -> bool:
    group, name = path.split(".")
    value = getattr(getattr(rules, group), name)
    assert isinstance(value, bool)
    return value


def test_known_versions_are_1_to_12_in_order() -> None:
    assert list(KNOWN_ROOM_VERSIONS) == VERSIONS
    for identifier, rules in KNOWN_ROOM_VERSIONS.items():
        assert rules.identifier == identifier
        assert room_version(identifier) is rules
        assert str(rules) == f"room version {identifier}"


@pytest.mark.parametrize("version", VERSIONS)
def test_switches_follow_the_spec(version: str) -> None:
    rules = room_version(version)
    n = int(version)
    for path, since in INTRODUCED.items():
        assert _switch(rules, path) is (n >= since), path
    for path, until in REMOVED.items():
        assert _switch(rules, path) is (n < until), path


def test_every_switch_is_covered_by_this_table() -> None:
    groups = ("format", "signatures", "redaction")
    names = {
        f"{group}.{field.name}"
        for group in groups
        for field in dataclasses.fields(getattr(room_version("1"), group))
    }
    assert names == set(INTRODUCED) | set(REMOVED)


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("1", EventIdFormat.EVENT_ID_FIELD),
        ("2", EventIdFormat.EVENT_ID_FIELD),
        ("3", EventIdFormat.REFERENCE_HASH_BASE64),
        *[(str(n), EventIdFormat.REFERENCE_HASH_URLSAFE) for n in range(4, 13)],
    ],
)
def test_event_id_format(version: str, expected: EventIdFormat) -> None:
    assert room_version(version).event_id_format is expected


def test_versions_without_changes_we_model_equal_their_predecessor() -> None:
    # v2 changes only state resolution, which peekproxy does not model; v7 (knocking) and
    # v10 (integer power levels, knock_restricted) change only the auth rules.
    assert dataclasses.replace(room_version("1"), identifier="2") == room_version("2")
    for version in ("7", "10"):
        previous, current = room_version(str(int(version) - 1)), room_version(version)
        assert dataclasses.replace(previous, identifier=version, auth=current.auth) == current
        assert previous.auth != current.auth


def test_auth_rule_switches_per_version() -> None:
    on = {
        v: {k for k, flag in dataclasses.asdict(room_version(v).auth).items() if flag}
        for v in ("1", "3", "6", "7", "8", "10", "11", "12")
    }
    assert on["1"] == {"special_case_aliases_auth", "redaction_checks_event_id_domain"}
    assert on["3"] == {"special_case_aliases_auth"}
    assert on["6"] == {"limit_notifications_power_levels"}
    assert on["7"] == on["6"] | {"knock_join_rule"}
    assert on["8"] == on["7"] | {"restricted_join_rule"}
    assert on["10"] == on["8"] | {"knock_restricted_join_rule", "enforce_int_power_levels"}
    assert on["11"] == on["10"] | {"implicit_room_creator"}
    assert on["12"] == on["11"] | {"privileged_creators", "create_event_implied"}


@pytest.mark.parametrize("bad", ["13", "0", "", "org.matrix.msc4289", "1.0", " 1"])
def test_unknown_versions_are_a_clear_error(bad: str) -> None:
    with pytest.raises(UnknownRoomVersion, match=r"unknown room version .*known: 1, 2, .*12"):
        room_version(bad)


def test_unhashable_identifier_is_an_unknown_version() -> None:
    with pytest.raises(UnknownRoomVersion):
        room_version(["1"])  # type: ignore[arg-type]


def test_records_are_immutable() -> None:
    rules = room_version("12")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.identifier = "13"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.redaction.keep_all_create_content = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        KNOWN_ROOM_VERSIONS["13"] = rules  # type: ignore[index]
