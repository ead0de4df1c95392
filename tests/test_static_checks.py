"""The code is ruff-clean and type-checks (mypy sees passes/ and backends/ as sc_compile.*)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "sc_compile", "passes", "backends", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every module of the package, passes/ and backends/ included (through their links), once.
    expected = sum(len(list((ROOT / folder).rglob("*.py"))) for folder in ("sc_compile", "passes", "backends"))
    assert f"no issues found in {expected} source files" in result.stdout, result.stdout
