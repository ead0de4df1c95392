"""The calibration's check of the fitted coefficients at more steps than calibrated (issue 22: a
50-step table at 100 and 200 steps): held out on the SD3 demo the mapped coefficients lost to α = 1
on the same full steps at 100 steps, on Flux they won. The calibration runs both on its rollout samples
at twice its step count and keeps α = 1 above the calibrated count only where it was better on every
sample (:class:`sc_compile.calibration.table.FinerGridCheck`)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import sc_compile
from sc_compile.calibration.collect import error_db, relative_error
from sc_compile.calibration.table import AlphaTable, FinerGridCheck
from sc_compile.decision.coefficients import make_predictor
from sc_compile.demo.models import random_flux_demo
from sc_compile.errors import AlphaTableError

STEPS = 8


def _sample(embeddings, label: int, steps: int = STEPS) -> dict:
    return {
        **embeddings.pipeline_kwargs([label]),
        "height": 28,
        "width": 28,
        "num_inference_steps": steps,
        "seed": label,
        "output_type": "pt",
    }


@pytest.fixture(scope="module")
def flux():
    pipe, embeddings = random_flux_demo(seed=0)
    pipe.set_progress_bar_config(disable=True)
    table = sc_compile.calibrate(pipe, [_sample(embeddings, label) for label in range(3)], progress=False)
    return pipe, embeddings, table


def _generate(pipe, call: dict, options: dict | None) -> tuple[torch.Tensor, object]:
    """``call`` through the pipeline: uncached (``options=None``) or compiled with ``options``."""
    torch._dynamo.reset()
    transformer = pipe.transformer
    kwargs = dict(call)
    generator = torch.Generator().manual_seed(kwargs.pop("seed"))
    if options is not None:
        pipe.transformer = torch.compile(transformer, backend="scalingcache", options={"compiler": "eager", **options})
    try:
        with torch.no_grad():
            images = pipe(**kwargs, generator=generator).images
    finally:
        pipe.transformer = transformer
    return images, (sc_compile.report(transformer) if options is not None else None)


def test_calibration_checks_its_coefficients_at_twice_its_steps_and_stores_what_it_measured(flux, tmp_path):
    pipe, embeddings, table = flux
    check = table.finer
    assert check is not None and check.num_steps == 2 * STEPS and len(check.table_errors) == 2
    plans = table.plans
    assert plans is not None
    # It ran what a 16-step generation runs by default (the stored default plan, mapped)...
    call = _sample(embeddings, 0, 2 * STEPS)
    uncached, _ = _generate(pipe, call, None)
    as_table = dataclasses.replace(table, finer=FinerGridCheck.assuming(2 * STEPS, ones_better=False))
    as_ones = dataclasses.replace(table, finer=FinerGridCheck.assuming(2 * STEPS, ones_better=True))
    measured = []
    for variant in (as_table, as_ones):
        images, report = _generate(pipe, call, {"alpha": variant})
        assert report.schedule.startswith("planned default"), report.schedule
        assert report.full_steps == check.full_steps, (report.full_steps, check.full_steps)
        measured.append(error_db([relative_error(images, uncached)]))
    # The dynamic rule there, with the coefficients the verdict chose (what the default runs where the
    # planned default is not within its error).
    verdict = as_ones if check.ones_better else as_table
    images, report = _generate(pipe, call, {"alpha": verdict, "schedule": "dynamic"})
    measured.append(error_db([relative_error(images, uncached)]))
    assert len(check.dynamic_errors) == 2 and check.dynamic_full_steps > 0
    # ... and stored the errors of the first rollout sample as measured (same seed, eager: to rounding).
    assert measured == pytest.approx([check.table_errors[0], check.ones_errors[0], check.dynamic_errors[0]], abs=1e-3)
    assert measured[0] != pytest.approx(measured[1], abs=1e-3), "the two sides must predict differently"
    # The verdict is the rule: α = 1 only where it was better on every rollout sample.
    assert check.ones_better == all(o < t for o, t in zip(check.ones_errors, check.table_errors, strict=True))
    # It survives a file; the table's repr says it was checked.
    path = tmp_path / "alpha.safetensors"
    table.save(path)
    assert AlphaTable.load(path).finer == check
    assert f"checked at {2 * STEPS} steps" in repr(table)


@pytest.mark.parametrize("ones_better", [True, False])
def test_above_the_calibrated_steps_the_verdict_picks_the_coefficients(flux, ones_better):
    """α = 1 (ratio 1 over normalised time) at more steps than calibrated where the check says so;
    the table's mapped coefficients otherwise; the calibrated step count and fewer steps never change."""
    _, _, table = flux
    checked = dataclasses.replace(table, finer=FinerGridCheck.assuming(2 * STEPS, ones_better=ones_better))
    bare = dataclasses.replace(table, finer=None)

    def coefs(t: AlphaTable, steps: int) -> list[tuple[float, ...]]:
        predictor = make_predictor(t, num_points=t.num_points, num_steps=steps, timestep_of=lambda s: None, fitted=True)
        return [predictor.cached_coef(tau, 2, 1) for tau in range(2, steps - 1) if predictor.allows_gap(tau, 1)]

    for steps in (STEPS, STEPS - 2):
        assert coefs(checked, steps) == coefs(bare, steps)
    for steps in (2 * STEPS, 3 * STEPS):
        got, mapped = coefs(checked, steps), coefs(bare, steps)
        assert got and len(got) == len(mapped)
        if ones_better:
            # Linear positions: a gap of 1 after a gap of 2 is half of it, whatever the step.
            assert all(c == pytest.approx((1.0,) * table.num_points) for c in got)
            assert got != mapped
        else:
            assert got == mapped


