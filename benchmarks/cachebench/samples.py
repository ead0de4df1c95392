"""One sample at a time through a pipeline, uncached or with ScalingCache (eager inner compiler):
what the ablation scripts (``ablations.py``, ``calibration_ablation.py``) run.

A sample is one pipeline call's keyword arguments with its ``seed`` (the form
``sc_compile.calibrate`` takes); its images are [N, C, H, W] in [0, 1], video frames folded into N.
"""

from __future__ import annotations

from typing import Any

import torch

import sc_compile

from .workloads import as_images


def sample_call(
    embeddings: Any, size: dict[str, int], label: int, seed: int, steps: int, guidance: float
) -> dict[str, Any]:
    """The pipeline call of one class-label sample, guidance as separate cond / uncond calls."""
    return {
        **embeddings.pipeline_kwargs([label], guidance_scale=guidance),
        **size,
        "num_inference_steps": steps,
        "seed": seed,
        "output_type": "pt",
    }


def generate(pipe: Any, call: dict[str, Any]) -> torch.Tensor:
    """The sample's images, its noise drawn from a generator seeded with ``call["seed"]``."""
    kwargs = dict(call)
    generator = torch.Generator().manual_seed(kwargs.pop("seed"))
    with torch.no_grad():
        return as_images(pipe(**kwargs, generator=generator))


def generate_cached(pipe: Any, call: dict[str, Any], options: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The sample through ``backend="scalingcache"`` with ``options`` (inner compiler "eager", the
    step count declared unless ``options`` say otherwise), on a fresh Dynamo state; ``(images,
    report)``. The pipeline's own transformer is put back, also when the generation raises."""
    transformer = pipe.transformer
    torch._dynamo.reset()
    pipe.transformer = torch.compile(
        transformer,
        backend="scalingcache",
        options={"compiler": "eager", "num_inference_steps": call["num_inference_steps"], **options},
    )
    try:
        images = generate(pipe, call)
    finally:
        pipe.transformer = transformer
    return images, sc_compile.report(transformer)
