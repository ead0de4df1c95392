"""The one line gets the pipeline clock (issue 21, items 1, 3, 7).

``torch.compile(pipe.transformer, backend="scalingcache")`` and nothing else: a call of the
compiled model from inside a ``diffusers.DiffusionPipeline``'s ``__call__`` adopts that call as a
pipeline generation (steps from the scheduler, streams from ``cache_context``, callbacks on scratch
state, stochastic samplers refused) and enables the pipeline for its next calls. ``LoopDiffusion`` is
a minimal ``DiffusionPipeline`` around the exact-arithmetic dummy DiT (named guidance streams, a
step callback, an optional second expert); every one-line run is compared with the same run under
``sc_compile.enable`` (equal outputs and full steps) or with its uncached value.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from diffusers.models.cache_utils import CacheMixin

import sc_compile
from sc_compile.runtime.dispatch import StochasticSamplerError

from dummy_dit import DummyDiT, output_scale

EAGER = {"compiler": "eager", "warmup_steps": 3, "alpha": "ones"}


class NamedDiT(DummyDiT, CacheMixin):
    """The dummy DiT with diffusers' ``cache_context`` (streams named by the pipeline)."""


class LoopDiffusion(DiffusionPipeline):
    """A diffusers pipeline: ``set_timesteps``, a loop of named calls and ``scheduler.step``, a step
    callback, and (with ``transformer_2``) a second expert for the steps after ``boundary``."""

    def __init__(self, transformer, scheduler, transformer_2=None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, transformer_2=transformer_2)

    @torch.no_grad()
    def __call__(
        self, latents, num_inference_steps, guidance=False, callback_on_step_end=None, boundary=None, generator=None
    ):
        self.scheduler.set_timesteps(num_inference_steps)
        outputs = []
        for i, t in enumerate(self.scheduler.timesteps):
            model = self.transformer_2 if boundary is not None and i >= boundary else self.transformer
            timestep = t.expand(latents.shape[0])
            with model.cache_context("cond"):
                out = model(latents, timestep)
            if guidance:
                with model.cache_context("uncond"):
                    out = 0.5 * (out + model(latents * 2.0, timestep))
            outputs.append(out)
            latents = self.scheduler.step(
                out / output_scale() - latents, t, latents, generator=generator, return_dict=False
            )[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})
        return torch.stack(outputs), latents


def _latents(seed=0):
    return torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed)) + 3.0


def _compiled(**options):
    model = NamedDiT()
    return model, torch.compile(model, backend="scalingcache", options={**EAGER, **options})


def _equal(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _enabled_reference(steps=12, **kwargs):
    model, compiled = _compiled()
    pipe = sc_compile.enable(LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler()))
    result = pipe(_latents(), steps, **kwargs)
    return result, sc_compile.report(model)


@pytest.mark.parametrize("guidance", [False, True], ids=["one_stream", "guidance"])
def test_one_line_adopts_the_running_pipeline_call_as_enable_would(guidance):
    reference, expected = _enabled_reference(guidance=guidance)
    model, compiled = _compiled()
    pipe = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler())
    first = pipe(_latents(), 12, guidance=guidance)  # the call that compiles is adopted
    adopted = sc_compile.report(model)
    second = pipe(_latents(), 12, guidance=guidance)  # now through the enabled pipeline
    _equal(first, reference)
    _equal(second, reference)
    assert adopted.clock == "pipeline" and adopted.finished and adopted.num_steps == 12, str(adopted)
    assert adopted.full_steps == expected.full_steps and adopted.cached_steps, str(adopted)
    assert len(adopted.streams) == len(expected.streams) == (2 if guidance else 1)
    for ours, theirs in zip(adopted.streams, expected.streams, strict=True):
        assert ours.full_steps == theirs.full_steps and ours.cached_steps == theirs.cached_steps
    assert sc_compile.report(model).full_steps == expected.full_steps


def test_a_hand_written_loop_keeps_the_timestep_clock():
    model, compiled = _compiled()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(8)
    latents = _latents()
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(compiled(latents, t.expand(1)) / output_scale() - latents, t, latents)[0]
    assert sc_compile.report(model).clock == "timestep"


def test_disable_stops_the_adoption_of_that_pipeline():
    model, compiled = _compiled()
    pipe = sc_compile.disable(LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler()))
    pipe(_latents(), 8)
    assert sc_compile.report(model).clock == "timestep"
    assert not getattr(type(pipe), "_sc_compile_enabled", False)
    sc_compile.enable(pipe)  # enable allows it again
    pipe(_latents(), 8)
    assert sc_compile.report(model).clock == "pipeline"


