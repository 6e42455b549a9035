"""The package's shape (issue 12): no import cycle among ``sink_modifier``'s modules, counting imports inside
functions too (a lazy import is still a dependency), and no module over ``MAX_LINES`` lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sink_modifier"
MAX_LINES = 450



def _modules() -> dict[str, Path]:
    """Module name (``cli``, ``bundled``, ``bundled.x``) -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts) or "__init__"] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports, anywhere in its file, module level or inside a function.

    ``from sink_modifier import x`` imports module ``x`` where there is one, else a name of the package's
    ``__init__``; ``sink_modifier.cli.main`` is module ``cli``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []

    def resolve(target: str) -> str | None:
        if target != "sink_modifier" and not target.startswith("sink_modifier."):
            return None
        inner = target.removeprefix("sink_modifier").lstrip(".")
        while inner and inner not in modules:
            inner = inner.rpartition(".")[0]
        return inner or "__init__"

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from this module's package, up ``level - 1``
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(["sink_modifier", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}".removeprefix("sink_modifier.")
                found.add(submodule if submodule in modules else resolve(module))
    found.discard(None)
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every strongly connected component with more than one module, as a sorted tuple (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles_among_the_package_modules():
    graph = import_graph()
    assert {"cli", "console", "workflows", "inspection", "demo"} <= graph.keys()
    new = [cycle for cycle in sorted(_cycles(graph))]
    assert not new, "import cycles in sink_modifier/: " + "; ".join(
        " <-> ".join(cycle) + " (" + ", ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & set(cycle)))
        + ")" for cycle in new)


def test_the_command_line_front_is_not_imported_by_the_library():
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if "cli" in targets)
    assert not importers, f"sink_modifier.cli is imported by {importers}: import sink_modifier.workflows instead"
    benchmarks = PACKAGE.parent / "benchmarks"
    users = sorted(path.name for path in benchmarks.glob("*.py")
                   if "sink_modifier.cli" in path.read_text(encoding="utf-8")
                   or "from sink_modifier import cli" in path.read_text(encoding="utf-8"))
    # scale.py times the `sink-prune run` command itself; quality.py runs `sink-prune compare` as a user does
    assert users == ["quality.py", "scale.py"], users


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


def test_no_module_is_longer_than_the_limit():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text(encoding="utf-8").splitlines())
               for path in PACKAGE.rglob("*.py")}
    offenders = {name: count for name, count in lengths.items()
                 if count > MAX_LINES}
    assert not offenders, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{name} ({count})" for name, count in sorted(offenders.items()))
