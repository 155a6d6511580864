"""X-Matrix header building, parsing (RFC 9110 auth-params) and verification."""

from __future__ import annotations

from typing import Any

import pytest
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key

from peekproxy.core.xmatrix import (
    XMatrixError,
    authorization_header,
    parse_authorization,
    verify_request,
)

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"  # spec appendix test key


def test_round_trip_and_verification() -> None:
    key = decode_signing_key_base64("ed25519", "1", SEED)
    uri = "/_matrix/federation/v1/query/directory?room_alias=%23a%3Ab.test"
    header = authorization_header(
        key, origin="origin.test", destination="dest.test:8448", method="GET", uri=uri
    )
    assert header.startswith(
        'X-Matrix origin="origin.test",destination="dest.test:8448",key="ed25519:1",sig="'
    )
    auth = parse_authorization(header)
    assert (auth.origin, auth.destination, auth.key) == (
        "origin.test",
        "dest.test:8448",
        "ed25519:1",
    )
    verify_request(
        auth,
        method="GET",
        uri=uri,
        our_server_name="dest.test:8448",
        content=None,
        verify_key=get_verify_key(key),
    )
    # Any change to what was signed breaks it: the URI, the method, the body, our name.
    changes: list[dict[str, Any]] = [{"uri": uri + "x"}, {"method": "PUT"}, {"content": {}}]
    for change in changes:
        kwargs: dict[str, Any] = {"method": "GET", "uri": uri, "content": None} | change
        with pytest.raises(XMatrixError, match="invalid X-Matrix signature"):
            verify_request(
                auth, our_server_name="dest.test:8448", verify_key=get_verify_key(key), **kwargs
            )
    with pytest.raises(XMatrixError, match="destination"):
        verify_request(
            auth,
            method="GET",
            uri=uri,
            our_server_name="other.test",
            content=None,
            verify_key=get_verify_key(key),
        )
    other = get_verify_key(generate_signing_key("x"))
    with pytest.raises(XMatrixError):
        verify_request(
            auth,
            method="GET",
            uri=uri,
            our_server_name="dest.test:8448",
            content=None,
            verify_key=other,
        )


def test_body_is_part_of_the_signature() -> None:
    key = generate_signing_key("k")
    body = {"pdus": [], "origin": "o.test", "origin_server_ts": 1}
    header = authorization_header(
        key,
        origin="o.test",
        destination="d.test",
        method="PUT",
        uri="/_matrix/federation/v1/send/1",
        content=body,
    )
    auth = parse_authorization(header)
    verify_request(
        auth,
        method="PUT",
        uri="/_matrix/federation/v1/send/1",
        our_server_name="d.test",
        content=body,
        verify_key=get_verify_key(key),
    )
    with pytest.raises(XMatrixError):
        verify_request(
            auth,
            method="PUT",
            uri="/_matrix/federation/v1/send/1",
            our_server_name="d.test",
            content=body | {"pdus": [{}]},
            verify_key=get_verify_key(key),
        )


@pytest.mark.parametrize(
    "header",
    [
        'X-Matrix origin="o.test",key="ed25519:1",sig="abc"',
        'x-matrix   ORIGIN=o.test , Key="ed25519:1",\tsig=abc,destination="d.test:8448"',
        'X-Matrix sig="abc",unknown="x",origin="o\\.test",key=ed25519:1',
    ],
)
def test_parsing_is_lenient_as_rfc_9110_says(header: str) -> None:
    auth = parse_authorization(header)
    assert (auth.origin, auth.key, auth.sig) == ("o.test", "ed25519:1", "abc")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Bearer abc", "not of the X-Matrix scheme"),
        ('X-Matrix origin="o.test",key="ed25519:1"', "lacks sig"),
        ('X-Matrix origin="o.test" key="ed25519:1",sig="x"', "malformed"),
        ('X-Matrix origin="not a name",key="ed25519:1",sig="x"', "not a server name"),
        ('X-Matrix origin="o.test",key="ed25519:1",sig="x",destination="a b"', "not a server name"),
    ],
)
def test_malformed_headers(header: str, message: str) -> None:
    with pytest.raises(XMatrixError, match=message):
        parse_authorization(header)