def test_a_preview_in_the_step_callback_runs_on_scratch_state():
    reference, expected = _enabled_reference()
    model, compiled = _compiled()
    previews = []

    def preview(pipe, i, t, kwargs):
        latents = kwargs["latents"].clone()
        previews.append((latents, pipe.transformer(latents, torch.tensor([500.0]))))
        return kwargs

    result = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler())(_latents(), 12, callback_on_step_end=preview)
    _equal(result, reference)
    for latents, out in previews:  # each preview is the model's own (uncached) output
        torch.testing.assert_close(out, model(latents, torch.tensor([500.0])), rtol=0, atol=0)
    report = sc_compile.report(model)
    assert report.full_steps == expected.full_steps and report.num_calls == 12 and len(previews) == 12


def test_an_interrupted_adopted_call_ends_and_the_next_call_starts_fresh():
    reference, _ = _enabled_reference(steps=8)

    def interrupt(pipe, i, t, kwargs):
        if i == 5:
            raise KeyboardInterrupt
        return kwargs

    model, compiled = _compiled()
    pipe = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(KeyboardInterrupt):
        pipe(_latents(), 12, callback_on_step_end=interrupt)
    # A hand-written loop after it: the adopted generation does not take its calls.
    with torch.no_grad():
        compiled(_latents(), torch.tensor([900.0]))
    assert sc_compile.report(model).clock == "timestep" and sc_compile.report(model).num_steps == 1
    _equal(pipe(_latents(), 8), reference)
    assert sc_compile.report(model).num_steps == 8


def test_an_interrupted_adopted_call_then_an_explicit_generation():
    model, compiled = _compiled()

    def interrupt(pipe, i, t, kwargs):
        if i == 2:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler())(_latents(), 12, callback_on_step_end=interrupt)
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=2):
        compiled(_latents(), torch.tensor([900.0]))
        compiled(_latents(), torch.tensor([800.0]))
    assert sc_compile.report(model).clock == "context"


def test_a_call_after_the_last_scheduler_step_runs_in_full_outside_the_generation():
    class WithRefinement(LoopDiffusion):
        def __call__(self, latents, num_inference_steps):
            outputs, latents = super().__call__(latents, num_inference_steps)
            with torch.no_grad():
                return outputs, latents, self.transformer(latents, torch.tensor([1.0]))

    reference, expected = _enabled_reference()
    model, compiled = _compiled()
    outputs, latents, refined = WithRefinement(compiled, FlowMatchEulerDiscreteScheduler())(_latents(), 12)
    _equal((outputs, latents), reference)
    torch.testing.assert_close(refined, model(latents, torch.tensor([1.0])), rtol=0, atol=0)
    report = sc_compile.report(model)
    assert report.num_calls == 12 and report.full_steps == expected.full_steps


def test_a_stochastic_sampler_under_the_one_line_is_refused_with_the_fix():
    _, compiled = _compiled()
    pipe = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    with pytest.raises(StochasticSamplerError, match="stochastic_sampling=False"):
        pipe(_latents(), 12, generator=torch.Generator().manual_seed(0))


# -- item 7: two experts ----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["one_line", "enable"])
def test_two_experts_each_report_the_steps_they_ran(how, caplog):
    first, compiled = _compiled()
    second, compiled_2 = _compiled()
    second.load_state_dict(first.state_dict())
    pipe = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler(), transformer_2=compiled_2)
    if how == "enable":
        sc_compile.enable(pipe)
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"):
        experts = pipe(_latents(), 16, boundary=6)
    high, low = sc_compile.report(first), sc_compile.report(second)
    assert set(high.full_steps) | set(high.cached_steps) == set(range(6)), str(high)
    assert set(low.full_steps) | set(low.cached_steps) == set(range(6, 16)), str(low)
    assert low.steps_run == 10 and high.steps_run == 6, (str(high), str(low))
    assert "      " in str(low).split("\n")[1]  # the steps another expert ran are blank, not cached
    assert low.speedup == 10 / low.num_full_steps and low.cached_steps
    assert not [r for r in caplog.records if "declared steps" in r.getMessage()]
    # The same module as both experts is one generation of all the steps.
    model, compiled = _compiled()
    single = LoopDiffusion(compiled, FlowMatchEulerDiscreteScheduler(), transformer_2=compiled)
    if how == "enable":
        sc_compile.enable(single)
    _equal(single(_latents(), 16, boundary=6), _enabled_reference(steps=16)[0])
    assert sc_compile.report(model).num_steps == 16
    assert experts[0].shape == (16, 1, 4, 8)


