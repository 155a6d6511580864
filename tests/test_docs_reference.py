"""The reference pages are complete: every command and option of the parser is in
docs/cli.md, every config key of the schema in docs/configuration.md (and no key that is
not one), every route the daemon serves in docs/operations.md's "Endpoints" (and no route
that it does not serve)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pydantic import BaseModel
from starlette.routing import Route

from peekproxy.cli import build_parser
from peekproxy.config import Config
from tests.support import subcommands

DOCS = Path(__file__).resolve().parent.parent / "docs"


def sections(page: Path) -> dict[str, str]:
    """``## heading`` -> the text up to the next heading of that level."""
    parts = re.split(r"^## (.+)$", page.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs something (``pdu check``, not ``pdu``), with its parser."""
    children = subcommands(parser)
    if not children:
        return [(path, parser)]
    found = [] if path else [(path, parser)]  # the top level has options of its own
    for name, child in children.items():
        found += leaf_commands(child, (*path, name))
    return found


def test_every_command_and_option_is_in_the_cli_page() -> None:
    page = sections(DOCS / "cli.md")
    missing = []
    for path, parser in leaf_commands(build_parser()):
        heading = " ".join(("peekproxy", *path))
        text = page.get(heading)
        if text is None:
            missing.append(f"no '## {heading}' section")
            continue
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            names = action.option_strings or [action.dest]
            missing += [f"{heading}: {n}" for n in names if f"`{n}`" not in text]
    assert not missing, missing


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys of the config schema; a table of its own (a section) is walked, a dict or
    list of tables (``old_verify_keys``, ``trusted_key_servers``) is one key."""
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= schema_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def documented_keys(page: Path) -> set[str]:
    """Keys named in the first column of the table of the page's "Keys" section: `a.b.c`,
    then `d`, `e` for a.b.d and a.b.e; `[[a.b]]` and `a.b."ID"` stand for a.b."""
    keys = set()
    for line in sections(page)["Keys"].splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split(" | ")[0])
        first = names[0].strip("[]").split('."')[0]
        keys.add(first)
        prefix = first.rpartition(".")[0]
        keys |= {f"{prefix}.{name}" for name in names[1:]}
    return keys


def test_every_config_key_is_in_the_configuration_page() -> None:
    schema = schema_keys(Config)
    documented = documented_keys(DOCS / "configuration.md")
    assert sorted(schema - documented) == [], "keys missing from docs/configuration.md"
    assert sorted(documented - schema) == [], "docs/configuration.md names keys that are not"


def served_routes() -> set[tuple[str, str, str]]:
    """(listener, method, path template) of every route the daemon serves, taken from the
    same route tables it serves: the federation app's, and the client listener's in front
    mode with the delegation secret (the most it serves). Handlers are only referenced,
    never called, so the services behind them are stand-ins."""
    from types import SimpleNamespace

    from peekproxy.api.federation import FederationApi
    from peekproxy.daemon import client_api_routes
    from peekproxy.services.settings import LiveSettings

    stub = SimpleNamespace()
    services = SimpleNamespace(
        syncing=stub,
        reads=stub,
        status=stub,
        settings=SimpleNamespace(live=LiveSettings(delegation_secret="s")),
    )
    config = Config.model_validate(
        {"server": {"server_name": "a.example", "signing_key_file": "k"}},
        context={"check_files": False},
    )
    client, _ = client_api_routes(services, stub, stub, config)  # type: ignore[arg-type]
    federation = FederationApi(
        server_name="a.example",
        signing_key=stub,  # type: ignore[arg-type]
        key_valid_for_ms=1,
        old_verify_keys={},
        keyring=stub,  # type: ignore[arg-type]
        ingest=stub,  # type: ignore[arg-type]
        members=stub,  # type: ignore[arg-type]
        observer=stub,  # type: ignore[arg-type]
        clock_ms=lambda: 0,
    ).routes()
    found = {("client", "GET", "/health"), ("client", "GET", "/ready")}
    found.add(("metrics", "GET", "/metrics"))
    for listener, routes in (("federation", federation), ("client", client)):
        for route in routes:
            assert isinstance(route, Route)
            path = re.sub(r":path}", "}", route.path)
            for method in (route.methods or set()) - {"HEAD"}:
                found.add((listener, method, path))
    return found


def documented_routes() -> set[tuple[str, str, str]]:
    """(listener, method, path template) of operations.md's "Endpoints" table: each cell
    lists ``METHOD /path`` items; ``.../x`` stands for the API prefix of the item before it
    (``/_matrix/federation/v1``, ``/_matrix/client/{prefix}``) followed by ``/x``;
    ``{prefix}`` stands for ``r0``/``v3`` (and the MSC2753 unstable prefix, which the test
    folds into it)."""
    table = sections(DOCS / "operations.md")["Endpoints"]
    found = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        listener = cells[0].split()[0]
        base = ""
        for method, path in re.findall(r"`([A-Z]+) ([^`]+)`", cells[1]):
            if path.startswith("..."):
                path = base + path[3:]
            else:
                prefix = re.match(r"/_matrix/(federation/v1|client/\{prefix\})", path)
                base = prefix.group(0) if prefix else ""
            found.add((listener, method, path))
    return found


def _fold_prefix(path: str) -> str:
    return re.sub(
        r"^/_matrix/client/(r0|v3|unstable/org\.matrix\.msc2753)/",
        "/_matrix/client/{prefix}/",
        path,
    )


def test_every_endpoint_is_in_the_operations_page() -> None:
    served = {(lst, m, _fold_prefix(p)) for lst, m, p in served_routes()}
    documented = documented_routes()
    assert served - documented == set(), "served but not in docs/operations.md"
    assert documented - served == set(), "in docs/operations.md but not served"
