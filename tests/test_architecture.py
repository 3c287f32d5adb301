"""The architecture as checks: imports run one way, pieces stay small, and only the
twisted.web adapter knows another library's private names.

Read from the source with :mod:`ast`, so a failure names the module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import equalizer

PACKAGE = Path(equalizer.__file__).parent
ADAPTER = "equalizer.proxy.site"
"""The one module allowed to know twisted.web's private names and to rebind methods."""

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 80

PUBLIC_UNDERSCORE = {"_exit", "_replace", "_asdict", "_fields", "_make"}
"""Underscore names that are public API (os._exit, namedtuple methods)."""


def _sources() -> dict[str, str]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path.read_text(encoding="utf-8")
    return found


SOURCES = _sources()
MODULES = {name: ast.parse(source, name) for name, source in SOURCES.items()}


def _runtime_imports(name: str, tree: ast.Module) -> set[str]:
    """The package modules ``name`` imports when it runs (TYPE_CHECKING blocks aside)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for body in node.body for child in ast.walk(body))
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join([*package, node.module])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in targets if target in MODULES and target != name}


def _cycle() -> list[str] | None:
    graph = {name: _runtime_imports(name, tree) for name, tree in MODULES.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_imports_have_no_cycles():
    assert _cycle() is None


def _spans(kind: type | tuple[type, ...]) -> list[tuple[str, str, int]]:
    return [
        (module, node.name, node.end_lineno - node.lineno + 1)
        for module, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, kind)
    ]


def test_modules_are_small():
    lines = {name: len(source.splitlines()) for name, source in SOURCES.items()}
    assert {name: count for name, count in lines.items() if count > MAX_MODULE_LINES} == {}


def test_classes_are_small():
    assert [span for span in _spans(ast.ClassDef) if span[2] > MAX_CLASS_LINES] == []


def test_functions_are_small():
    functions = _spans((ast.FunctionDef, ast.AsyncFunctionDef))
    assert [span for span in functions if span[2] > MAX_FUNCTION_LINES] == []


def _defined_names() -> set[str]:
    names: set[str] = set()
    for tree in MODULES.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _foreign_private_uses(tree: ast.Module, ours: set[str]) -> list[str]:
    """``x._name`` where the package defines no ``_name``, and methods rebound on
    another object (``other.method = self.method`` or a lambda)."""
    methods = {node.name for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_foreign_private(node.attr, ours):
            found.append(f"{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Assign) and _is_method(node.value, methods):
            found.extend(
                f"{node.lineno}: rebinds .{target.attr}"
                for target in node.targets
                if isinstance(target, ast.Attribute) and not _on_self(target)
            )
    return found


def _is_foreign_private(attr: str, ours: set[str]) -> bool:
    return (attr.startswith("_") and not attr.startswith("__")
            and attr not in ours and attr not in PUBLIC_UNDERSCORE)


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id == "self"


def _is_method(value: ast.expr, methods: set[str]) -> bool:
    """A lambda, or one of the module's methods taken off ``self``."""
    return isinstance(value, ast.Lambda) or (
        isinstance(value, ast.Attribute) and _on_self(value) and value.attr in methods)


@pytest.mark.parametrize("module", sorted(set(MODULES) - {ADAPTER}))
def test_only_the_twisted_web_adapter_knows_private_names(module):
    assert _foreign_private_uses(MODULES[module], _defined_names()) == []


def test_the_adapter_is_where_the_private_names_are():
    assert _foreign_private_uses(MODULES[ADAPTER], _defined_names()) != []
