"""The code is ruff-clean and type-checks as the wheel lays it out (passes/ and backends/ as
sc_compile.passes and sc_compile.backends, exactly the files the wheel installs), examples included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("sc_compile", "passes", "backends", "assets", "examples", "tests", "benchmarks")


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *LINTED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    # The whole tree is formatted (pyproject.toml: line length 120); `ruff format .` applies it.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *LINTED], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.packaging
def test_mypy_is_clean_on_the_wheel(built_wheel, tmp_path):
    # mypy cannot follow setuptools' editable import finder, so it checks the wheel's own files:
    # the package as installed, not the source tree. Paths in its messages are inside the wheel:
    # sc_compile/passes/x.py is passes/x.py, sc_compile/backends/x.py is backends/x.py.
    # The examples (not installed) are checked beside it, against the wheel's package.
    layout = tmp_path / "wheel"
    with zipfile.ZipFile(built_wheel) as wheel:
        wheel.extractall(layout)
        modules = [name for name in wheel.namelist() if name.startswith("sc_compile/") and name.endswith(".py")]
    shutil.copytree(ROOT / "examples", layout / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    examples = list((ROOT / "examples").rglob("*.py"))
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(ROOT / ".mypy_cache"),
        "-p",
        "sc_compile",
        "-p",
        "examples",
    ]
    result = subprocess.run(command, cwd=layout, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every module of the wheel, once; and the wheel holds every module of the source folders.
    expected = sum(
        len(list((ROOT / folder).rglob("*.py"))) for folder in ("sc_compile", "passes", "backends", "assets")
    )
    assert len(modules) == expected, sorted(modules)
    # mypy also counts the data folders (demo_flux/, demo_wan/) as namespace packages.
    data_folders = [d for d in (layout / "sc_compile").rglob("*") if d.is_dir() and not (d / "__init__.py").exists()]
    checked = expected + len(data_folders) + len(examples)
    assert f"no issues found in {checked} source files" in result.stdout, result.stdout