def test_above_the_calibrated_steps_the_planned_default_runs_only_within_the_dynamic_rules_error(flux):
    """The planned default met the dynamic rule's calibrated error at N; where the check found its mapped
    plan worse than the dynamic rule at 2N, the default above N is the dynamic rule, and the report says
    why. A budget still runs its stored plan."""
    pipe, embeddings, table = flux
    call = _sample(embeddings, 5, 2 * STEPS)
    worse = FinerGridCheck(2 * STEPS, (0, 1), (-20.0, -21.0), (-19.0, -19.0), dynamic_errors=(-25.0, -26.0))
    assert not worse.planned_default_kept and "so it is the default" in worse.describe()
    _, report = _generate(pipe, call, {"alpha": dataclasses.replace(table, finer=worse)})
    assert report.schedule.startswith("dynamic rule ε > δ (the default): above the table's calibrated"), report
    assert "found it did not (-20.5 dB against -25.5 dB)" in report.schedule
    _, report = _generate(pipe, call, {"alpha": dataclasses.replace(table, finer=worse), "full_steps": 8})
    assert report.num_full_steps == 8 and "end-to-end plan" in report.schedule
    within = dataclasses.replace(worse, dynamic_errors=(-20.0, -20.0))
    assert within.planned_default_kept and "the planned default stays the default" in within.describe()
    _, report = _generate(pipe, call, {"alpha": dataclasses.replace(table, finer=within)})
    assert report.schedule.startswith("planned default"), report.schedule
    with pytest.raises(AlphaTableError, match="one dynamic-rule error per rollout sample"):
        dataclasses.replace(worse, dynamic_errors=(-1.0,))


def test_the_report_says_which_coefficients_ran_above_the_calibrated_steps(flux):
    pipe, embeddings, table = flux
    ones = dataclasses.replace(
        table, finer=FinerGridCheck(2 * STEPS, (0, 1), table_errors=(-20.0, -21.0), ones_errors=(-22.0, -23.0))
    )
    _, report = _generate(pipe, _sample(embeddings, 5, 2 * STEPS), {"alpha": ones})
    assert report.coefficients.startswith(f"α = 1 at this {2 * STEPS}-step generation"), report.coefficients
    assert "table -20.5 dB, α = 1 -22.5 dB" in report.coefficients
    assert "  coefficients: α = 1" in str(report)
    kept = dataclasses.replace(ones, finer=dataclasses.replace(ones.finer, ones_errors=(-22.0, -20.0)))
    _, report = _generate(pipe, _sample(embeddings, 5, 2 * STEPS), {"alpha": kept})
    assert report.coefficients.startswith("the table's coefficients mapped"), report.coefficients
    _, report = _generate(pipe, _sample(embeddings, 5, STEPS), {"alpha": ones})
    assert report.coefficients == "" and "coefficients:" not in str(report)


