"""``peekproxy testbed``: run the MSC2444 room host for federation testbeds."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_testbed_parser"]


def _run(args: argparse.Namespace) -> int:
    import trio

    from peekproxy.config import ConfigError
    from peekproxy.daemon import DaemonError, _leaves, _watch_signals
    from peekproxy.logs import setup_logging
    from peekproxy.testbed.config import load_testbed_config, testbed_config_from_flags
    from peekproxy.testbed.server import run_testbed

    try:
        if args.config:
            config = load_testbed_config(args.config)
        elif args.server_name:
            config = testbed_config_from_flags(
                server_name=args.server_name,
                federation_bind=args.federation_bind,
                admin_bind=args.admin_bind,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                data_dir=args.data_dir,
            )
        else:
            print("testbed: give -c CONFIG or --server-name", file=sys.stderr)
            return 2
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format, access_log=config.logging.access_log)

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown, nursery.cancel_scope)
            await run_testbed(config, shutdown=shutdown)
            nursery.cancel_scope.cancel()

    failure = None
    try:
        trio.run(main)
    except* (DaemonError, OSError) as group:
        failure = "; ".join(str(e) for e in _leaves(group))
    if failure:
        print(f"testbed: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0


def add_testbed_parser(commands: Any) -> None:
    """Register ``peekproxy testbed`` on the top-level sub-command parsers."""
    parser = commands.add_parser(
        "testbed",
        help="run a small federation server that hosts rooms and serves MSC2444 peeks",
        description="A federation peer for testing peeking: hosts world_readable rooms in "
        "room versions 10-12, serves MSC2444 peeks, pushes events with /send, and offers an "
        "admin API with fault injection. See docs/testbed.md.",
    )
    parser.add_argument("-c", "--config", help="testbed TOML file (instead of the flags)")
    parser.add_argument("--server-name", help="the testbed's server name, e.g. localhost:8448")
    parser.add_argument("--federation-bind", default="127.0.0.1:8448", help="HOST:PORT")
    parser.add_argument("--admin-bind", default="127.0.0.1:8009", help="HOST:PORT (loopback!)")
    parser.add_argument("--tls-cert", help="PEM certificate chain for the federation listener")
    parser.add_argument("--tls-key", help="PEM private key for the federation listener")
    parser.add_argument(
        "--data-dir",
        default="testbed-data",
        help="signing key, admin token and rooms (default: ./testbed-data)",
    )
    parser.set_defaults(func=_run)
