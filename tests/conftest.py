"""Shared test set-up: tests run single-threaded and under inference (no autograd), and import
the installed package only (never the source folders as top-level packages)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# `python -m pytest` from the repository root puts the root on sys.path (Python does, for `-m`),
# which would make the source folders passes/, backends/ and assets/ importable as top-level
# packages: a second copy of every module (and exception class) beside sc_compile.passes /
# sc_compile.backends. The tests import what is installed, as a user does (tests/test_packaging.py
# checks it). No pytest option removes that entry (`--import-mode=importlib` governs only how test
# files are imported, `pythonpath` only adds); the `pytest` script and `python -P -m pytest`
# (PYTHONSAFEPATH=1, Python >= 3.11, as the Makefile runs it) do not add it, and then this line does
# nothing. The test helpers (dummy_dit, tiny_models) are on the path through pyproject's `pythonpath`.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]

torch.set_num_threads(1)

# What a wheel build reads from the checkout is the tracked source; these are local by-products.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "out",
)


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from this checkout, once per session.

    Built from a copy of the source, so that a stale ``build/`` folder of an earlier local build
    cannot put files into it that the source no longer has.
    """
    source = tmp_path_factory.mktemp("source") / "sc_compile"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE, symlinks=True)
    wheel_dir = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheel_dir), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    wheels = sorted(wheel_dir.glob("sc_compile-*.whl"))
    assert len(wheels) == 1, f"expected one sc_compile wheel in {wheel_dir}, found {wheels}"
    return wheels[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and starts with no session state: no cache entry, session
    or pooled buffer of one test serves another (``sc_compile.runtime.registry``)."""
    from sc_compile.runtime import registry

    torch._dynamo.reset()
    registry.reset()
    yield
    torch._dynamo.reset()
    registry.reset()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, with the reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked cuda); torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