def test_a_pipeline_that_cannot_run_the_finer_steps_keeps_the_calibration(flux, monkeypatch, caplog):
    """By default a pipeline that refuses twice the steps keeps its calibration, without the check and
    with a warning that says why; an explicit finer_steps it refuses is an error that says what to do."""
    pipe, embeddings, _ = flux
    original = type(pipe).__call__

    def at_most_eight_steps(self, *args, **kwargs):
        if kwargs.get("num_inference_steps", 0) > STEPS:
            raise ValueError(f"this pipeline runs at most {STEPS} steps")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", at_most_eight_steps)
    samples = [_sample(embeddings, label) for label in range(2)]
    with caplog.at_level("WARNING", logger="sc_compile.calibration.collect"):
        table = sc_compile.calibrate(pipe, samples, progress=False, plan_samples=1)
    assert table.plans is not None and table.finer is None
    assert any("did not run the samples at 16 steps" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match="finer_steps=20: the pipeline did not run the samples at 20 steps"):
        sc_compile.calibrate(pipe, samples, progress=False, plan_samples=1, finer_steps=20)


def test_finer_steps_is_checked_and_tables_without_a_check_mean_what_they_meant(flux, tmp_path):
    pipe, embeddings, table = flux
    samples = [_sample(embeddings, label) for label in range(2)]
    for bad in (-1, 1.5, True, "16"):
        with pytest.raises(ValueError, match="finer_steps must be an int"):
            sc_compile.calibrate(pipe, samples, progress=False, finer_steps=bad)
    with pytest.raises(ValueError, match="needs a pipeline and keyword-argument samples"):
        sc_compile.calibrate(pipe.transformer, [lambda model: None], progress=False, finer_steps=16)
    with pytest.raises(ValueError, match=f"must be more than the {STEPS} steps"):
        sc_compile.calibrate(pipe, samples, progress=False, finer_steps=STEPS)
    # Samples that leave the step count to the pipeline: refused after the first generation, not the last.
    undeclared = [{k: v for k, v in s.items() if k != "num_inference_steps"} for s in samples]
    calls = []
    original = type(pipe).__call__

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("num_inference_steps"))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe), "__call__", counted)
        with pytest.raises(ValueError, match="finer_steps=20 must be more than the 28 steps"):
            sc_compile.calibrate(pipe, undeclared, progress=False, finer_steps=20)
    assert calls == [None], calls
    with pytest.raises(ValueError, match="no plans are chosen at 3 steps"):
        sc_compile.calibrate(pipe, [dict(s, num_inference_steps=3) for s in samples], progress=False, finer_steps=9)
    with pytest.raises(ValueError, match="give their own timesteps / sigmas"):
        sigmas = [1.0 - i / STEPS for i in range(STEPS)]
        sc_compile.calibrate(pipe, [dict(s, sigmas=sigmas) for s in samples], progress=False, finer_steps=16)
    # By default such samples (their own schedule) are calibrated without the check, not refused.
    own = [dict(s, sigmas=sigmas) for s in samples]
    assert sc_compile.calibrate(pipe, own, progress=False, plan_samples=1).finer is None
    with pytest.raises(ValueError, match="plan_samples=0 stores no plans"):
        sc_compile.calibrate(pipe, samples, progress=False, finer_steps=16, plan_samples=0)
    assert sc_compile.calibrate(pipe, samples, progress=False, finer_steps=0, plan_samples=1).finer is None
    # A file without the check loads without one and maps the table's coefficients, as before.
    path = tmp_path / "unchecked.safetensors"
    dataclasses.replace(table, finer=None).save(path)
    assert AlphaTable.load(path).finer is None
    # A check that does not fit its table, or does not parse, is refused, saying what is wrong.
    with pytest.raises(AlphaTableError, match="calibrated at fewer steps"):
        dataclasses.replace(table, finer=FinerGridCheck.assuming(STEPS, ones_better=True))
    with pytest.raises(AlphaTableError, match="no fitted coefficients"):
        dataclasses.replace(table, fitted=None)
    with pytest.raises(AlphaTableError, match="one error per rollout sample"):
        FinerGridCheck(16, (0, 1), (-20.0,), ())
    with pytest.raises(AlphaTableError, match="finite"):
        FinerGridCheck(16, (0, 1), (float("nan"),), (-1.0,))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    table.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata["finer_check"] = json.dumps({"num_steps": 16})
    save_file(load_file(str(path)), str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(AlphaTableError, match="unreadable finer-grid check"):
        AlphaTable.load(tmp_path / "broken.safetensors")
