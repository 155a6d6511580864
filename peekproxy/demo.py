"""``make demo``: run the daemon on the shipped ``config.toml`` and show its key server.

Creates the signing key named in the config if it is missing, starts the daemon in this
process, fetches ``GET /_matrix/key/v2/server`` from the federation listener, checks the
document's self-signature, prints where it answers, and keeps serving until Ctrl-C
(``--once``: stop after the check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import httpx
import trio
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from peekproxy.config import ConfigError, load_config
from peekproxy.daemon import DaemonError, Listening, _leaves, run_daemon
from peekproxy.federation.signing_key import SigningKeyError, write_new_signing_key
from peekproxy.logs import setup_logging
from peekproxy.store import StoreError


async def _demo(config_path: str, once: bool) -> int:
    config = load_config(config_path)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        listening: Listening = await nursery.start(
            lambda task_status: run_daemon(
                config, shutdown=shutdown, handle_signals=not once, task_status=task_status
            )
        )
        url = f"{listening.federation}/_matrix/key/v2/server"
        async with httpx.AsyncClient(verify=False, timeout=10) as http:
            document = (await http.get(url)).json()
        [(key_id, entry)] = document["verify_keys"].items()
        verify_signed_json(
            document,
            config.server.server_name,
            decode_verify_key_bytes(key_id, decode_base64(entry["key"])),
        )
        print(f"peekproxy key server answers at {url}")
        print(f"  server_name {document['server_name']}, key {key_id}, self-signature verified")
        print(f"  health: {listening.client}/health   metrics: {listening.metrics}/metrics")
        if once:
            shutdown.set()
        else:
            print("  serving until Ctrl-C")
    print("demo: OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peekproxy.demo")
    parser.add_argument("-c", "--config", default="config.toml")
    parser.add_argument("--once", action="store_true", help="stop after the key check")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    key_file = config.server.signing_key_file
    failed = False
    try:
        if not key_file.exists():
            write_new_signing_key(key_file)
            print(f"created signing key {key_file}")
        setup_logging("WARNING")
        trio.run(_demo, args.config, args.once)
    except* (ConfigError, SigningKeyError, StoreError, DaemonError, OSError) as group:
        for error in _leaves(group):
            lines = error.problems if isinstance(error, ConfigError) else [str(error)]
            print("\n".join(f"demo: {line}" for line in lines), file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
