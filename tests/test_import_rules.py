"""The layers of docs/architecture.md, kept by import-linter contracts (pyproject.toml
``[tool.importlinter]``; ``make lint`` runs ``lint-imports`` too).

The second test shows the check has teeth: a copy of the package whose core imports the store
breaks the "core is pure" contract and the layers contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy shadows the installed package
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_are_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_core_module_that_imports_the_store_breaks_the_rules(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "peekproxy", tmp_path / "peekproxy")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "peekproxy" / "core" / "sync.py").open("a") as module:
        module.write("\nfrom peekproxy.store import Storage  # noqa: F401, E402\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "peekproxy.core is not allowed to import peekproxy.store" in result.stdout
    assert "peekproxy.core.sync -> peekproxy.store" in result.stdout


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(result.stdout.split())


def test_importing_the_core_loads_no_io() -> None:
    """What the contracts say statically, at run time: the core pulls in no I/O library."""
    loaded = _loaded_after_import("peekproxy.core.sync, peekproxy.core.pdu, peekproxy.core.live")
    assert loaded.isdisjoint({"trio", "httpx", "sqlite3", "hypercorn", "starlette"})
    assert not any(name.startswith(("peekproxy.store", "peekproxy.services")) for name in loaded)


def test_the_testbed_loads_no_peek_service_and_no_database() -> None:
    loaded = _loaded_after_import("peekproxy.testbed.server")
    assert not {"peekproxy.services.syncing", "peekproxy.store.sqlite", "peekproxy.daemon"} & loaded
    assert "sqlite3" not in loaded
