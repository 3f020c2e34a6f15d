#!/usr/bin/env python3
"""The package's import graph: cycles, imports inside functions, and imports that break the layers.

    python devtools/import_graph.py           # a report; exit 1 if there is a cycle or a layer break

Reads the source with ``ast`` (nothing is imported or run). Imports under
``if TYPE_CHECKING:`` count too: a module that needs another's types depends on it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "signal_queue"

#: Layers from the bottom up; a module may import its own layer's modules and those below.
#: Producer and consumer stand side by side: neither imports the other.
LAYERS: dict[str, int] = {
    "signal_queue.exceptions": 0,
    "signal_queue.wire": 1,
    "signal_queue.producer": 2,
    "signal_queue.consumer": 2,
}
GLUE = 3  # everything else in the package: the Flask glue on top


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)
    in_functions: list[tuple[int, str]] = field(default_factory=list)


def layer_of(module: str) -> tuple[int, str]:
    """(layer number, the layer's name) of a package module."""
    for prefix, number in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return number, prefix
    return GLUE, "glue"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


def read(root: Path) -> dict[str, Module]:
    """Every module of the package with the package modules it imports."""
    modules: dict[str, Module] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(root, path)
        modules[name] = Module(name, path)
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        is_package = mod.path.name == "__init__.py"
        for node, in_function in _walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod.name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == mod.name:
                    continue
                mod.imports.add(target)
                if in_function:
                    mod.in_functions.append((getattr(node, "lineno", 0), target))
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in modules[v].imports:
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return found


def layer_breaks(modules: dict[str, Module]) -> list[str]:
    """Imports that run up the layers, or sideways between producer and consumer."""
    breaks = []
    for mod in modules.values():
        if mod.name == PACKAGE:
            continue  # __init__ re-exports the public API from every layer
        number, layer = layer_of(mod.name)
        for target in sorted(mod.imports):
            if target == PACKAGE:
                breaks.append(f"{mod.name} -> {target} (the public package, from inside it)")
                continue
            other_number, other_layer = layer_of(target)
            if other_number > number or (other_number == number and other_layer != layer):
                breaks.append(f"{mod.name} ({layer}) -> {target} ({other_layer})")
    return breaks


def main(root: Path) -> int:
    modules = read(root)
    found = cycles(modules)
    breaks = layer_breaks(modules)
    edges = sum(len(m.imports) for m in modules.values())
    print(f"{len(modules)} modules, {edges} imports between them")
    print(f"import cycles: {len(found)}")
    for component in found:
        print(f"  {len(component)} modules: {', '.join(component)}")
    print(f"imports against the layers: {len(breaks)}")
    for text in breaks:
        print(f"  {text}")
    inside = [(m.name, number, target) for m in modules.values() for number, target in m.in_functions]
    print(f"imports inside functions: {len(inside)}")
    for name, number, target in inside:
        print(f"  {name}:{number} -> {target}")
    return 1 if found or breaks else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
