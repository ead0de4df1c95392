"""The models the benchmark runs: a transformer, the real diffusers pipeline around it, and how to
call it for a batch of class labels.

* ``demo-flux``: the shipped trained Flux demo (``assets/demo_flux``) through ``FluxPipeline``,
  guidance as separate cond / uncond calls (``true_cfg_scale``), 28 × 28 images.
* ``demo-wan``: the shipped trained Wan demo (``assets/demo_wan``) through ``WanPipeline`` (which
  runs cond and uncond as separate calls), 9-frame 32 × 32 clips; fidelity is measured per frame.
* ``demo-sd3``: the shipped trained SD3 demo (``assets/demo_sd3``) through
  ``StableDiffusion3Pipeline`` (which batches cond and uncond into one call), 28 × 28 images;
  diffusers' hook caches do not run on it (``SD3Transformer2DModel`` has no ``enable_cache``).
* ``large-flux``: a random-init ``FluxTransformer2DModel`` of 36M parameters at 1024 image + 64
  text tokens through ``FluxPipeline`` (128 × 128), **for speed only**: its fidelity numbers are
  those of an untrained network and say nothing about image quality.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch


@dataclasses.dataclass
class Workload:
    key: str
    title: str  # one line for tables and plots
    description: str
    weights: str
    transformer: Any
    build_pipeline: Callable[[Any], Any]
    # (pipe, class embeddings, labels, guidance, steps, generator) -> images [N, C, H, W] in [0, 1]
    # (video frames folded into N)
    call: Callable[[Any, Any, list[int], float, int, torch.Generator], torch.Tensor]
    pipeline: str  # the diffusers pipeline class
    guidance_arg: str  # how the pipeline takes the guidance scale
    trained: bool = True
    batched_guidance: bool = False  # cond and uncond in one call of twice the batch (else separate calls)


LARGE_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # PixelShuffleVAE's 4 channels × FluxPipeline's 2 × 2 packing
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=512,
    pooled_projection_dim=256,
    axes_dims_rope=(16, 24, 24),
)
LARGE_FLUX_SIZE = 128  # 64 × 64 latent, packed 2 × 2 -> 1024 image tokens
LARGE_FLUX_TEXT_TOKENS = 64


def as_images(out: Any) -> torch.Tensor:
    """Pipeline output -> [N, C, H, W] in [0, 1] (video frames folded into N)."""
    frames = getattr(out, "frames", None)  # [N, F, C, H, W]
    images = frames.flatten(0, 1) if frames is not None else out.images
    return images.float()


def _pipeline_call(size: dict[str, int]) -> Callable[..., torch.Tensor]:
    """A workload's call: the class-label prompt, guidance as separate calls, the given size."""

    def call(pipe: Any, emb: Any, labels: list[int], guidance: float, steps: int, g: torch.Generator) -> torch.Tensor:
        out = pipe(
            **emb.pipeline_kwargs(labels, guidance_scale=guidance),
            **size,
            num_inference_steps=steps,
            generator=g,
            output_type="pt",
        )
        return as_images(out)

    return call


def load(key: str, random_weights: bool = False) -> tuple[Workload, Any]:
    """``(workload, class embeddings)``."""
    from sc_compile.demo import models as demo
    from sc_compile.demo.sampling import demo_size

    demos = {
        # key: (random init, shipped weights, assets folder, title, description, pipeline builder,
        #       call, pipeline class, guidance argument)
        "demo-flux": (
            demo.random_flux_demo,
            demo.load_flux_demo,
            demo.FLUX_DIRNAME,
            "Flux demo",
            "Flux demo (FluxTransformer2DModel, 2 double + 4 single blocks, 2.3M params, 49 image + 4 text tokens)",
            demo.build_flux_pipeline,
            _pipeline_call(demo_size("FluxTransformer2DModel")),
            "FluxPipeline",
            "true_cfg_scale",
        ),
        "demo-wan": (
            demo.random_wan_demo,
            demo.load_wan_demo,
            demo.WAN_DIRNAME,
            "Wan demo",
            "Wan demo (WanTransformer3DModel, 4 blocks, 0.96M params, 5 latent frames × 64 tokens + 4 text tokens)",
            demo.build_wan_pipeline,
            _pipeline_call(demo_size("WanTransformer3DModel")),
            "WanPipeline",
            "guidance_scale",
        ),
        "demo-sd3": (
            demo.random_sd3_demo,
            demo.load_sd3_demo,
            demo.SD3_DIRNAME,
            "SD3 demo",
            "SD3 demo (SD3Transformer2DModel, 4 joint blocks, 1.3M params, 49 image + 4 text tokens)",
            demo.build_sd3_pipeline,
            _pipeline_call(demo_size("SD3Transformer2DModel")),
            "StableDiffusion3Pipeline",
            "guidance_scale",
        ),
    }
    if key in demos:
        random_init, shipped, dirname, title, description, build, call, pipeline, guidance_arg = demos[key]
        pipe, emb = random_init() if random_weights else shipped()
        weights = f"random ({random_init.__name__})" if random_weights else str(demo.assets_dir() / dirname)
        wl = Workload(
            key,
            title,
            description,
            weights,
            pipe.transformer,
            build,
            call,
            pipeline,
            guidance_arg,
            trained=not random_weights,
            batched_guidance=key == "demo-sd3",
        )
        return wl, emb
    if key == "large-flux":
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        tr = FluxTransformer2DModel(**LARGE_FLUX_CONFIG).eval()
        emb = demo.ClassEmbeddings(
            demo.make_class_embeddings(
                LARGE_FLUX_TEXT_TOKENS,
                LARGE_FLUX_CONFIG["joint_attention_dim"],
                LARGE_FLUX_CONFIG["pooled_projection_dim"],
                seed=0,
            )
        )
        params = sum(p.numel() for p in tr.parameters()) / 1e6
        wl = Workload(
            key,
            "large Flux (random init, speed only)",
            f"random-init FluxTransformer2DModel, 2 double + 4 single blocks, width 512, {params:.1f}M params, "
            f"1024 image + {LARGE_FLUX_TEXT_TOKENS} text tokens (speed only: untrained, fidelity is not image quality)",
            "random init (seed 0)",
            tr,
            demo.build_flux_pipeline,
            _pipeline_call({"height": LARGE_FLUX_SIZE, "width": LARGE_FLUX_SIZE}),
            "FluxPipeline",
            "true_cfg_scale",
            trained=False,
        )
        return wl, emb
    raise ValueError(f"unknown workload {key!r}: choose demo-flux, demo-wan, demo-sd3 or large-flux")


WORKLOADS = ("demo-flux", "demo-wan", "demo-sd3", "large-flux")
