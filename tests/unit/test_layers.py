"""The import rules of docs/ARCHITECTURE.md, checked on the source (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Lower layers never import higher ones (docs/ARCHITECTURE.md "Layers").
LAYERS = {
    "dbmigrate.errors": 0, "dbmigrate.target": 0, "dbmigrate.private": 0,
    "dbmigrate.db": 1, "dbmigrate.local": 1, "dbmigrate.pgtools": 1, "dbmigrate.storage": 1,
    "dbmigrate.revisions": 1, "dbmigrate.fingerprint": 1, "dbmigrate.guard": 1, "dbmigrate.migrate": 1, "dbmigrate.lockretry": 1,
    "dbmigrate.schema": 1, "dbmigrate.isolation": 1,
    "dbmigrate.policy": 1,
    "dbmigrate.health": 2, "dbmigrate.backup": 2, "dbmigrate.catalogue": 2, "dbmigrate.pgrestore": 2,
    "dbmigrate.restore": 2, "dbmigrate.drift": 2, "dbmigrate.settings": 2, "dbmigrate.report": 2,
    "dbmigrate.lint": 2, "dbmigrate.overview": 2, "dbmigrate.fleet": 2,
    "dbmigrate.phases": 3, "dbmigrate.auto_rollback": 3, "dbmigrate.rehearsal": 3, "dbmigrate.run": 3,
    "dbmigrate.pipeline": 3, "dbmigrate.interruption": 3,
    "dbmigrate.cli": 4, "dbmigrate.cli.arguments": 4, "dbmigrate.cli.environment": 4, "dbmigrate.cli.render": 4,
    "dbmigrate.cli.inspect": 4, "dbmigrate.cli.migrate": 4, "dbmigrate.cli.backups": 4, "dbmigrate.cli.local": 4,
    "dbmigrate.cli.fleet": 4, "dbmigrate.__main__": 4, "dbmigrate.watch": 4, "blocks": 4, "blocks.sync": 4,
    "blocks.alerts": 4, "blocks.fleet": 4, "stack": 4, "stack.processes": 4, "stack.provision": 4, "stack.tenants": 4,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("dbmigrate", "blocks", "flows", "stack"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def imports(name: str) -> dict[str, bool]:
    """First-party modules ``name`` imports, each with whether it is imported at module level."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(node) for node in tree.body}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:  # `from package import module`: that module
            candidates = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                          for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            root = candidate.split(".")[0]
            if candidate in MODULES or root in ("prefect", "prefect_aws"):
                key = candidate if candidate in MODULES else root
                found[key] = found.get(key, False) or id(node) in top_level
    return {k: v for k, v in found.items() if k != name}


def test_every_module_has_a_layer():
    assert {m for m in MODULES if not m.startswith("flows")} <= set(LAYERS) | {"dbmigrate"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_module_imports_only_its_own_layer_or_lower(name):
    higher = [m for m in imports(name) if m in LAYERS and LAYERS[m] > LAYERS[name]]
    assert not higher, f"{name} (layer {LAYERS[name]}) imports {higher}"


def test_target_is_a_leaf():
    assert set(imports("dbmigrate.target")) <= {"dbmigrate.errors"}


def test_no_import_cycles():
    graph = {m: {i for i in imports(m) if i in MODULES} for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in graph[module]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path[path.index(nxt):] + [nxt])}" \
                if nxt in path else f"import cycle through {nxt}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_dbmigrate_imports_prefect_only_lazily_where_documented():
    """The plain CLI stays fast: Prefect only for s3-bucket/ storage, --env and `blocks sync` (through
    blocks), `local up|down|env|status` (the stack), `run` (the watch) and `fleet status` (its block)."""
    for name in (m for m in MODULES if m.startswith("dbmigrate")):
        uses = {k: top for k, top in imports(name).items()
                if k.split(".")[0] in ("prefect", "prefect_aws", "blocks", "flows", "stack")}
        assert not any(uses.values()), f"{name} imports {uses} at module level"
        if uses:
            assert name in ("dbmigrate.storage", "dbmigrate.cli.environment", "dbmigrate.cli.inspect",
                            "dbmigrate.cli.local", "dbmigrate.cli.fleet", "dbmigrate.watch"), \
                f"{name} imports {sorted(uses)}"


FLOW_MODULES = ("flows.migrate", "flows.db_rollback", "flows.maintenance")


@pytest.mark.parametrize("name", FLOW_MODULES)
def test_a_flow_module_imports_no_other_flow_module(name):
    assert not set(imports(name)) & set(FLOW_MODULES)
