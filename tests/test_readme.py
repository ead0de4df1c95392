"""The README's "Using it on your own pipeline" block runs as written (issue 25): calibrate a table
for a small DiT in the real FluxPipeline, compile with the one line and the table, generate, report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _using_it_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it on your own pipeline") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "no python block under 'Using it on your own pipeline'"
    return match.group(1)


@pytest.mark.slow
def test_the_using_it_block_runs_as_written(tmp_path):
    code = _using_it_block()
    assert 'backend="scalingcache"' in code and "sc_compile.calibrate(" in code
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.stdout
    assert re.search(r"ScalingCache: 20 steps, \d+ full, [1-9]\d* cached", report), report
    assert "alpha.safetensors (20 steps, 2 calibration samples" in report, report
    assert (tmp_path / "alpha.safetensors").is_file()
