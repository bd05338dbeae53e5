"""The package layout holds: no import cycles among bt_plugin's modules (imports inside functions
included), and the runtime (`loading`, `dispatch`, `kernels`, `compat`, `spec`) never imports the
tools built on it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("bt_plugin.loading", "bt_plugin.dispatch", "bt_plugin.kernels", "bt_plugin.compat", "bt_plugin.spec")


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "bt_plugin").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "patches").glob("*.py"):
        found["bt_plugin.patches" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The bt_plugin modules a file imports, anywhere in it (the package itself excepted: its
    `__init__` only re-exports the public API, lazily)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bt_plugin"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("bt_plugin")}
    return {name for name in found if name in known and name != "bt_plugin"}


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_runtime_does_not_import_the_tools():
    known = modules()
    for name, path in known.items():
        if name.startswith(RUNTIME):
            tools = sorted(t for t in imports(path, known) if t.startswith("bt_plugin.tools"))
            assert not tools, f"{name} imports {tools}"
