"""Tiny, locally built diffusers transformers for tests: one per model family.

Every builder returns ``(model, inputs)``: a randomly initialised (seeded), float32, eval-mode,
CPU model of a few tens of thousands of parameters, and a dict of keyword arguments for
``model(**inputs)`` shaped like what the family's diffusers pipeline passes (``timestep`` a
tensor, ``return_dict=False``). Nothing is downloaded.

Timesteps are in the units the family's pipeline feeds its transformer:

* ``flux``, ``qwen_image``: in [0, 1] (their pipelines pass ``t / 1000``);
* ``wan``, ``sd3``, ``pixart``, ``hunyuan_video``: in [0, 1000] (HunyuanVideo's pipeline passes
  the scheduler's ``t`` unscaled, and ``guidance`` as ``guidance_scale * 1000``).

``TIMESTEP_SCALE[name]`` is the top of that range and ``timesteps(name, n)`` gives a decreasing
schedule in those units. Usage::

    model, inputs = BUILDERS["flux"](seed=0)
    for t in timesteps("flux", 6):
        out = compiled(**with_timestep("flux", inputs, t))[0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "BUILDERS",
    "FAMILIES",
    "TIMESTEP_SCALE",
    "build",
    "build_flux",
    "build_hunyuan_video",
    "build_model",
    "build_pixart",
    "build_qwen_image",
    "build_sd3",
    "build_wan",
    "make_inputs",
    "timesteps",
    "with_timestep",
]

# Top of the timestep range each family's transformer is fed by its pipeline.
TIMESTEP_SCALE: dict[str, float] = {
    "flux": 1.0,
    "wan": 1000.0,
    "hunyuan_video": 1000.0,
    "sd3": 1000.0,
    "qwen_image": 1.0,
    "pixart": 1000.0,
}

# Default timestep (near the start of sampling) in each family's units.
_DEFAULT_TIMESTEP: dict[str, float] = {
    "flux": 1.0,
    "wan": 999.0,
    "hunyuan_video": 1000.0,
    "sd3": 1000.0,
    "qwen_image": 1.0,
    "pixart": 999.0,
}

FAMILIES: tuple[str, ...] = tuple(TIMESTEP_SCALE)


# --------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    # Inputs use their own stream so they do not depend on the model's init (and vice versa).
    return torch.Generator().manual_seed(10_000 + seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _timestep(name: str, batch: int, timestep: float | None) -> torch.Tensor:
    t = _DEFAULT_TIMESTEP[name] if timestep is None else float(timestep)
    return torch.full((batch,), t, dtype=torch.float32)


def _text_mask(batch: int, seq: int, valid: int) -> torch.Tensor:
    """A padded prompt mask: ``valid`` real tokens then padding (pipelines pad prompts)."""
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    mask[:, :valid] = 1
    return mask


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    # Freshly constructed diffusers models are already float32 on CPU; ``.to(dtype=...)`` would
    # only add a diffusers warning about modules to keep in float32.
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    return model.eval()


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # fork_rng so building a model leaves the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _finish(make())


# --------------------------------------------------------------------------------------------
# Flux: 2 double-stream + 2 single-stream blocks, inner dim 32.


def _flux_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    img_ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return {
        "hidden_states": _randn(g, batch, h * w, 8),
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "pooled_projections": _randn(g, batch, 32),
        "timestep": _timestep("flux", batch, timestep),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# Wan 2.1: 2 blocks, patch (1, 2, 2), inner dim 32.


def _wan_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # [B, C, F, H, W] -> 2*4*4 = 32 tokens
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "timestep": _timestep("wan", batch, timestep),
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# HunyuanVideo: 2 double + 2 single blocks, a 1-layer token refiner, guidance-distilled.


def _hunyuan_video_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    )


def _hunyuan_video_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # [B, C, F, H, W] -> 32 tokens
        "timestep": _timestep("hunyuan_video", batch, timestep),
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "encoder_attention_mask": _text_mask(batch, 8, 6),
        "pooled_projections": _randn(g, batch, 16),
        "guidance": torch.full((batch,), 6.0 * 1000.0),  # pipeline: guidance_scale * 1000
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# SD3 (MMDiT): 2 joint blocks (the last one context_pre_only), 8x8 latents.


def _sd3_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _sd3_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "pooled_projections": _randn(g, batch, 32),
        "timestep": _timestep("sd3", batch, timestep),
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# Qwen-Image: 2 dual-stream blocks on packed 2x2 latents (4x4 tokens of 16 channels).


def _qwen_image_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _qwen_image_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    h = w = 4
    # The pipeline drops an all-ones prompt mask (passes None), so no mask here.
    return {
        "hidden_states": _randn(g, batch, h * w, 16),
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "encoder_hidden_states_mask": None,
        "timestep": _timestep("qwen_image", batch, timestep),
        "img_shapes": [[(1, h, w)]] * batch,  # the pipeline's format
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# PixArt-alpha/sigma: 2 BasicTransformerBlocks (ada_norm_single), learned sigma (out = 2 * in).


def _pixart_model() -> Any:  # a diffusers ModelMixin (an nn.Module)
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,  # != 128, so no resolution / aspect-ratio micro-conditions
        patch_size=2,
        caption_channels=32,
    )


def _pixart_inputs(*, batch: int, seed: int, timestep: float | None) -> dict[str, Any]:
    g = _gen(seed)
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, 8, 32),
        "encoder_attention_mask": _text_mask(batch, 8, 6),
        "timestep": _timestep("pixart", batch, timestep),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# public API

_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "flux": _flux_model,
    "wan": _wan_model,
    "hunyuan_video": _hunyuan_video_model,
    "sd3": _sd3_model,
    "qwen_image": _qwen_image_model,
    "pixart": _pixart_model,
}

_INPUTS: dict[str, Callable[..., dict[str, Any]]] = {
    "flux": _flux_inputs,
    "wan": _wan_inputs,
    "hunyuan_video": _hunyuan_video_inputs,
    "sd3": _sd3_inputs,
    "qwen_image": _qwen_image_inputs,
    "pixart": _pixart_inputs,
}


def _check(name: str) -> None:
    if name not in _MODELS:
        raise KeyError(f"unknown family {name!r}; expected one of {FAMILIES}")


def build_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """The tiny ``name`` model, initialised from ``seed`` (float32, eval mode, CPU)."""
    _check(name)
    return _seeded(seed, _MODELS[name])


def make_inputs(
    name: str, *, batch: int = 1, seed: int = 0, timestep: float | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)``; ``timestep`` in the family's units."""
    _check(name)
    return _INPUTS[name](batch=batch, seed=seed, timestep=timestep)


