"""Cache-buffer memory at the seeds' real sizes, asked before running: no weights are allocated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_model.py [--only NAME]

Each model is built from its published diffusers config under the meta device (parameters have
shapes, no storage), traced by ``sc_compile.explain`` with meta inputs of the real sequence
length, and the buffer bytes per stream that the passes would allocate are read from the
explanation (the same ``explain`` whose figure ``tests/test_memory_model.py`` checks against the
bytes a generation allocates on tiny models). Writes ``benchmarks/results/memory_model.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import sc_compile

BF16 = torch.bfloat16


def _meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


# FLUX.1-dev's transformer (diffusers' FluxTransformer2DModel config); device_check.py builds it too.
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def wan_config(heads: int, ffn: int, layers: int) -> dict[str, Any]:
    """A Wan2.1 transformer's config (1.3B: 12 heads, ffn 8960, 30 layers; 14B: 40, 13824, 40)."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def flux_dev() -> tuple[str, Any, dict[str, Any], str]:
    from diffusers import FluxTransformer2DModel

    config = FLUX_DEV_CONFIG
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config).to(BF16)
    image, text = 4096, 512  # 1024 x 1024: 128 x 128 latent, packed 2 x 2
    inputs = dict(
        hidden_states=_meta(1, image, 64),
        encoder_hidden_states=_meta(1, text, 4096),
        pooled_projections=_meta(1, 768),
        timestep=_meta(1),
        guidance=_meta(1),
        img_ids=torch.zeros(image, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    return "FLUX.1-dev, 1024²", model, inputs, f"{image} + {text}"


def _wan(name: str, heads: int, ffn: int, layers: int, frames: int, height: int, width: int):
    from diffusers import WanTransformer3DModel

    config = wan_config(heads, ffn, layers)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config).to(BF16)
    latent_frames, latent_h, latent_w = (frames - 1) // 4 + 1, height // 8, width // 8
    tokens = latent_frames * (latent_h // 2) * (latent_w // 2)
    inputs = dict(
        hidden_states=_meta(1, 16, latent_frames, latent_h, latent_w),
        timestep=_meta(1),
        encoder_hidden_states=_meta(1, 512, 4096),
        return_dict=False,
    )
    return name, model, inputs, str(tokens)


def wan_1_3b_480p():
    return _wan("Wan2.1-1.3B, 480p, 81 frames", 12, 8960, 30, 81, 480, 832)


def wan_14b_480p():
    return _wan("Wan2.1-14B, 480p, 81 frames", 40, 13824, 40, 81, 480, 832)


def wan_14b_720p():
    return _wan("Wan2.1-14B, 720p, 81 frames", 40, 13824, 40, 81, 720, 1280)


def hunyuan_video_720p():
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=24,
        attention_head_dim=128,
        num_layers=20,
        num_single_layers=40,
        num_refiner_layers=2,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=4096,
        pooled_projection_dim=768,
        rope_theta=256.0,
        rope_axes_dim=(16, 56, 56),
    )
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**config).to(BF16)
    frames, height, width, text = 129, 720, 1280, 256
    latent_frames, latent_h, latent_w = (frames - 1) // 4 + 1, height // 8, width // 8
    tokens = latent_frames * (latent_h // 2) * (latent_w // 2)
    inputs = dict(
        hidden_states=_meta(1, 16, latent_frames, latent_h, latent_w),
        timestep=_meta(1),
        encoder_hidden_states=_meta(1, text, 4096),
        encoder_attention_mask=_meta(1, text, dtype=torch.bool),
        pooled_projections=_meta(1, 768),
        guidance=_meta(1),
        return_dict=False,
    )
    return "HunyuanVideo, 720p, 129 frames", model, inputs, f"{tokens} + {text}"


MODELS = {
    "flux-dev": flux_dev,
    "wan-1.3b-480p": wan_1_3b_480p,
    "wan-14b-480p": wan_14b_480p,
    "wan-14b-720p": wan_14b_720p,
    "hunyuan-video-720p": hunyuan_video_720p,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(MODELS), default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "memory_model.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for key, build in MODELS.items():
        if args.only and key != args.only:
            continue
        started = time.perf_counter()
        name, model, inputs, tokens = build()
        full = sc_compile.explain(model, **inputs, statistic="full")
        explanation = sc_compile.explain(model, **inputs)  # the default: statistic="subsample"
        points = explanation.cache_points
        hidden = explanation.hidden_state_bytes  # bf16 bytes of the largest point
        others = sum(1 for p in points if not p.feeds_output)
        row = (
            name,
            tokens,
            len(explanation.blocks),
            len(points),
            hidden,
            full.buffer_bytes_per_stream,
            explanation.buffer_bytes_per_stream,
            explanation.cached_step_buffer_bytes,
            others,
            time.perf_counter() - started,
        )
        rows.append(row)
        print(
            f"{name}: {row[2]} blocks, {row[3]} points, one hidden state {hidden / 1e6:.0f} MB, buffers per "
            f"stream {row[5] / 1e9:.2f} GB with statistic='full', {row[6] / 1e9:.3f} GB by default "
            f"({row[6] / hidden:.2f} hidden states; {row[8]} points sketched) [{row[9]:.0f} s]",
            flush=True,
        )
    lines = [
        "# Cache-buffer memory at real sizes (bf16, block granularity, hidden-state prediction)",
        "",
        "Models built from their diffusers configs on the meta device (no weights allocated) and traced by",
        "`sc_compile.explain` with inputs of the real sequence length:",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_model.py`. Per stream; guidance as separate",
        "cond / uncond calls doubles it. The points the output head reads at a cached step keep two full",
        "buffers (y_full, dy); every other point keeps, by default (`statistic='subsample'`), a float32",
        "strided subsample of at most 2 % of one hidden state's bytes (and 65,536 elements) for the change",
        "statistic and calibration; `statistic='full'` keeps two full buffers at every point (before issue 16,",
        "the only layout). Target: at most 2 hidden states + 2 % of one per other point.",
        "",
        "| model | tokens | blocks | cache points | one hidden state | statistic='full' | default (subsample) "
        "| default / hidden state | target (2 + 2 % × other points) | read at a cached step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4] / 1e6:.0f} MB | {r[5] / 1e9:.2f} GB | {r[6] / 1e9:.3f} GB "
        f"| {r[6] / r[4]:.3f} | {2 + 0.02 * r[8]:.2f} | {r[7] / 1e9:.3f} GB |"
        for r in rows
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
