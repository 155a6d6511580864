"""The reference pages are complete: every command and option of the parser is in
docs/cli.md, every config key of the schema in docs/configuration.md (and no key that is
not one)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pydantic import BaseModel

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
