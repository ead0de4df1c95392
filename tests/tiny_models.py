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
    "build_more",
    "make_inputs",
    "MORE_FAMILIES",
    "more_timesteps",
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


def make_inputs(name: str, *, batch: int = 1, seed: int = 0, timestep: float | None = None) -> dict[str, Any]:
    """Keyword arguments for ``model(**inputs)``; ``timestep`` in the family's units."""
    _check(name)
    return _INPUTS[name](batch=batch, seed=seed, timestep=timestep)


def build(
    name: str, *, seed: int = 0, batch: int = 1, timestep: float | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, inputs)`` for family ``name``."""
    return build_model(name, seed=seed), make_inputs(name, batch=batch, seed=seed, timestep=timestep)


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


# --------------------------------------------------------------------------------------------
# More families, from the configurations of diffusers' own model tests (2 layers where those
# have 1, so that blocks repeat), built tiny and locally. Model knowledge here is test data only.


class FamilySpec:
    """How to build one family: the diffusers class, its config, its inputs, and the name and
    range of its timestep argument (its pipeline's units)."""

    def __init__(
        self,
        model_class: str,
        config: dict[str, Any],
        inputs: Callable[[Callable[..., torch.Tensor]], dict[str, Any]],
        timestep_key: str = "timestep",
        timestep_scale: float = 1000.0,
    ):
        self.model_class = model_class
        self.config = config
        self.inputs = inputs
        self.timestep_key = timestep_key
        self.timestep_scale = timestep_scale


def _stable_audio_inputs(r: Callable[..., torch.Tensor]) -> dict[str, Any]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return {
        "hidden_states": r(1, 4, 8),  # [B, C, T]
        "encoder_hidden_states": r(1, 4, 4),
        "global_hidden_states": r(1, 1, 8),
        # The pipeline's rotary table: head_dim // 2 over T + 1 (the global token) positions.
        "rotary_embedding": get_1d_rotary_pos_embed(2, 8 + 1, use_real=True, repeat_interleave_real=False),
    }


def _flux2_inputs(r: Callable[..., torch.Tensor]) -> dict[str, Any]:
    h = w = 4
    text = 8
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return {
        "hidden_states": r(1, h * w, 4),
        "encoder_hidden_states": r(1, text, 32),
        "img_ids": image_ids.unsqueeze(0),
        "txt_ids": text_ids.unsqueeze(0),
        "guidance": torch.ones(1),
    }


def _flux_like_inputs(r: Callable[..., torch.Tensor], **extra: Any) -> dict[str, Any]:
    return {
        "hidden_states": r(1, 16, 4),
        "encoder_hidden_states": r(1, 24, 32),
        "img_ids": r(16, 3),
        "txt_ids": r(24, 3),
        **extra,
    }


_WAN_LIKE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

MORE_FAMILIES: dict[str, FamilySpec] = {
    "allegro": FamilySpec(
        "AllegroTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "cross_attention_dim": 16,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "caption_channels": 8,
        },
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "encoder_hidden_states": r(1, 16, 8)},
    ),
    "aura_flow": FamilySpec(
        "AuraFlowTransformer2DModel",
        {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 4,
            "num_mmdit_layers": 2,
            "num_single_dit_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": 32,
            "out_channels": 4,
            "pos_embed_max_size": 256,
        },
        lambda r: {"hidden_states": r(1, 4, 16, 16), "encoder_hidden_states": r(1, 16, 32)},
    ),
    "bria": FamilySpec(
        "BriaTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": None,
            "axes_dims_rope": [0, 4, 4],
        },
        _flux_like_inputs,
    ),
    "chroma": FamilySpec(
        "ChromaTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": [4, 4, 8],
            "approximator_num_channels": 8,
            "approximator_hidden_dim": 16,
            "approximator_layers": 1,
        },
        _flux_like_inputs,
        timestep_scale=1.0,
    ),
    "chronoedit": FamilySpec(
        "ChronoEditTransformer3DModel",
        {
            **_WAN_LIKE,
            "attention_head_dim": 8,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 16,
            "ffn_dim": 32,
            "num_layers": 2,
            "eps": 1e-06,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 64,
            "pos_embed_seq_len": None,
            "rope_temporal_skip_len": 8,
        },
        lambda r: {
            "hidden_states": r(1, 16, 2, 8, 8),
            "encoder_hidden_states": r(1, 12, 32),
            "encoder_hidden_states_image": None,
        },
    ),
    "cogvideox": FamilySpec(
        "CogVideoXTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 8,
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "patch_size": 2,
            "patch_size_t": None,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 8,
        },
        lambda r: {"hidden_states": r(1, 1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 8)},
    ),
    "cogview3plus": FamilySpec(
        "CogView3PlusTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 2,
            "pos_embed_max_size": 8,
            "sample_size": 8,
        },
        lambda r: {
            "hidden_states": r(1, 4, 8, 8),
            "encoder_hidden_states": r(1, 8, 8),
            "original_size": torch.tensor([[64, 64]]),
            "target_size": torch.tensor([[64, 64]]),
            "crop_coords": torch.tensor([[0, 0]]),
        },
    ),
    "cogview4": FamilySpec(
        "CogView4Transformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 4,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 4,
        },
        lambda r: {
            "hidden_states": r(1, 4, 8, 8),
            "encoder_hidden_states": r(1, 8, 8),
            "original_size": torch.tensor([[64, 64]]),
            "target_size": torch.tensor([[64, 64]]),
            "crop_coords": torch.tensor([[0, 0]]),
        },
    ),
    "consisid": FamilySpec(
        "ConsisIDTransformer3DModel",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 8,
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 8,
            "cross_attn_interval": 1,
            "is_kps": False,
            "is_train_face": True,
            "cross_attn_dim_head": 1,
            "cross_attn_num_heads": 1,
            "LFE_id_dim": 2,
            "LFE_vit_dim": 2,
            "LFE_depth": 5,
            "LFE_dim_head": 8,
            "LFE_num_heads": 2,
            "LFE_num_id_token": 1,
            "LFE_num_querie": 1,
            "LFE_output_dim": 10,
            "LFE_ff_mult": 1,
            "LFE_num_scale": 1,
        },
        lambda r: {
            "hidden_states": r(1, 1, 4, 8, 8),
            "encoder_hidden_states": r(1, 8, 8),
            "id_vit_hidden": [torch.ones(1, 2, 2)],
            "id_cond": torch.ones(1, 2),
        },
    ),
    "dit": FamilySpec(
        "DiTTransformer2DModel",
        {
            "in_channels": 4,
            "out_channels": 8,
            "activation_fn": "gelu-approximate",
            "num_attention_heads": 2,
            "attention_head_dim": 4,
            "attention_bias": True,
            "num_layers": 2,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 8,
            "patch_size": 2,
            "sample_size": 8,
        },
        lambda r: {"hidden_states": r(1, 4, 8, 8), "class_labels": torch.tensor([3])},
    ),
    "easyanimate": FamilySpec(
        "EasyAnimateTransformer3DModel",
        {
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "in_channels": 4,
            "mmdit_layers": 2,
            "num_layers": 2,
            "out_channels": 4,
            "patch_size": 2,
            "sample_height": 60,
            "sample_width": 90,
            "text_embed_dim": 16,
            "time_embed_dim": 8,
            "time_position_encoding_type": "3d_rope",
            "timestep_activation_fn": "silu",
        },
        lambda r: {
            "hidden_states": r(1, 4, 2, 8, 8),
            "timestep_cond": None,
            "encoder_hidden_states": r(1, 16, 16),
            "encoder_hidden_states_t5": None,
            "inpaint_latents": None,
            "control_latents": None,
        },
    ),
    "flux2": FamilySpec(
        "Flux2Transformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "timestep_guidance_channels": 256,
            "axes_dims_rope": [4, 4, 4, 4],
        },
        _flux2_inputs,
        timestep_scale=1.0,
    ),
    "hunyuan_dit": FamilySpec(
        "HunyuanDiT2DModel",
        {
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "cross_attention_dim": 8,
            "cross_attention_dim_t5": 8,
            "pooled_projection_dim": 4,
            "hidden_size": 16,
            "text_len": 4,
            "text_len_t5": 4,
            "activation_fn": "gelu-approximate",
        },
        lambda r: {
            "hidden_states": r(1, 4, 8, 8),
            "encoder_hidden_states": r(1, 4, 8),
            "text_embedding_mask": torch.ones(1, 4),
            "encoder_hidden_states_t5": r(1, 4, 8),
            "text_embedding_mask_t5": torch.ones(1, 4),
            "image_meta_size": torch.tensor([[1024.0, 1024, 16, 16, 0, 0]]),
            "style": torch.zeros(1, dtype=torch.int64),
            "image_rotary_emb": [torch.ones(16, 8), torch.zeros(16, 8)],
        },
    ),
    "latte": FamilySpec(
        "LatteTransformer3DModel",
        {
            "sample_size": 8,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "caption_channels": 8,
            "in_channels": 4,
            "cross_attention_dim": 8,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
        },
        lambda r: {
            "hidden_states": r(1, 4, 1, 8, 8),
            "encoder_hidden_states": r(1, 8, 8),
            "enable_temporal_attentions": True,
        },
    ),
    "longcat_image": FamilySpec(
        "LongCatImageTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 4, 8],
        },
        lambda r: _flux_like_inputs(r, guidance=torch.full((1,), 3.5)),
        timestep_scale=1.0,
    ),
    "ltx_video": FamilySpec(
        "LTXVideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 2,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
        },
        lambda r: {
            "hidden_states": r(1, 2 * 8 * 8, 4),
            "encoder_hidden_states": r(1, 16, 16),
            "encoder_attention_mask": torch.ones(1, 16).bool(),
            "num_frames": 2,
            "height": 8,
            "width": 8,
        },
    ),
    "ltx2": FamilySpec(
        "LTX2VideoTransformer3DModel",
        {
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "audio_in_channels": 4,
            "audio_out_channels": 4,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 4,
            "audio_cross_attention_dim": 8,
            "num_layers": 2,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
            "rope_double_precision": False,
        },
        lambda r: {
            "hidden_states": r(1, 2 * 8 * 8, 4),
            "audio_hidden_states": r(1, 9, 4),
            "encoder_hidden_states": r(1, 16, 16),
            "audio_encoder_hidden_states": r(1, 16, 16),
            "encoder_attention_mask": torch.ones(1, 16).bool(),
            "num_frames": 2,
            "height": 8,
            "width": 8,
            "audio_num_frames": 9,
            "fps": 25.0,
        },
    ),
    "lumina_next": FamilySpec(
        "LuminaNextDiT2DModel",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 16,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "learn_sigma": False,
            "qk_norm": True,
            "cross_attention_dim": 32,
            "scaling_factor": 1.0,
        },
        lambda r: {
            "hidden_states": r(1, 4, 8, 8),
            "encoder_hidden_states": r(1, 16, 32),
            "encoder_mask": torch.ones(1, 16),
            "image_rotary_emb": r(384, 384, 4),
            "cross_attention_kwargs": {},
        },
        timestep_scale=1.0,
    ),
    "ovis_image": FamilySpec(
        "OvisImageTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": (4, 4, 8),
        },
        _flux_like_inputs,
        timestep_scale=1.0,
    ),
    "sana": FamilySpec(
        "SanaTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 4,
            "cross_attention_dim": 8,
            "caption_channels": 8,
            "sample_size": 32,
        },
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 8)},
    ),
    "sana_video": FamilySpec(
        "SanaVideoTransformer3DModel",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 12,
            "cross_attention_dim": 24,
            "caption_channels": 16,
            "mlp_ratio": 2.5,
            "dropout": 0.0,
            "attention_bias": False,
            "sample_size": 8,
            "patch_size": (1, 2, 2),
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
        lambda r: {"hidden_states": r(1, 16, 2, 8, 8), "encoder_hidden_states": r(1, 12, 16)},
    ),
    "skyreels_v2": FamilySpec(
        "SkyReelsV2Transformer3DModel",
        {
            **_WAN_LIKE,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
        },
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "encoder_hidden_states": r(1, 12, 16)},
    ),
    "stable_audio": FamilySpec(
        "StableAudioDiTModel",
        {
            "sample_size": 8,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "num_key_value_attention_heads": 1,
            "out_channels": 4,
            "cross_attention_dim": 4,
            "time_proj_dim": 8,
            "global_states_input_dim": 8,
            "cross_attention_input_dim": 4,
        },
        _stable_audio_inputs,
    ),
    "wan_vace": FamilySpec(
        "WanVACETransformer3DModel",
        {
            **_WAN_LIKE,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 4,
            "vace_layers": [0, 2],
            "vace_in_channels": 48,
        },
        lambda r: {
            "hidden_states": r(1, 16, 2, 8, 8),
            "encoder_hidden_states": r(1, 12, 32),
            "control_hidden_states": r(1, 48, 2, 8, 8),
        },
    ),
    # Refused with our own error (see tests/test_families.py): data-dependent Python in their forward.
    "hidream": FamilySpec(
        "HiDreamImageTransformer2DModel",
        {
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_channels": [8, 4],
            "text_emb_dim": 8,
            "num_routed_experts": 2,
            "num_activated_experts": 2,
            "axes_dims_rope": (4, 2, 2),
            "max_resolution": (32, 32),
            "llama_layers": (0, 1),
            "force_inference_output": True,
        },
        lambda r: {
            "hidden_states": r(1, 4, 16, 16),
            "encoder_hidden_states_t5": r(1, 8, 8),
            "encoder_hidden_states_llama3": r(2, 1, 8, 4),
            "pooled_embeds": r(1, 8),
        },
        timestep_key="timesteps",
    ),
    "lumina2": FamilySpec(
        "Lumina2Transformer2DModel",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 2,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "scaling_factor": 1.0,
            "axes_dim_rope": (4, 2, 2),
            "axes_lens": (128, 128, 128),
            "cap_feat_dim": 32,
        },
        lambda r: {
            "hidden_states": r(1, 4, 8, 8),
            "encoder_hidden_states": r(1, 16, 32),
            "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        },
        timestep_scale=1.0,
    ),
    # Captured whole only with fullgraph=True (its attention selects prompt tokens with nonzero).
    "mochi": FamilySpec(
        "MochiTransformer3DModel",
        {
            "patch_size": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "pooled_projection_dim": 16,
            "in_channels": 4,
            "out_channels": None,
            "qk_norm": "rms_norm",
            "text_embed_dim": 16,
            "time_embed_dim": 4,
            "activation_fn": "swiglu",
            "max_sequence_length": 16,
        },
        lambda r: {
            "hidden_states": r(1, 4, 2, 8, 8),
            "encoder_hidden_states": r(1, 16, 16),
            "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        },
    ),
}


def build_more(name: str, *, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model, inputs)`` for a family of :data:`MORE_FAMILIES`; the timestep is left out (see
    :func:`more_timesteps`)."""
    import diffusers

    spec = MORE_FAMILIES[name]
    model = _seeded(seed, lambda: getattr(diffusers, spec.model_class)(**spec.config))
    g = _gen(seed)
    return model, {**spec.inputs(lambda *shape: _randn(g, *shape)), "return_dict": False}


def more_timesteps(name: str, num_steps: int) -> list[dict[str, torch.Tensor]]:
    """A decreasing schedule for a family of :data:`MORE_FAMILIES`, as keyword arguments."""
    spec = MORE_FAMILIES[name]
    return [
        {spec.timestep_key: torch.full((1,), spec.timestep_scale * (num_steps - i) / num_steps)}
        for i in range(num_steps)
    ]
