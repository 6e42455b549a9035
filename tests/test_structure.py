"""The package's shape (issue 12): no import cycle among ``sink_modifier``'s modules, counting imports inside
functions too (a lazy import is still a dependency), and no module over ``MAX_LINES`` lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
    ``__init__``; ``sink_modifier.cli.main.main`` is module ``cli``."""
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
    assert {"cli.main", "cli.workflows", "modifiers.weight_pruning", "calibration.probe"} <= graph.keys()
    new = [cycle for cycle in sorted(_cycles(graph))]
    assert not new, "import cycles in sink_modifier/: " + "; ".join(
        " <-> ".join(cycle) + " (" + ", ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & set(cycle)))
        + ")" for cycle in new)


#: The parts, lowest first (docs/architecture.md): each may import its own part and the ones below, never above.
LAYERS = {
    "plugin": ("__init__", "errors", "compat", "hooks", "seeding", "families", "calibration", "modifiers",
               "loading", "saving", "bundled"),
    "evaluation": ("evaluation",),
    "cli": ("cli",),
}


def layer(module: str) -> int:
    top = module.split(".")[0]
    for rank, parts in enumerate(LAYERS.values()):
        if top in parts:
            return rank
    raise AssertionError(f"sink_modifier.{module} belongs to no part of docs/architecture.md's picture")


def test_every_module_belongs_to_a_part():
    for module in import_graph():
        layer(module)


def test_no_part_imports_a_part_above_it():
    graph = import_graph()
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if layer(target) > layer(name))
    assert not upward, "imports of an upper part: " + ", ".join(upward)


def test_the_layer_rule_catches_an_upward_import():
    graph = {"modifiers.x": {"cli.main"}, "cli.main": {"modifiers.x"}}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert upward == ["modifiers.x -> cli.main"]


@pytest.mark.slow
def test_importing_the_plugin_loads_neither_evaluation_nor_the_command_line():
    """What ``import sink_modifier`` (and so every recipe) pulls in, measured in a fresh interpreter; it also
    leaves transformers' checkpoint-conversion table as it found it (no registration at import)."""
    import subprocess
    import sys

    code = ("from transformers.conversion_mapping import get_checkpoint_conversion_mapping as mapping\n"
            "before = repr(mapping('diffusion_gemma'))\n"
            "import sys, sink_modifier; print(sorted(m for m in sys.modules if m.startswith("
            "('sink_modifier.evaluation', 'sink_modifier.cli', 'lm_eval', 'matplotlib'))))\n"
            "print('conversion table unchanged:', repr(mapping('diffusion_gemma')) == before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-2:] == ["[]", "conversion table unchanged: True"]


def test_the_command_line_front_is_not_imported_by_the_library():
    graph = import_graph()
    importers = sorted(n for n, targets in graph.items() if "cli.main" in targets and n != "cli.__main__")
    assert not importers, f"sink_modifier.cli.main is imported by {importers}: import sink_modifier.cli.workflows"
    benchmarks = PACKAGE.parent / "benchmarks"
    users = sorted(path.name for path in benchmarks.glob("*.py")
                   if "sink_modifier.cli.main" in path.read_text(encoding="utf-8")
                   or "from sink_modifier.cli import main" in path.read_text(encoding="utf-8"))
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
