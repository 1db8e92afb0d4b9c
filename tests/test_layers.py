"""The layers are checked, not only described (STYLE example 15).

Every module of ``src/asmtp`` is read as an AST (nothing is imported) and each import
it makes, at module level or inside a function, is checked against the layer table:
a module may import its own layer and the layers below it, never one above. The sans-IO
core imports no I/O module, and the module-level import graph has no cycle (imports
inside a function are deferred on purpose and run after every module has loaded).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

#: (layer, name, the modules in it): README's "How it is built" lists the same table
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "the exception tree and the version", ("asmtp.errors", "asmtp._version")),
    (1, "sans-IO core", ("asmtp._core",)),
    (2, "settings and results", ("asmtp.config", "asmtp.results")),
    (3, "I/O drivers and the resolver", ("asmtp._io",)),
    (4, "sessions and delivery", ("asmtp._delivery",)),
    (
        5,
        "the public API, sync callers, Django and the test outbox",
        (
            "asmtp",
            "asmtp.sync",
            "asmtp.django",
            "asmtp.otel",
            "asmtp.bounces",
            "asmtp.testing",
            "asmtp._pytest_plugin",
            "asmtp.celery",
        ),
    ),
    (6, "the command line", ("asmtp.cli", "asmtp.__main__")),
)

#: what the sans-IO core must never import (STYLE: bytes in, replies out)
IO_MODULES = {"asyncio", "anyio", "trio", "socket", "selectors", "dns", "uvloop", "ssl"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / "asmtp").rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of ``module``: the table's longest prefix that contains it."""
    best = (-1, -1)
    for layer, _, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), layer))
    assert best[1] >= 0, f"{module} is in no layer of the table: add it"
    return best[1]


def imports(module: str, path: Path | None = None) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for each import in ``module``
    (read from ``path``, by default its file in src/): relative imports resolved,
    ``from package import name`` counted as the submodule when ``name`` is one."""
    path = path or MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno, id(node) in top


def test_every_module_is_in_the_table() -> None:
    assert len(MODULES) > 30
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module: str) -> None:
    mine = layer_of(module)
    upward = [
        f"line {line}: {target} (layer {layer_of(target)})"
        for target, line, _ in imports(module)
        if target.split(".")[0] == "asmtp" and layer_of(target) > mine
    ]
    assert upward == [], f"{module} (layer {mine}) imports upward: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) <= 2))
def test_the_core_and_its_values_import_no_io(module: str) -> None:
    # Settings may hold an ssl.SSLContext the caller made; only the core never sees ssl.
    forbidden = IO_MODULES if layer_of(module) <= 1 else IO_MODULES - {"ssl"}
    io = [f"line {line}: {t}" for t, line, _ in imports(module) if t.split(".")[0] in forbidden]
    assert io == [], f"{module} is sans-IO but imports {io}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (module -> the modules it imports), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph.get(module, ())):
            cycle = visit(target, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_module_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = {t for t, _, top in imports(module) if top and t in MODULES and t != module}
        # Importing a submodule runs its packages' __init__ first (a submodule importing
        # its own package is not a cycle: the package is already being imported).
        for target in list(targets):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts))}
        graph[module] = {t for t in targets if not module.startswith(t + ".") and t != module}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """An upward import and a cycle are found: the checks above are not vacuous."""
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom ..cli import main\n\ndef f():\n    from . import reply\n")
    found = sorted(imports("asmtp._core.bad", bad))
    assert found == [
        ("asmtp._core.reply", 5, False),
        ("asmtp.cli.main", 2, True),
        ("asyncio", 1, True),
    ]
    assert layer_of("asmtp._core.bad") == 1 < layer_of("asmtp.cli") == 6
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
