"""The user-flow matrix (issue 21, item 9): the ways users run a compiled pipeline, crossed.

{FluxPipeline, WanPipeline} × {inference_mode, no_grad, plain call then inference_mode} × {the one
line, ``sc_compile.enable``, ``sc_compile.generation()``} × {report read inside the call (in the step
callback), outside it}. Every run must finish, report, and give the same output as every other run of
its model and clock (modes and report placement change nothing); the one line and ``enable`` give the
same outputs and full steps. Tiny random demo models, Dynamo's eager inner compiler, 6 steps.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import sc_compile
from sc_compile.demo.models import random_flux_demo, random_wan_demo

STEPS = 6
# A static interval: the short-schedule rule would cache nothing of a 6-step default schedule.
OPTIONS = {"compiler": "eager", "warmup_steps": 2, "static_interval": 2}
MODES = {
    "inference_mode": [torch.inference_mode],
    "no_grad": [torch.no_grad],
    "plain_then_inference": [contextlib.nullcontext, torch.inference_mode],
}


def _generate(model: str, pipe, embeddings, report_inside: bool) -> torch.Tensor:
    reports = []

    def read_report(pipe, i, t, kwargs):
        if i == STEPS // 2:
            reports.append(str(sc_compile.report(pipe.transformer)))
        return kwargs

    kwargs = dict(
        **embeddings.pipeline_kwargs([1, 7], guidance_scale=3.0),
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=read_report if report_inside else None,
    )
    if model == "flux":
        out = pipe(**kwargs, height=28, width=28).images
    else:
        out = pipe(**kwargs, height=32, width=32, num_frames=5).frames
    assert len(reports) == (1 if report_inside else 0)
    return out.clone()


def _run(model: str, how: str, mode: str, report_inside: bool, pipe, embeddings, compiled) -> list[torch.Tensor]:
    outputs = []
    for context in MODES[mode]:
        with context():
            if how == "generation":
                with sc_compile.generation(compiled, num_inference_steps=STEPS):
                    outputs.append(_generate(model, pipe, embeddings, report_inside))
            else:
                outputs.append(_generate(model, pipe, embeddings, report_inside))
        report = sc_compile.report(compiled)  # outside the mode
        expected_clock = "context" if how == "generation" else "pipeline"
        assert report.clock == expected_clock and report.finished and report.num_steps == STEPS, str(report)
        assert report.cached_steps and len(report.streams) == 2, str(report)
    return outputs


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_user_flows(model):
    demo = random_flux_demo if model == "flux" else random_wan_demo
    results: dict[str, list[torch.Tensor]] = {}
    full_steps: dict[str, tuple[int, ...]] = {}
    for how in ("one_line", "enable", "generation"):
        torch._dynamo.reset()
        pipe, embeddings = demo(seed=0)
        compiled = pipe.transformer = torch.compile(pipe.transformer, backend="scalingcache", options=OPTIONS)
        if how == "enable":
            sc_compile.enable(pipe)
        for mode in MODES:
            for report_inside in (False, True):
                outputs = _run(model, how, mode, report_inside, pipe, embeddings, compiled)
                results.setdefault(how, []).extend(outputs)
                full_steps.setdefault(how, sc_compile.report(compiled).full_steps)
                assert sc_compile.report(compiled).full_steps == full_steps[how]
        first = results[how][0]
        assert torch.isfinite(first).all()
        for other in results[how][1:]:
            torch.testing.assert_close(other, first, rtol=0, atol=0)
    torch.testing.assert_close(results["one_line"][0], results["enable"][0], rtol=0, atol=0)
    assert full_steps["one_line"] == full_steps["enable"]
