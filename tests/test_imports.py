"""The import rules of the layout: `models <- worker <- app`, and only two doors into worker."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(package: str) -> list[tuple[str, str, bool]]:
    """(file, imported module, inside a function) for every import in `package`."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        nested = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append((path.name, node.module, id(node) in nested))
            elif isinstance(node, ast.Import):
                found += [(path.name, alias.name, id(node) in nested) for alias in node.names]
    return found


def test_app_reaches_worker_only_through_jobs_and_queue() -> None:
    used = {module for _, module, _ in imports("app") if module.split(".")[0] == "worker"}
    assert used <= {"worker.jobs", "worker.queue"}, used


def test_worker_hides_no_import_of_itself_inside_a_function() -> None:
    hidden = [(f, m) for f, m, nested in imports("worker") if nested and m.startswith("worker")]
    assert hidden == []


def test_models_import_neither_worker_nor_app() -> None:
    assert [m for _, m, _ in imports("models") if m.split(".")[0] in ("worker", "app")] == []
