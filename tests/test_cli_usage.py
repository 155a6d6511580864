"""Every usage error of every command exits 2 with one line on stderr (README, docs/cli.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peekproxy.cli import build_parser
from tests.support import run_cli, subcommands

SECRET_FILE = "secret.txt"  # written by the test, in its directory
#: peek's arguments that need no config file
NO_CONFIG = ["peek", "--url", "http://127.0.0.1:1", "--secret-file", SECRET_FILE]

#: (arguments, the start of the one line expected on stderr)
USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "peekproxy: error: the following arguments are required: COMMAND"),
    (["frobnicate"], "peekproxy: error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["run", "--bogus"], "peekproxy: error: unrecognized arguments: --bogus"),
    (["run", "-c", "missing.toml"], "missing.toml: config file not found"),
    (["check-config", "-c", "missing.toml"], "missing.toml: config file not found"),
    (["check-config", "extra"], "peekproxy: error: unrecognized arguments: extra"),
    (["generate-config"], "peekproxy generate-config: error: the following arguments"),
    (["generate-config", "--server-name", "not a name"], "--server-name: "),
    (["generate-signing-key"], "peekproxy generate-signing-key: error: the following"),
    (["pdu"], "peekproxy pdu: error: the following arguments are required: ACTION"),
    (["pdu", "check", "--key", "nonsense", "x.json"], "pdu check: --key 'nonsense'"),
    (["pdu", "check", "missing.json"], "pdu check: cannot read missing.json"),
    (["testbed"], "testbed: give -c CONFIG or --server-name"),
    (["testbed", "--server-name", "not a name"], "server.server_name: "),
    (["peek"], "peekproxy peek: error: the following arguments are required: room"),
    (["peek", "#room:example.org"], "peek: config.toml: config file not found"),
    (
        ["peek", "--url", "http://127.0.0.1:1", "--secret-file", "missing", "#a:example.org"],
        "peek: --secret-file: cannot read missing",
    ),
    (
        ["peek", "--url", "ftp://example.org", "--secret-file", SECRET_FILE, "#a:example.org"],
        "peek: --url: expected http(s)://HOST[:PORT]",
    ),
    (
        [*NO_CONFIG, "room"],
        "peek: ROOM: room ID must start with '!'",
    ),
    (
        [*NO_CONFIG, "--user", "bob", "#a:example.org"],
        "peek: --user: ",
    ),
    (["peek", "--timeout-ms", "-1", "#a:example.org"], "peekproxy peek: error: argument"),
    (["status", "--bogus"], "peekproxy: error: unrecognized arguments: --bogus"),
    (["status"], "status: config.toml: config file not found"),
    (
        ["status", "--url", "gopher://x", "--secret-file", SECRET_FILE],
        "status: --url: expected http(s)://HOST[:PORT]",
    ),
    (
        ["status", "--url", "http://127.0.0.1:1", "--secret-file", "missing"],
        "status: --secret-file",
    ),
    (["status", "--url", "http://[::1", "--secret-file", SECRET_FILE], "status: --url: expected"),
    (["status", "--url", "http://x:abc", "--secret-file", SECRET_FILE], "status: --url: expected"),
    (["status", "--timeout", "-1"], "peekproxy status: error: argument --timeout"),
    (["status", "--timeout", "0"], "peekproxy status: error: argument --timeout"),
    (
        ["peek", "--url", "http://[::1", "--secret-file", SECRET_FILE, "#a:x.org"],
        "peek: --url: expected",
    ),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS, ids=lambda v: " ".join(v))
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / SECRET_FILE).write_text("s3cret\n")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert result.stdout == ""


def test_every_command_has_a_usage_error_case() -> None:
    commands = set(subcommands(build_parser()))
    assert commands == {args[0] for args, _ in USAGE_ERRORS if args and args[0] in commands}
