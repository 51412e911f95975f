"""The architecture holds: the import contracts of pyproject.toml (layers one way down, the lab
reached only through the CLI, no import circles between sibling modules), and no file takes
another file's private name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "edge", "inference", "kv_store", "bus")


def test_the_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def private_names_taken() -> list[str]:
    """`from <our module> import _name` across files (a module's own names are its business)."""
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    found += [f"{path.relative_to(REPO)}: from {node.module} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_")]
    return found


def test_no_file_imports_another_files_private_name():
    assert private_names_taken() == []
