"""The peer benchmark's plan and rendering (``benchmarks/cachebench``), without running a model:
which configurations a command line asks for, how a peer is paired with our runs, and that a
results JSON re-renders to the same JSON."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/run.py` has it

from cachebench import cli, measurements, peers, rendering  # noqa: E402

FLUX_MODULES = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
WAN_MODULES = ["blocks.0.attn1", "blocks.0.attn2"]


def plan(
    *argv: str, modules: list[str] = FLUX_MODULES, mag_ratios: tuple[float, ...] | None = (1.0,)
) -> list[peers.Method]:
    _, settings = cli.parse_args(list(argv))
    return peers.configurations(settings, modules, None if mag_ratios is None else list(mag_ratios))


def test_quick_plan_runs_each_method_once_eager():
    configs = plan("--quick")
    assert [c.key for c in configs] == [
        "uncached|eager",
        "uncached|compiled (eager)",
        "ScalingCache S=3|eager inner",
        "FirstBlockCache thr=0.2|eager",
        "TaylorSeerCache interval=2|eager",
        "TaylorSeerCache lite interval=2|eager",
        "MagCache thr=0.1|eager",
        "PyramidAttentionBroadcast skip=2|eager",
        "FasterCache skip=2|eager",
        "SeaCache thr=0.25|eager",
        "cache-dit DBCache F1B0 rdt=0.3|eager",
        "cache-dit DBCache+TaylorSeer F1B0 rdt=0.3|eager",
    ]
    assert [c.kind for c in configs[:3]] == ["uncached", "uncached", "ours"]


def test_default_plan_compiles_the_middle_point_of_each_sweep_with_its_eager_twin():
    configs = plan()
    keys = {c.key for c in configs}
    assert len(keys) == len(configs) == 63
    compiled = [c for c in configs if c.kind == "peer" and c.variant != "eager"]
    # one per sweep, SeaCache never (fail-open on Flux: nothing to compare compiled)
    assert [c.name for c in compiled] == [
        "FirstBlockCache thr=0.2",
        "TaylorSeerCache interval=4",
        "TaylorSeerCache lite interval=3",
        "MagCache thr=0.12",
        "PyramidAttentionBroadcast skip=3",
        "FasterCache skip=2",
        "cache-dit DBCache F1B0 rdt=0.3",
        "cache-dit DBCache+TaylorSeer F1B0 rdt=0.16",
    ]
    assert all(c.variant == "inductor" and c.twin in keys for c in compiled)
    ours = [c for c in configs if c.kind == "ours"]
    assert {c.label for c in ours} == {
        "ScalingCache",
        "ScalingCache static",
        "ScalingCache residual",
        "ScalingCache module",
    }
    static = next(c for c in ours if c.label == "ScalingCache static")
    assert (static.name, static.param, static.warmup_steps) == ("ScalingCache static k=2", "S=4 k=2", 4)


def test_plan_options():
    # a budget per inner compiler; --only keeps the uncached references
    budget = [c for c in plan("--budgets", "13", "--only", "budget") if c.kind != "uncached"]
    assert [(c.key, c.full_steps, c.warmup_steps) for c in budget] == [
        ("ScalingCache budget B=13|inductor", 13, None),
        ("ScalingCache budget B=13|eager inner", 13, None),
    ]
    assert [c.kind for c in plan("--only", "nothing matches")] == ["uncached", "uncached"]
    # MagCache leaves the plan when its calibration failed
    assert not [c for c in plan(mag_ratios=None) if isinstance(c, peers.MagCache)]
    # TaylorSeer's hook pattern on Wan's numbered attention modules (diffusers' default hooks nothing)
    wan = [c for c in plan("--model", "demo-wan", modules=WAN_MODULES) if type(c) is peers.TaylorSeerCache]
    assert {c.cache_identifiers for c in wan} == {(r"^blocks\.\d+\.attn\d+$",)}
    assert {c.cache_identifiers for c in plan() if type(c) is peers.TaylorSeerCache} == {None}


@pytest.mark.parametrize(
    "argv",
    [["--no-such-option"], ["--warmups", "2,x"], ["--compile-peers", "some"], ["--samples", "3", "--batch", "2"]],
)
def test_cli_refuses(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def row(name: str, kind: str, variant: str, full: float, psnr: float, method: str | None = None) -> dict:
    result = measurements.Result(
        name,
        method or name.rsplit(" ", 1)[0],
        name.rsplit(" ", 1)[1],
        variant,
        kind,
        calls_per_gen=20,
        full_evals_per_gen=full,
        macs_frac=full / 20,
        psnr=psnr,
    )
    return dataclasses.asdict(result)


def test_matched_pairs_the_best_of_ours_at_no_more_full_evaluations():
    ours = [
        row("ScalingCache S=2", "ours", "eager inner", 10, 40.0),
        row("ScalingCache S=4", "ours", "eager inner", 12, 45.0),
        row("ScalingCache S=8", "ours", "eager inner", 16, 50.0),
        row("ScalingCache S=4", "ours", "inductor", 12, 45.0),
    ]
    lines = rendering.matched(
        ours
        + [
            row("Peer a", "peer", "eager", 13, 41.0),
            row("Peer b", "peer", "eager", 8, 30.0),
            row("Peer c", "peer", "eager", 20, 30.0),
        ]
    )
    table = [line for line in lines if line.startswith("| Peer")]
    # a: S=4 (12 ≤ 13, best PSNR among those); b: every run of ours costs more, the cheapest (S=2)
    assert [cells.split(" | ")[8] for cells in table] == ["dynamic S=4 (eager inner)", "dynamic S=2 (eager inner)"]
    assert [cells.split(" | ")[-1] for cells in table] == ["+4.0 |", "+10.0 |"]
    assert lines[-1] == "Cached nothing at these settings (every call full): Peer c (eager)."


@pytest.mark.parametrize("name", ["results", "results_demo_wan"])
def test_rerender_keeps_the_committed_json(name, tmp_path):
    committed = BENCHMARKS / "results" / f"{name}.json"
    copy = tmp_path / f"{name}.json"
    copy.write_text(committed.read_text())
    data = json.loads(committed.read_text())
    time_stat = data["setup"]["time_stat"]
    # The plot needs matplotlib (the bench extra); without it the failure is reported and the
    # JSON and the tables, what this test checks, are still written.
    assert cli.rerender(copy, time_stat) == 0
    assert json.loads(copy.read_text()) == data
    assert (tmp_path / f"{name}.md").read_text().startswith("# Cache benchmark")
