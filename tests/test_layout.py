"""The package layout by role (docs/architecture.md): what the top level holds, which tier may
import which, and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_diag

PACKAGE = Path(lightning_diag.__file__).parent

#: The contract and the plumbing; everything else lives in a folder named for its role.
TOP_LEVEL_MODULES = {"__init__", "__main__", "findings", "base", "batch", "cli", "validation"}
FOLDERS = {"isolation", "functional", "checks", "callbacks", "tensorboard", "report", "inference",
           "tuning", "examples"}

#: Tiers that must not import (at module level) from the folders listed: pure maths knows no
#: Trainer-side code, checks know no callbacks, inference imports cleanly without callbacks.
FORBIDDEN = {
    "functional": {"isolation", "checks", "callbacks", "tensorboard", "report", "inference",
                   "tuning", "examples"},
    "checks": {"callbacks", "report", "tuning", "examples"},
    "inference": {"callbacks", "report", "tuning", "examples"},
    "tensorboard": {"checks", "callbacks", "report", "inference", "tuning", "examples"},
    "report": {"checks", "callbacks", "inference", "tuning", "examples"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package imported when ``path`` is imported (function-local and
    ``TYPE_CHECKING`` imports excluded: they cannot form an import-time cycle)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in known else node.module)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                if isinstance(node, ast.Try):
                    for handler in node.handlers:
                        visit(handler.body)

    visit(tree.body)
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _module_level_imports(path, set(modules)) for name, path in modules.items()}


def test_top_level_holds_only_the_contract_the_plumbing_and_the_role_folders():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert modules == TOP_LEVEL_MODULES, modules ^ TOP_LEVEL_MODULES
    assert folders == FOLDERS, folders ^ FOLDERS


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from b import x\n")
    b.write_text("import a\n")
    assert _module_level_imports(a, {"a", "b"}) == {"b"}
    assert _module_level_imports(b, {"a", "b"}) == {"a"}


def test_tiers_import_only_downwards():
    bad = []
    for module, imports in _graph().items():
        tier = module.split(".")[1] if module.count(".") else ""
        for imported in imports:
            target = imported.split(".")[1] if imported.count(".") else ""
            if target in FORBIDDEN.get(tier, set()):
                bad.append(f"{module} -> {imported}")
    assert bad == []


def test_public_names_stay_importable():
    import lightning_diag.callbacks as callbacks

    for name in lightning_diag.__all__:
        assert hasattr(lightning_diag, name), name
    for name in callbacks.__all__:
        assert getattr(lightning_diag, name) is getattr(callbacks, name)
