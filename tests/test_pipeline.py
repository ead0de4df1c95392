"""A real diffusers FluxPipeline runs unchanged with the compiled transformer."""

from __future__ import annotations

import pytest
import torch

import sc_compile
from sc_compile.demo.models import random_flux_demo

STEPS = 12


def _generate(pipe, embeddings, labels, guidance_scale=1.0, seed=0, steps=STEPS):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(
            **embeddings.pipeline_kwargs(labels, guidance_scale=guidance_scale),
            height=28,
            width=28,
            num_inference_steps=steps,
            generator=generator,
            output_type="pt",
        ).images


@pytest.fixture
def flux_pipeline():
    pipe, embeddings = random_flux_demo(seed=0)
    return pipe, embeddings


def test_pipeline_generations_without_recompiles(flux_pipeline):
    pipe, embeddings = flux_pipeline
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "aot_eager", "warmup_steps": 3}
    )
    counters = torch._dynamo.utils.counters
    counters.clear()
    first = _generate(pipe, embeddings, [1, 7])
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = _generate(pipe, embeddings, [1, 7])
        report_plain = sc_compile.report(transformer)
        guided = _generate(pipe, embeddings, [1, 7], guidance_scale=3.0)
        report_guided = sc_compile.report(pipe.transformer)
    # One Dynamo graph for all three generations.
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(first, second)  # each generation starts from a fresh schedule and state
    assert first.shape == (2, 1, 28, 28)
    assert report_plain.num_steps == STEPS and len(report_plain.streams) == 1
    assert report_plain.cached_steps, str(report_plain)
    assert report_plain.full_steps[:3] == (0, 1, 2)
    # Guidance as separate calls: two streams, one shared decision per step.
    assert report_guided.num_steps == STEPS and len(report_guided.streams) == 2
    assert report_guided.streams[0].full_steps == report_guided.streams[1].full_steps
    assert report_guided.cached_steps
    assert torch.isfinite(guided).all()


def test_cached_generation_is_close_to_the_uncached_one(flux_pipeline):
    pipe, embeddings = flux_pipeline
    transformer = pipe.transformer
    reference = _generate(pipe, embeddings, [3])
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3}
    )
    cached = _generate(pipe, embeddings, [3])
    assert sc_compile.report(transformer).cached_steps
    mse = torch.mean((cached - reference) ** 2).item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    # Random weights: every policy is close (the trained-model demo measures real fidelity).
    assert psnr > 30, psnr


def test_generation_context_scales_warmup_and_forces_final_steps(flux_pipeline):
    pipe, embeddings = flux_pipeline
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "eager", "final_full_steps": 2}
    )
    with sc_compile.generation(transformer, num_inference_steps=STEPS):
        _generate(pipe, embeddings, [2])
    report = sc_compile.report(transformer)
    assert report.finished
    assert report.warmup_steps == 2  # 10 at 50 steps, scaled to 12 steps
    assert {STEPS - 2, STEPS - 1} <= set(report.full_steps)


def test_report_names_the_pipeline_streams_and_the_shipped_table():
    """Under sc_compile.enable the streams carry the pipeline's cache_context names (cond, uncond);
    the α line says the shipped table was used, without a command or a source-tree path."""
    pipe, embeddings = random_flux_demo(seed=0)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="scalingcache", options={"compiler": "eager"})
    sc_compile.enable(pipe)
    _generate(pipe, embeddings, [1], guidance_scale=3.0, steps=8)
    report = sc_compile.report(transformer)
    assert [stream.name for stream in report.streams] == ["cond", "uncond"], report
    text = str(report)
    assert "streams:  2 (cond, uncond), one decision per step for all" in text, text
    assert "ē cond" in text and "ē uncond" in text, text
    assert "the table shipped with sc_compile for FluxTransformer2DModel (28 steps" in report.alpha_source, text
    assert "python -m" not in text and "assets/" not in text, text