# -- item 3: a solver that calls the model twice per step ------------------------------------------
@pytest.mark.parametrize("guidance", [False, True], ids=["one_stream", "guidance"])
def test_heun_sub_steps_are_streams_of_their_own(guidance):
    model, compiled = _compiled(warmup_steps=2, static_interval=2)  # 8 steps: a short schedule
    pipe = LoopDiffusion(compiled, FlowMatchHeunDiscreteScheduler())
    pipe(_latents(), 8, guidance=guidance)
    report = sc_compile.report(model)
    # 8 steps: 15 model calls (the last step has no corrector), each sub-step a stream.
    assert report.clock == "pipeline" and report.num_steps == 8, str(report)
    assert len(report.streams) == (4 if guidance else 2) and report.num_calls == (30 if guidance else 15)
    predictor, corrector = report.streams[0], report.streams[-1]
    assert set(predictor.full_steps) | set(predictor.cached_steps) == set(range(8))
    assert set(corrector.full_steps) | set(corrector.cached_steps) == set(range(7))
    assert report.cached_steps, str(report)


# -- the target: host reads and full steps of a 16-step FluxPipeline call ---------------------------
def _flux_images(pipe, embeddings, steps=16):
    return pipe(
        **embeddings.pipeline_kwargs([1, 7], guidance_scale=3.0),
        height=28,
        width=28,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def _host_reads(monkeypatch, run) -> int:
    """Device→host reads during ``run``: every way Python reads a tensor's values (the reads
    ``tests/test_host_reads.py`` counts; its constructor counting is left out: Dynamo guards on
    patched torch functions and would recompile the model). Everything is host memory on the CPU, so
    two kinds of read a GPU run does not sync on are left out: the α table's arithmetic
    (``sc_compile/decision/coefficients.py``; tables are held on the CPU) and reading the result of
    ``.cpu()`` (the copy was the read)."""
    import sys
    import weakref

    from test_host_reads import READS

    reads = [0]
    copies: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def counting(original, name):
        def wrapped(tensor, *args, **kwargs):
            host_table = sys._getframe(1).f_code.co_filename.endswith("decision/coefficients.py")
            if not host_table and tensor not in copies:
                reads[0] += 1
            out = original(tensor, *args, **kwargs)
            if name == "cpu":
                copies.add(out)
            return out

        return wrapped

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), name))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run()
    monkeypatch.undo()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the count recompiled the model"
    return reads[0]


def test_flux_pipeline_one_line_host_reads_and_full_steps(monkeypatch):
    """Every host read of a whole FluxPipeline call (the pipeline's own included), counted for plain
    ``torch.compile``, the one line (the adopted first call of a pipeline, then its next call) and
    ``enable``; each after a call that compiled. Printed: ``pytest -s -k host_reads tests/test_one_line.py``."""
    from sc_compile.demo.models import build_flux_pipeline, random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    model = pipe.transformer
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager"})
    _flux_images(build_flux_pipeline(compiled), embeddings)  # compiles
    fresh = build_flux_pipeline(compiled)
    images: dict[str, torch.Tensor] = {}

    def run(name, target):
        images[name] = _flux_images(target, embeddings)

    one_line = _host_reads(monkeypatch, lambda: run("one line", fresh))
    one_line_report = sc_compile.report(model)
    one_line_next = _host_reads(monkeypatch, lambda: run("one line, next call", fresh))
    enabled = sc_compile.enable(build_flux_pipeline(compiled))
    enable_reads = _host_reads(monkeypatch, lambda: run("enable", enabled))
    enable_report = sc_compile.report(model)
    full = one_line_report.num_full_steps
    from sc_compile.runtime.dispatch import latest_runtime

    table = latest_runtime(model).alpha
    assert table is not None and table.fitted is not None and table.fitted.coef.device.type == "cpu"
    torch._dynamo.reset()  # Dynamo would run the graphs compiled above for the same forward
    plain_pipe, _ = random_flux_demo(seed=0)
    plain_pipe.transformer = torch.compile(plain_pipe.transformer, backend="eager")
    _flux_images(plain_pipe, embeddings)
    plain = _host_reads(monkeypatch, lambda: _flux_images(plain_pipe, embeddings))
    print(
        f"\n16-step FluxPipeline call, host reads: plain torch.compile {plain}, one line {one_line} "
        f"(+{one_line - plain}; next call {one_line_next}), enable {enable_reads} (+{enable_reads - plain}); "
        f"full steps: one line {full} {one_line_report.full_steps}, enable {enable_report.num_full_steps} "
        f"{enable_report.full_steps}"
    )
    assert one_line_report.clock == "pipeline" and one_line_report.num_steps == 16
    assert one_line - plain <= full and one_line_next - plain <= full
    assert one_line_report.full_steps == enable_report.full_steps and one_line_report.cached_steps
    torch.testing.assert_close(images["one line"], images["enable"], rtol=0, atol=0)
    torch.testing.assert_close(images["one line, next call"], images["enable"], rtol=0, atol=0)


