"""The tests' own layout (issue 16): test modules share code only through tests/support, never by
importing one another, and the benchmarks, which run without the test suite, import nothing from tests/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (lazy imports included), and every name it imports from one."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def is_test_module(name: str) -> bool:
    return name.startswith("tests.") and any(part.startswith("test_") for part in name.split("."))


def test_no_module_of_the_tests_imports_a_test_module():
    offenders = {f"{path.relative_to(REPO)}: {name}"
                 for path in (REPO / "tests").rglob("*.py") for name in imported(path) if is_test_module(name)}
    assert sorted(offenders) == [], "move what they share to tests/support"


def test_the_benchmarks_import_nothing_from_the_tests():
    offenders = {f"{path.relative_to(REPO)}: {name}"
                 for path in (REPO / "benchmarks").rglob("*.py") for name in imported(path)
                 if name == "tests" or name.startswith("tests.")}
    assert sorted(offenders) == []


def test_what_the_benchmarks_import_from_the_project_exists():
    """They run by hand, rarely: a module moved (dbmigrate.stack became stack/) must not leave one
    failing on its first line of work. Lazy imports inside functions included."""
    import importlib

    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for name in imported(path):
            if name.split(".")[0] not in ("dbmigrate", "stack", "flows", "blocks"):
                continue
            module, _, attribute = name.rpartition(".")
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                if not module or not hasattr(importlib.import_module(module), attribute):
                    missing.append(f"{path.name}: {name}")
    assert missing == []


def test_every_xdist_group_has_its_place_in_the_order_the_groups_run():
    """tests/conftest.py pairs the heavy groups with light ones by their order: a new group is placed there."""
    from tests.conftest import GROUPS_HEAVIEST_FIRST

    used = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "xdist_group":
                used.add(node.args[0].value)
    assert used and sorted(used - set(GROUPS_HEAVIEST_FIRST)) == []
