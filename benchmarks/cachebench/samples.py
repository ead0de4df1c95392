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

# The class-label samples the ablation scripts calibrate on (classes 0-4 x seeds 1000-1001), and the
# held-out ones they measure on: classes and seeds the calibration never saw (5.., 3000..), the same
# list in every script so that their figures (ours and the peers') are on the same samples.
CALIBRATION_SAMPLES = [(c, 1000 + s) for s in range(2) for c in range(5)]


# The seeds of the held-out samples every decision since issue 22 was measured on; a second set
# (another seed base) confirms a figure on noise no decision saw.
HELD_OUT_SEED = 3000


def held_out_samples(per_set: int, seed: int = HELD_OUT_SEED) -> list[tuple[int, int]]:
    """(class, seed) of the first ``per_set`` held-out samples: classes 5.., seeds ``seed``.."""
    return [(5 + c, seed + c) for c in range(per_set)]


def held_out_suffix(seed: int) -> str:
    """The part of a result file's name that says its held-out seeds ("" for the first set)."""
    return "" if seed == HELD_OUT_SEED else f"_seeds{seed}"


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
