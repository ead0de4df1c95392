"""``benchmarks/device_check.py`` (issue 23): its ``--cpu-smoke`` run writes the JSON and markdown
the device run writes, with every CPU-measurable part filled in, the CUDA-only parts skipped with
the reason, and no error; a time budget that runs out skips the remaining parts and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
METHODS = {
    "torch.compile",
    "ScalingCache (default)",
    "ScalingCache (speedup=2.5)",
    "FirstBlockCache thr=0.08",
    "TaylorSeerCache interval=3",
}


def _run(out: Path, *argv: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "device_check.md").read_text().startswith("# Device check (CPU smoke)")
    return json.loads((out / "device_check.json").read_text())


@pytest.mark.slow
def test_cpu_smoke_fills_every_cpu_part_and_skips_the_cuda_ones(tmp_path):
    result = _run(tmp_path)
    assert result["smoke"] is True and result["errors"] == []
    assert result["elapsed_s"] < result["budget_s"]
    skipped = {s["part"]: s["reason"] for s in result["skipped"]}
    assert skipped == {
        f"{m}: {part}": "CUDA only (this is the CPU smoke run)"
        for m in ("flux", "wan")
        for part in ("peak memory", "sync check", "generations: torch.compile reduce-overhead")
    }
    for name, model in result["models"].items():
        assert model["explain"]["measured_blocks"]["buffer_bytes_per_stream"] > 0
        assert model["explain"]["streams"] == (1 if name == "flux" else 2)
        whole, measured = model["explain"]["whole_model"], model["explain"]["measured_blocks"]
        assert whole["cache_points"] >= measured["cache_points"]
        assert (whole == measured) == (model["blocks"]["measured"] == model["blocks"]["model"])
        checks = model["correctness"]
        assert checks["full_vs_plain_ok"] is True and checks["full_vs_plain_max_rel_error"] < 1e-4
        assert checks["captured_vs_uncaptured_max_abs_diff"] == 0.0
        assert len(checks["full_steps"]) == 11  # speedup=2.5 of 28 steps
        assert 0 < checks["cached_vs_plain_rel_error_median"] < 1
        steps = model["step_ms"]
        for key in ("plain_full_ms", "full_ms", "cached_ms", "cached_uncaptured_ms"):
            assert steps[key] > 0
        rows = model["generations"]
        assert {(r["method"], r["steps"]) for r in rows} == {(m, n) for m in METHODS for n in (28, 50)}
        assert all(r["wall_ms"] > 0 for r in rows)
        budget = {r["steps"]: r["full_steps"] for r in rows if r["method"] == "ScalingCache (speedup=2.5)"}
        assert budget == {28: 11, 50: 20}
    assert set(result["targets"]) >= {
        "flux_cached_step_at_most_0.1pct_of_full_whole_model",
        "no_sync_in_cached_steps",
        "generation_speedup_at_least_0.95_of_ideal",
        "peak_memory_within_5pct_of_explain",
    }
    assert result["targets"]["no_sync_in_cached_steps"] is None  # CUDA only


def test_a_budget_that_runs_out_skips_the_remaining_parts_and_says_so(tmp_path):
    result = _run(tmp_path, "--budget", "3")
    assert result["errors"] == []
    reasons = [s["reason"] for s in result["skipped"]]
    assert reasons and all(r.startswith(("time budget", "interrupted")) for r in reasons)
    assert any(s["part"] == "wan: generations: peers" for s in result["skipped"])
    assert "generations" in result["models"]["flux"] and result["models"]["flux"]["generations"] == []
