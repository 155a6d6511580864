"""m.room.server_acl (CSAPI §Server Access Control Lists), in the order Synapse applies it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from peekproxy.core.server_acl import acl_glob, acl_host, server_allowed

ACL = {"allow": ["*"], "deny": ["evil.example", "*.bad.test", "ab?.test"]}


def test_no_acl_allows_everyone() -> None:
    assert server_allowed(None, "anything.example")
    assert server_allowed(None, "not a server name")  # no ACL: nothing to check


@pytest.mark.parametrize(
    "server", ["good.test", "good.test:8448", "bad.test", "abcd.test", "ab.test", "1.2.3.4"]
)
def test_allowed(server: str) -> None:
    assert server_allowed(ACL, server)


@pytest.mark.parametrize(
    "server",
    [
        "evil.example",
        "EVIL.Example:443",  # case-insensitive, port ignored
        "x.bad.test",
        "a.b.bad.test",
        "abc.test",
        "not a server",
        "",
    ],
)
def test_denied(server: str) -> None:
    assert not server_allowed(ACL, server)


def test_ip_literals() -> None:
    no_ips = {**ACL, "allow_ip_literals": False}
    for server in ("1.2.3.4", "1.2.3.4:8448", "[::1]", "[::1]:8448"):
        assert not server_allowed(no_ips, server), server
        assert server_allowed(ACL, server), server
    assert server_allowed({**ACL, "allow_ip_literals": "no"}, "1.2.3.4")  # not a bool: true
    assert server_allowed(no_ips, "1.2.3.4.example")


def test_ipv6_is_matched_with_brackets() -> None:
    assert acl_host("[::1]:8448") == "[::1]"
    assert not server_allowed({"allow": ["*"], "deny": ["[::1]"]}, "[::1]:8448")
    assert server_allowed({"allow": ["[*]"]}, "[2001:db8::1]")


def test_malformed_acl_parts_are_ignored() -> None:
    acl = {"allow": ["*.ok.test", 5, None], "deny": "junk"}
    assert server_allowed(acl, "a.ok.test")
    assert not server_allowed(acl, "other.test")  # not in allow
    assert not server_allowed({}, "a.test")  # an ACL without allow denies everyone
    assert not server_allowed({"allow": "*"}, "a.test")  # not a list


def test_deny_wins_over_allow() -> None:
    assert not server_allowed({"allow": ["a.test"], "deny": ["a.test"]}, "a.test")


def test_the_port_is_never_matched() -> None:
    # A glob naming a port never matches: hosts are compared without theirs (research §8).
    assert server_allowed({"allow": ["*"], "deny": ["vm:8448"]}, "vm:8448")
    assert not server_allowed({"allow": ["*"], "deny": ["vm"]}, "vm:8448")


_HOST = st.from_regex(re.compile(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?"), fullmatch=True)
_GLOB = st.text(alphabet="ab.*?-x", max_size=8)


def _reference_match(glob: str, host: str) -> bool:
    """A second, recursive glob matcher to compare against."""
    if not glob:
        return not host
    if glob[0] == "*":
        return any(_reference_match(glob[1:], host[i:]) for i in range(len(host) + 1))
    if not host:
        return False
    return (glob[0] == "?" or glob[0] == host[0].lower()) and _reference_match(glob[1:], host[1:])


@given(_GLOB, st.text(alphabet="ab.-xAB", max_size=10))
def test_glob_matches_like_a_reference_matcher(glob: str, host: str) -> None:
    assert (acl_glob(glob).fullmatch(host) is not None) == _reference_match(glob, host)


@given(_HOST, st.one_of(st.none(), st.integers(1, 65535)), st.lists(_GLOB, max_size=3))
def test_port_and_case_never_change_the_verdict(
    host: str, port: int | None, globs: list[str]
) -> None:
    acl = {"allow": ["*"], "deny": globs}
    name = host if port is None else f"{host}:{port}"
    assert server_allowed(acl, name) == server_allowed(acl, host.upper())


@given(_HOST, st.lists(_GLOB, max_size=3), st.lists(_GLOB, max_size=3))
def test_verdict_is_deny_then_allow(host: str, allow: list[str], deny: list[str]) -> None:
    verdict = server_allowed({"allow": allow, "deny": deny}, host)
    denied = any(_reference_match(g, host) for g in deny)
    allowed = any(_reference_match(g, host) for g in allow)
    assert verdict == (allowed and not denied)
