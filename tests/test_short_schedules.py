"""Short schedules (issue 21 item 4): at 8 steps or fewer the default schedule caches nothing, unless
the α table was calibrated at that step count; a table that cannot serve a step count is used for
what it serves (nothing) with one warning, never a crash in the middle of a pipeline call; the
report says why each step ran in full."""

from __future__ import annotations

import logging
import types

import pytest
import torch

import sc_compile
from sc_compile.config import ScalingCacheConfig
from sc_compile.decision.coefficients import SHORT_SCHEDULE_STEPS
from sc_compile.decision.decisions import Decisions

from dummy_dit import DummyDiT


def _generate(compiled: torch.nn.Module, steps: int) -> None:
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=steps):
        for step in range(steps):
            compiled(torch.ones(1, 4, 8) * float((steps - step) ** 2), torch.tensor([1000.0 - 100.0 * step]))


@pytest.mark.parametrize("steps", [3, SHORT_SCHEDULE_STEPS])
def test_the_default_caches_nothing_at_a_short_schedule_and_says_why(steps, caplog):
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"):
        _generate(compiled, steps)
    report = sc_compile.report(model)
    assert report.full_steps == tuple(range(steps)) and not report.cached_steps, str(report)
    assert report.streams[0].reasons[2:] == ("short schedule",) * (steps - 2), str(report)
    assert sum("caches nothing at 8 steps or fewer" in r.message for r in caplog.records) == 1


def test_above_the_limit_and_with_an_explicit_schedule_short_generations_cache():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    _generate(compiled, SHORT_SCHEDULE_STEPS + 2)
    assert sc_compile.report(model).cached_steps
    torch._dynamo.reset()
    for options in ({"static_interval": 2}, {"full_steps": 4}):
        compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", **options})
        _generate(compiled, 6)
        report = sc_compile.report(model)
        assert report.cached_steps and "short schedule" not in report.streams[0].reasons, (options, str(report))
        torch._dynamo.reset()


def _decisions(alpha, num_steps: int) -> Decisions:
    return Decisions(
        config=ScalingCacheConfig(),
        num_points=1,
        feeds_output=[True],
        alpha=alpha,
        num_steps=num_steps,
        read_stats=lambda streams: [],
        warn=lambda *args: None,
    )


def test_a_table_calibrated_at_the_short_step_count_decides_itself():
    # The table's own fitted gaps say what is safe at its step count: the short rule stands aside.
    calibrated_here = types.SimpleNamespace(num_steps=6, fitted=None)
    assert _decisions(calibrated_here, 6)._cache_off_reason() is None
    assert _decisions(types.SimpleNamespace(num_steps=28, fitted=None), 6)._cache_off_reason() == "short schedule"
    assert _decisions(None, 6)._cache_off_reason() == "short schedule"
    assert _decisions(None, SHORT_SCHEDULE_STEPS + 1)._cache_off_reason() is None


def test_a_table_that_serves_no_gap_at_a_step_count_runs_full_with_a_warning(caplog):
    # The shipped 28-step demo table serves no gap of a 3-step generation (one step spans 9.3 of its
    # steps): formerly an AlphaTableError at the first call, now every step full and the reason.
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2}
    )
    sc_compile.enable(pipe)
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        images = pipe(
            **embeddings.pipeline_kwargs([1]),
            height=28,
            width=28,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    assert torch.isfinite(images).all()
    report = sc_compile.report(transformer)
    assert "shipped" in report.alpha_source or "alpha" in report.alpha_source.lower(), report.alpha_source
    assert report.full_steps == (0, 1, 2) and report.streams[0].reasons[2] == "α table serves no gap", str(report)
    assert any("so no step could be cached" in r.message for r in caplog.records)
