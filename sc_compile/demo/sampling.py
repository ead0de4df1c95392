"""Samples from the demo pipelines at their size (what ``sc-compile demo`` and calibration run)."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate(
    pipe: Any,
    emb: Any,
    labels: Any,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    seed: int = 0,
) -> torch.Tensor:
    """Samples for ``labels`` at the demo size: images ``[N, 1, 28, 28]`` (Flux, SD3) or clips
    ``[N, F, 1, 32, 32]`` (Wan), float in [0, 1], on the CPU."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    # a CPU generator: randn_tensor draws on the CPU, so results match across devices
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kw = emb.pipeline_kwargs(labels, guidance_scale=guidance_scale)
    size = demo_size(pipe)
    if isinstance(pipe, WanPipeline):
        out = pipe(**kw, **size, num_inference_steps=num_inference_steps, generator=gen, output_type="pt").frames
    else:
        out = pipe(**kw, **size, num_inference_steps=num_inference_steps, generator=gen, output_type="pt").images
    return out.float().cpu()


def demo_size(pipe_or_class_name: Any) -> dict[str, int]:
    """Generation size of the demo pipelines, for a pipeline or a transformer class name."""
    from sc_compile.demo.models import FLUX_IMAGE_SIZE, SD3_IMAGE_SIZE, WAN_FRAME_SIZE, WAN_NUM_FRAMES

    if isinstance(pipe_or_class_name, str):
        name = pipe_or_class_name
    else:  # the transformer may be wrapped by torch.compile
        transformer = pipe_or_class_name.transformer
        name = type(getattr(transformer, "_orig_mod", transformer)).__name__
    if name == "WanTransformer3DModel":
        return {"height": WAN_FRAME_SIZE, "width": WAN_FRAME_SIZE, "num_frames": WAN_NUM_FRAMES}
    if name == "SD3Transformer2DModel":
        return {"height": SD3_IMAGE_SIZE, "width": SD3_IMAGE_SIZE}
    return {"height": FLUX_IMAGE_SIZE, "width": FLUX_IMAGE_SIZE}
