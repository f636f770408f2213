"""The shape of the package: imports flow one way, the core stays free of I/O glue, modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
# A module this long has more than one job.
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sidecar_imports(path: Path) -> set[str]:
    """Every sidecar module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sidecar"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: sidecar_imports(path) & modules.keys() - {name} for name, path in modules.items()}


def test_no_import_cycles() -> None:
    """No sidecar module imports, directly or through others, a module that imports it back (lazy imports count)."""
    graph = import_graph()
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            # A package's own __init__ importing its modules is not a cycle.
            if target in trail and not name.startswith(target + "."):
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in trail and len(trail) < 12:
                visit(target, [*trail, target])

    for name in sorted(graph):
        visit(name, [name])
    assert cycles == []


def test_no_module_is_over_the_line_limit() -> None:
    """Every module stays at or under MAX_MODULE_LINES lines."""
    long = {
        module_name(path): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_token_core_loads_no_concrete_store_and_no_http() -> None:
    """Importing the token manager loads neither a concrete store nor aiohttp: it knows only the seams."""
    probe = (
        "import sys, sidecar.manager\n"
        "print(sorted(m for m in sys.modules if m.startswith(('sidecar.store.file', 'sidecar.store.memory', 'aiohttp', 'sidecar.auth', 'sidecar.proxy', 'sidecar.server'))))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "[]"
