"""``peekproxy testbed``: run the MSC2444 room host for federation testbeds."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peekproxy.testbed.config import TestbedConfig

__all__ = ["add_testbed_parser", "testbed_config_from_args"]


def testbed_config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> TestbedConfig | None:
    """The config ``peekproxy testbed`` runs with: the ``-c`` file, else the flags; the
    ``PEEKPROXY_TESTBED_<SECTION>__<KEY>`` variables of ``environ`` (``None``: the process
    environment) override either. ``None`` when neither ``-c`` nor ``--server-name`` is given.

    Raises:
        ConfigError: one line per problem.
    """
    from peekproxy.testbed.config import load_testbed_config, testbed_config_from_flags

    if args.config:
        return load_testbed_config(args.config, environ)
    if not args.server_name:
        return None
    return testbed_config_from_flags(
        server_name=args.server_name,
        federation_bind=args.federation_bind,
        admin_bind=args.admin_bind,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        data_dir=args.data_dir,
        ip_range_whitelist=args.ip_range_whitelist,
        tls_ca_file=args.tls_ca_file,
        dns_nameservers=args.dns_nameserver,
        environ=environ,
    )


def _run(args: argparse.Namespace) -> int:
    import trio

    from peekproxy.config import ConfigError
    from peekproxy.logs import setup_logging
    from peekproxy.serving import ServingError, failure_message, watch_signals
    from peekproxy.testbed.server import run_testbed

    try:
        config = testbed_config_from_args(args)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    if config is None:
        print("testbed: give -c CONFIG or --server-name", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format, access_log=config.logging.access_log)

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, shutdown, nursery.cancel_scope)
            await run_testbed(config, shutdown=shutdown)
            nursery.cancel_scope.cancel()

    failure = None
    try:
        trio.run(main)
    except* (ServingError, OSError) as group:
        failure = failure_message(group)
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
    parser.add_argument(
        "-c",
        "--config",
        help="testbed TOML file (instead of the flags); in both modes "
        "PEEKPROXY_TESTBED_<SECTION>__<KEY> environment variables override settings",
    )
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
    parser.add_argument(
        "--ip-range-whitelist",
        action="append",
        metavar="CIDR",
        help="let the testbed reach these addresses, e.g. 127.0.0.0/8 for peers on loopback "
        "(repeatable; [federation] ip_range_whitelist)",
    )
    parser.add_argument(
        "--tls-ca-file",
        metavar="PATH",
        help="PEM CA bundle to trust for peers' certificates ([federation] tls_ca_file)",
    )
    parser.add_argument(
        "--dns-nameserver",
        action="append",
        metavar="IP:PORT",
        help="DNS server for finding peers (repeatable; [federation] dns_nameservers)",
    )
    parser.set_defaults(func=_run)
