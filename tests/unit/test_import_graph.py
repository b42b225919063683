"""The package's import graph, read from the source (imports inside functions included; `if TYPE_CHECKING:`
blocks left out, as they never run), has no cycle: every module can be understood, and imported, after
the modules it uses. Folders (and top-level modules) are layered as docs/design.md ("Layers") says: each
imports only from layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lfm2vl_jax"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node outside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for alias in node.names:  # `from . import x` names a module; `from .x import f` does not
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# docs/design.md, "Layers": bottom first. A part imports only from the layers below its own.
LAYERS = [
    {"errors", "memory", "compile_cache", "xla_flags"},
    {"parallel"},
    {"config"},
    {"kernels"},
    {"nn"},
    {"inputs", "checkpoint"},
    {"inference", "processing"},
    {"training", "serving"},
    {"api"},
    {"integrations"},
    {"cli", ""},  # "": the package's __init__
]


def part(module: str) -> str:
    """The folder or top-level module a module belongs to ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    unplaced = sorted({part(m) for m in graph} - set(level))
    found = [f"{name}: in no layer (add it to LAYERS and docs/design.md)" for name in unplaced]
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = part(module), part(target)
            if a != b and a in level and b in level and level[b] >= level[a]:
                found.append(f"{module} -> {target}")
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["lfm2vl_jax.api"]  # the reader found the modules and their imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_folder_imports_only_from_the_layers_below():
    assert layer_violations(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"lfm2vl_jax.nn.text": {"lfm2vl_jax.inference.cache"}, "lfm2vl_jax.inference.cache": set()}
    assert layer_violations(graph) == ["lfm2vl_jax.nn.text -> lfm2vl_jax.inference.cache"]
