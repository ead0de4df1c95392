"""One-way layering (issue 24 item 4), read from the source with ``ast``.

Every import of ours counts: module level, inside a function, under ``if TYPE_CHECKING``. A module
imports only from its own layer or the layers below it; within a layer the imports form no cycle;
no module imports another's private (``_name``) names. The layers are the data below, bottom first,
as ARCHITECTURE.md draws them.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where each source folder is installed (pyproject.toml's package-dir).
SOURCE_FOLDERS = {"sc_compile": "sc_compile", "passes": "sc_compile.passes", "backends": "sc_compile.backends"}

# Bottom first. A module belongs to the layer of the longest prefix that names it (``a.b`` names
# ``a.b`` and ``a.b.c``); every module must be placed.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        # What every layer may use: the compile/run contract, the options, the errors, the α table
        # format and its fit, the size of cache state. Nothing here reads a graph or runs a model.
        "foundation",
        (
            "sc_compile.errors",
            "sc_compile.contract",
            "sc_compile.config",
            "sc_compile.resources",
            "sc_compile.metrics",
            "sc_compile.memory",
            "sc_compile.calibration.__init__",
            "sc_compile.calibration.fitting",
            "sc_compile.calibration.table",
            # Console output beside progress bars (the α table's warning uses it).
            "sc_compile.reporting.console",
        ),
    ),
    # Graph passes: analyses that annotate an FX graph, and the one rewrite.
    ("passes", ("sc_compile.passes",)),
    # Compile-time helpers of the backend: lowering of the rewritten graph, shape specialisation,
    # the capture checks and what they read of Dynamo.
    ("backends", ("sc_compile.backends",)),
    # What runs at every call: the dispatcher and its state, the step clock, the decisions, and
    # the report a generation leaves.
    (
        "runtime",
        (
            "sc_compile.runtime",
            "sc_compile.clock",
            "sc_compile.decision",
            "sc_compile.reporting.__init__",
            "sc_compile.reporting.report",
        ),
    ),
    # The backend's entry: compiles the graphs and assembles the runtime that runs them.
    (
        "entry",
        ("sc_compile.backends.scalingcache", "sc_compile.backends.block_graphs", "sc_compile.backends.inner_compiler"),
    ),
    # What users call: the package's functions, calibration runs, explain, the CLI and its demo.
    (
        "api",
        (
            "sc_compile.__init__",
            "sc_compile.__main__",
            "sc_compile.cli",
            "sc_compile.demo",
            "sc_compile.calibration.collect",
            "sc_compile.reporting.explanation",
        ),
    ),
]

# Imports that break the rules today, each with the reason it stays. Keys: (importer, imported).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
ALLOWED_CYCLES: dict[frozenset[str], str] = {}
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    names: tuple[str, ...]
    line: int


def _module_files() -> dict[str, Path]:
    """Installed module name (``pkg.__init__`` for a package) -> source file."""
    files = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            files[".".join((package, *parts))] = path
    # sc_compile/ holds passes/ and backends/ only as installed names, never as source folders.
    return {name: path for name, path in files.items() if ".assets" not in name}


MODULES = _module_files()


def _resolve(name: str) -> str | None:
    """The module an import of ``name`` runs: the module itself, or the package's ``__init__``."""
    if name in MODULES:
        return name
    if f"{name}.__init__" in MODULES:
        return f"{name}.__init__"
    return None


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target is not None:
                    found.append(Import(module, target, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("sc_compile"):
                continue
            from_module = _resolve(source)
            plain = []
            for alias in node.names:
                submodule = _resolve(f"{source}.{alias.name}")
                if submodule is not None:  # `from package import module`
                    found.append(Import(module, submodule, (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                assert from_module is not None, f"{path}:{node.lineno}: cannot resolve {source}"
                found.append(Import(module, from_module, tuple(plain), node.lineno))
    return found


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py"
    return best[1]


def test_the_source_is_read():
    assert len(MODULES) > 40
    assert any(imp.importer.startswith("sc_compile.passes.") for imp in IMPORTS)
    assert any(imp.importer.startswith("sc_compile.backends.") for imp in IMPORTS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_is_in_a_layer(module):
    layer_of(module)


def test_imports_point_down():
    upward = []
    for imp in IMPORTS:
        if layer_of(imp.imported) > layer_of(imp.importer) and (imp.importer, imp.imported) not in ALLOWED_UPWARD:
            names = f" ({', '.join(imp.names)})" if imp.names else ""
            upward.append(
                f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}: {imp.importer} "
                f"[{LAYERS[layer_of(imp.importer)][0]}] imports {imp.imported}{names} "
                f"[{LAYERS[layer_of(imp.imported)][0]}]"
            )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _cycles() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycle():
    """Including cycles closed by a function-level or TYPE_CHECKING import."""
    cycles = [sorted(c) for c in _cycles() if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    private = [
        f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line}: {imp.importer} imports {name} from {imp.imported}"
        for imp in IMPORTS
        for name in imp.names
        if name.startswith("_")
        and not name.startswith("__")
        and (imp.importer, imp.imported, name) not in ALLOWED_PRIVATE
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_allow_lists_name_real_imports():
    """An entry whose import is gone is removed from the list, so the list says what is left."""
    pairs = {(imp.importer, imp.imported) for imp in IMPORTS}
    triples = {(imp.importer, imp.imported, name) for imp in IMPORTS for name in imp.names}
    assert set(ALLOWED_UPWARD) <= pairs, set(ALLOWED_UPWARD) - pairs
    assert set(ALLOWED_PRIVATE) <= triples, set(ALLOWED_PRIVATE) - triples
    cycles = {frozenset(c) for c in _cycles()}
    assert set(ALLOWED_CYCLES) <= cycles, set(ALLOWED_CYCLES) - cycles
