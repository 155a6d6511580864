"""Command line: ``peekproxy run | check-config | generate-config | generate-signing-key``
(and ``pdu``, ``testbed``, ``peek``, ``status``).

Exit codes: 0 success; 1 runtime failure (unusable database, key or listener);
2 bad usage or an invalid config (one line per problem on stderr, each naming the key).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from typing import NoReturn

from peekproxy import __version__
from peekproxy.config import Config, ConfigError, load_config
from peekproxy.core.identifiers import InvalidIdentifier, ServerName

__all__ = ["main", "render_config"]

log = logging.getLogger("peekproxy")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _default_config_path() -> str:
    return os.environ.get("PEEKPROXY_CONFIG", "config.toml")


def render_config(server_name: str) -> str:
    """The commented example config for ``server_name`` (what ``generate-config`` writes)."""
    template = resources.files("peekproxy").joinpath("data/config.toml").read_text("utf-8")
    return template.replace("@SERVER_NAME@", server_name)


def _print_problems(problems: Sequence[str]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def preflight(config: Config) -> list[str]:
    """Problems that only show when the config is used: an unreadable signing key,
    delegation secret or upstream access token, a data directory that cannot be one, two
    listeners on one address. One line per problem."""
    from peekproxy.api.delegation_params import SecretFileError, read_secret
    from peekproxy.federation.signing_key import SigningKeyError, load_signing_key

    problems = []
    try:
        load_signing_key(config.server.signing_key_file)
    except SigningKeyError as e:
        problems.append(f"server.signing_key_file: {e}")
    for key, path in (
        ("delegation.shared_secret_file", config.delegation.shared_secret_file),
        ("upstream.access_token_file", config.upstream.access_token_file),
    ):
        try:
            read_secret(path)
        except SecretFileError as e:
            problems.append(f"{key}: {e}")
    data_dir = config.sqlite_path.parent
    key = "store.sqlite_path" if config.store.sqlite_path else "server.data_dir"
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        problems.append(f"{key}: {existing} is not a directory")
    elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"{key}: {existing} is not writable")
    binds: dict[str, str] = {}
    listeners = config.listeners
    for name, bind, enabled in (
        ("client", listeners.client.bind, True),
        ("federation", listeners.federation.bind, True),
        ("metrics", listeners.metrics.bind, listeners.metrics.enabled),
    ):
        if not enabled or bind.endswith(":0"):
            continue
        if bind in binds:
            problems.append(
                f"listeners.{name}.bind: {bind} is already used by listeners.{binds[bind]}.bind"
            )
        binds[bind] = name
    return problems


def _checked_config(path: str) -> Config:
    """The config file, loaded and preflight-checked (at start, and again on each SIGHUP).

    Raises:
        ConfigError: one line per problem (load_config's, then :func:`preflight`'s).
    """
    config = load_config(path)
    problems = preflight(config)
    if problems:
        raise ConfigError(problems)
    return config


def _load_checked(path: str) -> Config | None:
    try:
        return _checked_config(path)
    except ConfigError as e:
        _print_problems(e.problems)
        return None


def _cmd_check_config(args: argparse.Namespace) -> int:
    if _load_checked(args.config) is None:
        return EXIT_USAGE
    print(f"{args.config}: OK")
    return EXIT_OK


def _cmd_generate_config(args: argparse.Namespace) -> int:
    try:
        ServerName.parse(args.server_name)
    except InvalidIdentifier as e:
        print(f"--server-name: {e}", file=sys.stderr)
        return EXIT_USAGE
    text = render_config(args.server_name)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "x", encoding="utf-8") as stream:
            stream.write(text)
    except FileExistsError:
        print(f"{args.output} already exists; refusing to overwrite it", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


def _cmd_generate_signing_key(args: argparse.Namespace) -> int:
    from peekproxy.federation.signing_key import SigningKeyError, key_id, write_new_signing_key

    try:
        signing_key = write_new_signing_key(Path(args.path))
    except SigningKeyError as e:
        print(str(e), file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {key_id(signing_key)} to {args.path}", file=sys.stderr)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from peekproxy.daemon import run_daemon
    from peekproxy.federation.signing_key import SigningKeyError
    from peekproxy.logs import setup_logging
    from peekproxy.serving import ServingError, failure_message, raise_open_files_limit
    from peekproxy.store import StoreError

    # SIGHUP is a reload (peekproxy/reload.py) once the daemon's signal receiver runs; before
    # it starts and after it closes (start-up, the end of a shutdown) it must not end the
    # process either, as its default action would: ignored there.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = _load_checked(args.config)
    if config is None:
        return EXIT_USAGE
    setup_logging(config.logging.level, config.logging.format, access_log=config.logging.access_log)
    raise_open_files_limit()  # one socket per long-poll
    failure: str | None = None
    try:
        trio.run(partial(run_daemon, config, reload=partial(_checked_config, args.config)))
    except* (SigningKeyError, StoreError, ServingError) as group:
        failure = failure_message(group)
    if failure:
        log.error("cannot start: %s", failure)
        return EXIT_FAILURE
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``peekproxy peek: error: ...; see
    peekproxy peek --help``) instead of the usage text and the message; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``peekproxy`` parser: one sub-parser per command (docs/cli.md lists them all)."""
    parser: argparse.ArgumentParser = _Parser(
        prog="peekproxy",
        description="Room peeking for Matrix homeservers (MSC2753 over MSC2444).",
    )
    parser.add_argument("--version", action="version", version=f"peekproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = "config file (default: $PEEKPROXY_CONFIG or ./config.toml)"
    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", default=_default_config_path(), help=config_help)
    run.set_defaults(func=_cmd_run)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("-c", "--config", default=_default_config_path(), help=config_help)
    check.set_defaults(func=_cmd_check_config)

    gen = commands.add_parser("generate-config", help="write a complete, commented config")
    gen.add_argument("--server-name", required=True, help="peekproxy's own server name")
    gen.add_argument("-o", "--output", help="file to create (default: standard output)")
    gen.set_defaults(func=_cmd_generate_config)

    key = commands.add_parser("generate-signing-key", help="create an ed25519 signing key file")
    key.add_argument("path", help="file to create (mode 0600; never overwritten)")
    key.set_defaults(func=_cmd_generate_signing_key)

    from peekproxy.federation.pdu_cli import add_pdu_parser

    add_pdu_parser(commands)

    from peekproxy.testbed.cli import add_testbed_parser

    add_testbed_parser(commands)

    from peekproxy.peek_cli import add_peek_parser

    add_peek_parser(commands)

    from peekproxy.status_cli import add_status_parser

    add_status_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peekproxy`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
