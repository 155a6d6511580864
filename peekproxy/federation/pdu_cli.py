"""``peekproxy pdu check``: run the PDU receipt checks (steps 1-3, and step 4: the
authorization rules against the event's own ``auth_events``) on PDUs from a file.

Usage::

    peekproxy pdu check [--room-version N] [--key SERVER:ed25519:ID:BASE64]...
                        [--auth-events FILE] [--no-auth] [FILE|-]

Input (a file, or standard input for ``-`` or no argument) is one of:

* one PDU (a JSON object with a ``type``);
* a JSON list of PDUs;
* a fixture file like ``tests/fixtures/synapse-pdus/vN.json`` (``{"events": [{"pdu": …}]}``)
  or ``vN.tampered.json`` (``{"cases": [{"pdu": …}]}``), or a peek response
  (``{"state": […], "auth_chain": […], "latest_event": {…}}``). These carry
  ``room_version``, used when ``--room-version`` is not given, and their ``verify_keys``
  (with ``server_name``) are used when no ``--key`` is given.

Keys: ``--key`` splits from the right, so a server name may carry a port
(``localhost:8448:ed25519:a_b:BASE64``). Without any key (and no keys in a fixture file),
the keys are fetched over federation (:func:`fetch_keys_for`), with the ``[federation]``
settings of ``-c CONFIG`` when given.

Auth events (step 4, :func:`peekproxy.core.auth_rules.check_event_auth`): the PDUs of the
input and of ``--auth-events FILE`` (any input shape above), by event ID; an input PDU that
fails steps 1-3 or step 4 counts as rejected for the PDUs after it; a ``redact`` PDU serves
as its redacted copy. The ``--auth-events`` PDUs are taken as given (check them with their
own ``pdu check``). ``--no-auth`` skips step 4.

Output: one line per PDU, ``<event_id> <accept|redact|reject> <reason>`` (``-`` when the
event ID cannot be known), then, for a PDU that passed steps 1-3 (``accept`` or
``redact``), `` | auth: accept`` or `` | auth: reject <reason>`` (``reject auth event $x
not given`` when a cited auth event is in neither file). Exit status: 0 when every PDU is
accepted by both, 1 otherwise, 2 when the input is unusable (bad JSON, unknown room
version, bad ``--key``), with a one-line message on standard error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peekproxy.core.pdu import PduVerdict
    from peekproxy.core.pdu_signatures import KeyLookup, VerifyKeyInfo
    from peekproxy.core.room_versions import RoomVersion

__all__ = ["add_pdu_parser", "fetch_keys_for", "parse_key_option", "run_pdu_check"]

EXIT_OK, EXIT_NOT_ALL_ACCEPTED, EXIT_USAGE = 0, 1, 2

_KEY_VERSION = re.compile(r"^[A-Za-z0-9_]+$")


class UsageError(Exception):
    """The command cannot run on this input; the message is one line for stderr."""


def fetch_keys_for(wanted: Mapping[str, set[str]], config_path: str | None) -> KeyLookup:
    """Fetch the verify keys of ``wanted`` (server name → key IDs) over federation: from
    each server's ``/_matrix/key/v2/server``, else the config's ``trusted_key_servers``.

    Federation settings (IP policy, DNS servers, CA file, notaries) come from the config
    file at ``config_path``, or the defaults. A server whose keys cannot be had is reported
    on standard error; its PDUs are then rejected for want of a key.

    Raises:
        UsageError: the config file is unusable.
    """
    import trio

    from peekproxy.config import ConfigError, FederationSection, load_federation_section
    from peekproxy.federation.client import FederationClient
    from peekproxy.federation.keyring import KeyFetchError, Keyring, TrustedNotary

    federation = FederationSection()
    if config_path is not None:
        try:
            federation = load_federation_section(config_path)
        except ConfigError as e:
            raise UsageError("; ".join(e.problems)) from None

    async def fetch() -> Keyring:
        client = FederationClient.from_config(federation)
        notaries = [
            TrustedNotary(n.server_name, n.verify_keys) for n in federation.trusted_key_servers
        ]
        keyring = Keyring(client, None, notaries)
        try:
            for server, key_ids in sorted(wanted.items()):
                try:
                    await keyring.fetch_keys(server, sorted(key_ids))
                except KeyFetchError as e:
                    print(f"pdu check: {e}", file=sys.stderr)
        finally:
            await client.aclose()
        return keyring

    return trio.run(fetch).lookup


def _wanted_keys(pdus: Iterable[Any], rules: Any) -> dict[str, set[str]]:
    from peekproxy.core.pdu_signatures import signer_key_ids

    return {server: set(ids) for server, ids in signer_key_ids(pdus, rules).items()}


def parse_key_option(value: str) -> tuple[str, str, VerifyKeyInfo]:
    """Parse ``SERVER:ed25519:ID:BASE64`` (split from the right) into
    ``(server_name, key_id, key)``.

    Raises:
        UsageError: not four parts, an algorithm other than ed25519, a bad key version or
            server name, or not the base64 of a 32-byte key.
    """
    from peekproxy.core.identifiers import InvalidIdentifier, ServerName
    from peekproxy.core.pdu_signatures import VerifyKeyInfo

    parts = value.rsplit(":", 3)
    if len(parts) != 4:
        raise UsageError(f"--key {value!r}: expected SERVER:ed25519:ID:BASE64")
    server, algorithm, version, key = parts
    if algorithm != "ed25519":
        raise UsageError(f"--key {value!r}: only ed25519 keys are supported, not {algorithm!r}")
    if not _KEY_VERSION.match(version):
        raise UsageError(f"--key {value!r}: the key version must match [A-Za-z0-9_]+")
    try:
        ServerName.parse(server)
    except InvalidIdentifier as e:
        raise UsageError(f"--key {value!r}: {e}") from None
    try:
        info = VerifyKeyInfo.from_base64(key)
    except ValueError as e:
        raise UsageError(f"--key {value!r}: not a base64 ed25519 public key ({e})") from None
    return server, f"{algorithm}:{version}", info


def _read_input(source: str) -> Any:
    from peekproxy.core.canonical_json import CanonicalJSONError, loads_strict

    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror}") from None
    try:
        return loads_strict(data)
    except CanonicalJSONError as e:
        raise UsageError(f"{'standard input' if source == '-' else source}: {e}") from None


def _split_input(document: Any) -> tuple[list[Any], Mapping[str, Any]]:
    """(the PDUs, the object that may hold room_version/server_name/verify_keys)."""
    if isinstance(document, list):
        return document, {}
    if not isinstance(document, dict):
        raise UsageError("input must be a PDU, a list of PDUs or a fixture file")
    for key in ("events", "cases"):
        if key in document:
            entries = document[key]
            if not isinstance(entries, list) or not all(
                isinstance(entry, dict) and "pdu" in entry for entry in entries
            ):
                raise UsageError(f"fixture file: {key!r} must be a list of {{'pdu': ...}}")
            return [entry["pdu"] for entry in entries], document
    if any(key in document for key in ("state", "auth_chain", "latest_event")):
        pdus: list[Any] = []
        for key in ("state", "auth_chain"):
            section = document.get(key, [])
            if not isinstance(section, list):
                raise UsageError(f"peek response: {key!r} must be a list")
            pdus.extend(section)
        if "latest_event" in document:
            pdus.append(document["latest_event"])
        metadata = document.get("_fixture")
        merged = {**(metadata if isinstance(metadata, dict) else {}), **document}
        return pdus, merged
    return [document], {}


def _fixture_keys(metadata: Mapping[str, Any]) -> dict[tuple[str, str], VerifyKeyInfo]:
    from peekproxy.core.pdu_signatures import VerifyKeyInfo

    server, verify_keys = metadata.get("server_name"), metadata.get("verify_keys")
    if not isinstance(server, str) or not isinstance(verify_keys, dict):
        return {}
    table: dict[tuple[str, str], VerifyKeyInfo] = {}
    for key_id, key in verify_keys.items():
        if isinstance(key, dict):  # the key-document shape {"key": ...}
            key = key.get("key")
        try:
            table[(server, key_id)] = VerifyKeyInfo.from_base64(key)
        except (ValueError, TypeError, AttributeError):
            raise UsageError(f"fixture file: bad verify key {key_id!r}") from None
    return table


def run_pdu_check(args: argparse.Namespace) -> int:
    """The ``pdu check`` command; returns the exit status (see the module docstring)."""
    try:
        return _run(args)
    except UsageError as e:
        print(f"pdu check: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from peekproxy.core.pdu import check_pdu
    from peekproxy.core.pdu_signatures import key_table
    from peekproxy.core.room_versions import UnknownRoomVersion, room_version

    table: dict[tuple[str, str], VerifyKeyInfo] = {}
    for value in args.key:
        server, key_id, info = parse_key_option(value)
        table[(server, key_id)] = info

    pdus, metadata = _split_input(_read_input(args.file))
    version = args.room_version if args.room_version is not None else metadata.get("room_version")
    if version is None:
        raise UsageError("no --room-version given and the input does not name one")
    try:
        rules = room_version(str(version))
    except UnknownRoomVersion as e:
        raise UsageError(str(e)) from None

    if not pdus:
        raise UsageError("the input holds no PDUs")
    table = _fixture_keys(metadata) | table
    if table:
        keys = key_table(table)
    else:
        keys = fetch_keys_for(_wanted_keys(pdus, rules), args.config)

    verdicts = [check_pdu(pdu, rules, keys) for pdu in pdus]
    auth = None
    if not args.no_auth:
        given = _split_input(_read_input(args.auth_events))[0] if args.auth_events else []
        auth = _auth_reasons(rules, given, verdicts)
    all_accepted = True
    for verdict in verdicts:
        line = f"{verdict.event_id or '-'} {verdict.outcome} {verdict.reason}"
        all_accepted = all_accepted and verdict.outcome == "accept"
        if auth is not None and verdict.pdu is not None and verdict.event_id is not None:
            reason = auth.get(verdict.event_id)
            all_accepted = all_accepted and reason is None
            line += " | auth: accept" if reason is None else f" | auth: reject {reason}"
        print(line)
    return EXIT_OK if all_accepted else EXIT_NOT_ALL_ACCEPTED


def _auth_reasons(
    rules: RoomVersion, given: list[Any], verdicts: list[PduVerdict]
) -> dict[str, str]:
    """Receipt step 4 for the PDUs of one run, as the daemon runs it on a batch
    (:func:`peekproxy.core.receipt.judge_batch`: each PDU after the input PDUs it cites,
    whatever their order in the file): event ID → why, for each input PDU step 4 rejects
    (absent: accepted). The auth events are the ``--auth-events`` PDUs (taken as given) and
    the input's own PDUs that passed steps 1-3 (the redacted copy for ``redact``); input
    PDUs that fail steps 1-3 or 4 are rejected auth events."""
    from peekproxy.core.events import best_effort_event_id, compute_event_id
    from peekproxy.core.receipt import judge_batch

    pool: dict[str, Mapping[str, Any]] = {}
    for pdu in given:
        if not isinstance(pdu, dict):
            continue
        event_id: str | None
        try:
            event_id = compute_event_id(pdu, rules)
        except (ValueError, TypeError, KeyError, RecursionError):
            event_id = best_effort_event_id(pdu)
        if event_id is not None:
            pool[event_id] = pdu
    batch = {v.event_id: v.pdu for v in verdicts if v.event_id is not None and v.pdu}
    failed = {v.event_id for v in verdicts if v.event_id is not None and v.pdu is None}
    judgement = judge_batch(batch, rules, stored=pool, rejected=failed)
    prefix = "not allowed by its auth events: "
    return {
        **{e: r.removeprefix(prefix) for e, r in judgement.rejected.items()},
        **{e: r.replace(" is unknown", " not given") for e, r in judgement.unknown.items()},
    }


def add_pdu_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``pdu check`` on the top-level ``peekproxy`` sub-command parsers."""
    pdu = commands.add_parser("pdu", help="work with PDUs (federation events)")
    actions = pdu.add_subparsers(dest="pdu_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="verify PDUs: format, signatures, content hash, auth rules (receipt checks 1-4)",
        description=(
            "Verify PDUs as a receiving server does (format, signatures, content hash, then "
            "the authorization rules against the event's auth_events) and print "
            "'<event_id> <accept|redact|reject> <reason> | auth: <accept|reject <reason>>' "
            "per PDU. Exit 0 if all are accepted, 1 if not, 2 on unusable input."
        ),
    )
    check.add_argument(
        "--room-version", help="room version (default: the fixture file's room_version)"
    )
    check.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="SERVER:ed25519:ID:BASE64",
        help="a signing key to trust (repeatable; the server name may carry a port)",
    )
    check.add_argument(
        "--auth-events",
        metavar="FILE",
        help="PDUs (a JSON list or a fixture file) to use as auth events, besides the input's own",
    )
    check.add_argument(
        "--no-auth",
        action="store_true",
        help="skip the authorization rules (receipt step 4): steps 1-3 only",
    )
    check.add_argument(
        "-c",
        "--config",
        help="config file whose [federation] settings (IP policy, DNS, CA, notaries) are "
        "used to fetch keys when no --key is given (default: built-in defaults)",
    )
    check.add_argument(
        "file", nargs="?", default="-", help="JSON file of PDUs, or - for standard input"
    )
    check.set_defaults(func=run_pdu_check)
