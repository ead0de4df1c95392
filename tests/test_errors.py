"""One error hierarchy (issue 24 item 5): every error class of ours is defined once, in
sc_compile/errors.py, derives from ScalingCacheError, keeps its built-in base, and is importable
from sc_compile."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import sc_compile
from sc_compile import errors

# Exceptions that are signals inside one module, never raised to a user.
INTERNAL_SIGNALS = {"sc_compile.clock.step_clock.NewGeneration"}

# The built-in base each error has had since before the hierarchy: ``except`` clauses written
# against these keep working.
BUILTIN_BASE = {
    "AlphaTableError": ValueError,
    "BatchTimestepError": ValueError,
    "BudgetError": ValueError,
    "CacheMemoryError": MemoryError,
    "ClockError": RuntimeError,
    "GradEnabledError": RuntimeError,
    "NoBlocksFoundError": RuntimeError,
    "PassFailedError": RuntimeError,
    "StochasticSamplerError": RuntimeError,
    "UncacheableSplitError": RuntimeError,
    "UnsupportedGraphError": RuntimeError,
    "GraphBreakError": RuntimeError,
    "RegionalCompilationError": RuntimeError,
    "ForeignCacheError": RuntimeError,
    "BlockGraphError": RuntimeError,
}


def _library_modules() -> list[str]:
    names = ["sc_compile"]
    for info in pkgutil.walk_packages(sc_compile.__path__, prefix="sc_compile."):
        if info.name.startswith("sc_compile.demo") or info.name == "sc_compile.__main__":
            continue
        names.append(info.name)
    return names


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in _library_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("sc_compile")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_error_derives_from_the_base_and_lives_in_errors():
    classes = _exception_classes()
    assert "sc_compile.errors.ClockError" in classes  # the walk reaches the library
    for qualname, cls in classes.items():
        if qualname in INTERNAL_SIGNALS:
            continue
        assert cls.__module__ == "sc_compile.errors", f"{qualname} is defined outside sc_compile/errors.py"
        assert issubclass(cls, errors.ScalingCacheError), f"{qualname} does not derive from ScalingCacheError"


def test_no_error_class_is_defined_outside_errors_py():
    """The source, not only what imports: a class named ``*Error`` is written in errors.py only."""
    package = Path(sc_compile.__file__).parent
    roots = [package, package / "passes", package / "backends"]
    seen = set()
    for root in roots:
        for path in sorted(root.resolve().rglob("*.py")):
            if path in seen or path.name == "errors.py":
                continue
            seen.add(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    assert not node.name.endswith("Error"), f"{path}: class {node.name} belongs in sc_compile/errors.py"


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_each_error_keeps_its_builtin_base_and_is_exported(name):
    cls = getattr(sc_compile, name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, errors.ScalingCacheError)
    assert issubclass(cls, BUILTIN_BASE[name])
    assert name in sc_compile.__all__
    assert name in dir(sc_compile)


def test_the_base_is_not_a_runtime_error():
    """An AlphaTableError stays a ValueError only: the base adds no built-in class of its own."""
    assert errors.ScalingCacheError.__bases__ == (Exception,)
    assert not issubclass(errors.AlphaTableError, RuntimeError)


def test_errors_are_all_exported():
    public = {name for name in errors.__all__}
    assert public == set(BUILTIN_BASE) | {"ScalingCacheError"}
    assert public <= set(sc_compile.__all__)


def test_dir_lists_the_lazy_names():
    listed = dir(sc_compile)
    for name in ("AlphaTable", "ScalingCacheConfig", "ScalingCacheError", "compile", "report"):
        assert name in listed


def test_old_homes_still_export_the_same_class():
    from sc_compile.backends.capture_check import GraphBreakError
    from sc_compile.calibration.table import AlphaTableError
    from sc_compile.clock.step_clock import ClockError
    from sc_compile.passes.find_blocks import NoBlocksFoundError, UnsupportedGraphError
    from sc_compile.runtime.dispatch import GradEnabledError

    assert GraphBreakError is errors.GraphBreakError
    assert AlphaTableError is errors.AlphaTableError
    assert ClockError is errors.ClockError
    assert NoBlocksFoundError is errors.NoBlocksFoundError
    assert UnsupportedGraphError is errors.UnsupportedGraphError
    assert GradEnabledError is errors.GradEnabledError