def _wan_experts(first, second, enabled: bool, steps: int = 8):
    from diffusers import WanPipeline

    from sc_compile.demo.models import random_wan_demo

    base, embeddings = random_wan_demo(seed=0)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=first,
        transformer_2=second,
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    if enabled:
        sc_compile.enable(pipe)
    return pipe(
        **embeddings.pipeline_kwargs([1, 7], guidance_scale=3.0),
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


@pytest.mark.parametrize("enabled", [False, True], ids=["one_line", "enable"])
def test_wan_pipeline_with_two_experts(enabled, caplog):
    from sc_compile.demo.models import random_wan_demo

    options = {"compiler": "eager", "warmup_steps": 2, "static_interval": 2}  # 8 steps: a short schedule
    high = random_wan_demo(seed=0)[0].transformer
    low = random_wan_demo(seed=1)[0].transformer
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"):
        frames = _wan_experts(
            torch.compile(high, backend="scalingcache", options=options),
            torch.compile(low, backend="scalingcache", options=options),
            enabled,
        )
    first, second = sc_compile.report(high), sc_compile.report(low)
    ran_first = set(first.full_steps) | set(first.cached_steps)
    ran_second = set(second.full_steps) | set(second.cached_steps)
    assert ran_first and ran_second and not ran_first & ran_second, (str(first), str(second))
    assert ran_first | ran_second == set(range(8)) and first.clock == second.clock == "pipeline"
    assert second.steps_run == len(ran_second) < second.num_steps and "run by another model" in str(second)
    assert not [r for r in caplog.records if "declared steps" in r.getMessage()]
    assert torch.isfinite(frames).all()
    # One module as both experts: one generation of every step.
    torch._dynamo.reset()
    same = torch.compile(high, backend="scalingcache", options=options)
    _wan_experts(same, same, enabled)
    report = sc_compile.report(high)
    assert report.num_steps == report.steps_run == 8 and report.cached_steps, str(report)


# -- what the timestep clock refused, the one line now runs ------------------------------------------
def test_a_split_forward_whose_blocks_never_see_the_timestep_runs_under_the_one_line():
    from test_graph_breaks import BreakAfterTimestepEmbedding

    class NamedBreak(BreakAfterTimestepEmbedding, CacheMixin):
        pass

    results, reports = [], []
    for enabled in (True, False):
        torch._dynamo.reset()
        model = NamedBreak()
        pipe = LoopDiffusion(
            torch.compile(model, backend="scalingcache", options=EAGER), FlowMatchEulerDiscreteScheduler()
        )
        if enabled:
            sc_compile.enable(pipe)
        results.append(pipe(_latents(), 10, guidance=True))
        reports.append(sc_compile.report(model))
    _equal(results[0], results[1])
    assert reports[1].clock == "pipeline" and reports[1].cached_steps
    assert reports[0].full_steps == reports[1].full_steps


def test_bf16_flux_with_a_negative_prompt_runs_under_the_one_line():
    """Cond and uncond calls share one bfloat16 timestep: the timestep clock cannot tell the next
    step from the second guidance call and refused; the pipeline clock places both exactly."""
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0, dtype=torch.bfloat16)
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    images = _flux_images(pipe, embeddings, steps=10)
    report = sc_compile.report(model)
    assert report.clock == "pipeline" and report.num_steps == 10 and len(report.streams) == 2, str(report)
    assert report.cached_steps and torch.isfinite(images).all()