def build(
    name: str, *, seed: int = 0, batch: int = 1, timestep: float | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, inputs)`` for family ``name``."""
    return build_model(name, seed=seed), make_inputs(
        name, batch=batch, seed=seed, timestep=timestep
    )


def with_timestep(name: str, inputs: dict[str, Any], timestep: float) -> dict[str, Any]:
    """A shallow copy of ``inputs`` with ``timestep`` replaced (same batch, family units)."""
    _check(name)
    batch = int(inputs["timestep"].shape[0])
    return {**inputs, "timestep": _timestep(name, batch, timestep)}


def timesteps(name: str, num_steps: int) -> list[float]:
    """A decreasing schedule of ``num_steps`` timesteps in the family's units (1.0 .. 1/n scaled)."""
    _check(name)
    scale = TIMESTEP_SCALE[name]
    return [scale * (num_steps - i) / num_steps for i in range(num_steps)]


def build_flux(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("flux", seed=seed, batch=batch, timestep=timestep)


def build_wan(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("wan", seed=seed, batch=batch, timestep=timestep)


def build_hunyuan_video(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("hunyuan_video", seed=seed, batch=batch, timestep=timestep)


def build_sd3(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("sd3", seed=seed, batch=batch, timestep=timestep)


def build_qwen_image(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("qwen_image", seed=seed, batch=batch, timestep=timestep)


def build_pixart(*, seed: int = 0, batch: int = 1, timestep: float | None = None):
    return build("pixart", seed=seed, batch=batch, timestep=timestep)


BUILDERS: dict[str, Callable[..., tuple[torch.nn.Module, dict[str, Any]]]] = {
    "flux": build_flux,
    "wan": build_wan,
    "hunyuan_video": build_hunyuan_video,
    "sd3": build_sd3,
    "qwen_image": build_qwen_image,
    "pixart": build_pixart,
}
