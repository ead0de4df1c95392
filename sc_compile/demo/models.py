"""Build and load the demo DiT models and their diffusers pipelines, fully offline.

Three class-conditional demo models, all trained on Fashion-MNIST in pixel space (the training
code is an example outside the library: ``examples/demo_models/train.py`` in the source tree):

* **Flux** (image): a small ``FluxTransformer2DModel`` run by the real
  ``FluxPipeline``. A 28x28 grayscale image in [-1, 1] is pixel-unshuffled 2x2
  into a 4x14x14 "latent"; ``FluxPipeline`` packs that 2x2 again into 7x7 = 49
  tokens of 16 channels.
* **Wan** (video): a small ``WanTransformer3DModel`` run by the real
  ``WanPipeline``. A clip of 9 frames of 32x32 (``WanPipeline`` needs height and
  width divisible by 16 and ``num_frames = 1 + k * scale_factor_temporal``) is
  encoded by a causal pixel-unshuffle "VAE": spatial factor 2 and temporal factor
  2 (frame 0 alone, then pairs of frames), i.e. latents ``[B, 8, 5, 16, 16]``,
  which the transformer patchifies (1, 2, 2) into 5 * 8 * 8 = 320 tokens of 32
  values. (A spatial factor of 4, i.e. 128 values per token for a width-128
  model, trained much worse: the model could not remove the last noise.)

* **SD3** (image, a third DiT family): a small ``SD3Transformer2DModel`` (MMDiT)
  run by the real ``StableDiffusion3Pipeline``, on the Flux demo's geometry: the
  same ``PixelShuffleVAE`` 4x14x14 latent, patchified 2x2 by the transformer into
  49 tokens; the pipeline batches cond and uncond into one call.

Class conditioning replaces the text encoder: every class has a fixed, seeded
"prompt embedding" ``[T, D]`` (and, for Flux and SD3, a pooled embedding ``[P]``); index
``NULL_CLASS`` (10) is the unconditional / negative prompt used for classifier-free
guidance. The embeddings are stored beside the weights
(``class_embeddings.safetensors``) and handed to the pipelines as
``prompt_embeds`` / ``pooled_prompt_embeds`` / ``negative_*``, so no tokenizer or
text encoder is needed (they are passed as ``None``).

Typical use::

    from sc_compile.demo.models import load_flux_demo
    pipe, emb = load_flux_demo()
    out = pipe(**emb.pipeline_kwargs([0, 7, 9], guidance_scale=3.0),
               height=28, width=28, num_inference_steps=20, output_type="pt")
    out.images.shape  # [3, 1, 28, 28] in [0, 1]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file

from sc_compile import resources
from sc_compile.demo import demo_extra_missing

try:  # the pipelines' modules import transformers, which only the [demo] extra installs
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
except ModuleNotFoundError as error:
    raise demo_extra_missing(error) from error

NUM_CLASSES = 10
# The Fashion-MNIST classes the demo models were trained on, by label.
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NULL_CLASS = NUM_CLASSES  # index of the unconditional ("empty prompt") embedding

FLUX_DIRNAME = "demo_flux"
WAN_DIRNAME = "demo_wan"
SD3_DIRNAME = "demo_sd3"
EMBEDDINGS_FILE = "class_embeddings.safetensors"

# Image model geometry
FLUX_IMAGE_SIZE = 28
FLUX_TEXT_TOKENS = 4
# Video model geometry
WAN_FRAME_SIZE = 32
WAN_NUM_FRAMES = 9
WAN_SPATIAL = 2
WAN_TEMPORAL = 2
WAN_TEXT_TOKENS = 4
# Image model geometry of the SD3 demo (the Flux demo's: 28x28 -> 4x14x14 latent -> 7x7 patches)
SD3_IMAGE_SIZE = FLUX_IMAGE_SIZE
SD3_TEXT_TOKENS = 4

# Seeds of the fixed class embeddings (part of the model definition).
FLUX_EMBED_SEED = 1234
WAN_EMBED_SEED = 4321
SD3_EMBED_SEED = 2468


# --------------------------------------------------------------------------- paths


def assets_dir() -> Path:
    """The shipped data files (``sc_compile.assets``): ``demo_flux/``, ``demo_wan/``, ``demo_sd3/``."""
    return resources.assets_dir()


def _weights_dir(path: str | os.PathLike | None, dirname: str, model: str) -> Path:
    d = Path(path) if path is not None else assets_dir() / dirname
    missing = [
        name
        for name in ("config.json", "diffusion_pytorch_model.safetensors", EMBEDDINGS_FILE)
        if not (d / name).is_file()
    ]
    if missing:
        if path is not None:
            advice = "Pass the directory a training run wrote"
        else:
            advice = "The installed package is incomplete; reinstall sc-compile"
        raise FileNotFoundError(
            f"Demo {model} weights not found in {d} (missing: {', '.join(missing)}). "
            f"{advice}, or train them from a source checkout with "
            f"`python -m examples.demo_models.train --model {model} --out DIR` "
            "(needs `apt-get install dataset-fashion-mnist`)."
        )
    return d


# --------------------------------------------------------------------------- configs


def flux_config() -> dict[str, Any]:
    """Config of the demo ``FluxTransformer2DModel`` (2.3 M parameters, width 128)."""
    return dict(
        patch_size=1,
        in_channels=16,  # 4 pixel-unshuffled channels x 2x2 packing by FluxPipeline
        out_channels=None,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def wan_config() -> dict[str, Any]:
    """Config of the demo ``WanTransformer3DModel`` (0.96 M parameters, width 128)."""
    z = WAN_SPATIAL * WAN_SPATIAL * WAN_TEMPORAL  # 8 latent channels
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=z,
        out_channels=z,
        text_dim=64,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=64,
    )


def sd3_config() -> dict[str, Any]:
    """Config of the demo ``SD3Transformer2DModel`` (MMDiT, 4 joint blocks, width 96, 1.3 M parameters).

    The Flux demo's geometry: the ``PixelShuffleVAE`` shell's 4x14x14 latent is patchified 2x2 by the
    transformer into 7x7 = 49 tokens of 16 values; 4 class-prompt tokens (joint attention) and a
    pooled class embedding (timestep + pooled projection, as SD3's CLIP pooled output).
    """
    return dict(
        sample_size=SD3_IMAGE_SIZE // 2,  # latent side (vae factor 2)
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=64,
        caption_projection_dim=96,  # = num_attention_heads * attention_head_dim
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=SD3_IMAGE_SIZE // 4,  # 7 patches a side
        qk_norm="rms_norm",
    )


def sd3_scheduler() -> Any:
    """Flow-matching Euler scheduler for the SD3 demo's 49 tokens (no shift: SD3's default is 3)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def flux_scheduler() -> Any:
    """Flow-matching Euler scheduler for the 49-token images (no resolution shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def wan_scheduler() -> Any:
    """Flow-matching Euler scheduler for the video model (no shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


# --------------------------------------------------------------------------- VAE shells


@dataclass
class ShellEncoderOutput(BaseOutput):
    """``encode`` output; ``latents`` is what diffusers' ``retrieve_latents`` reads."""

    latents: torch.Tensor


class PixelShuffleVAE(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Lossless "VAE" for the Flux demo: pixel-(un)shuffle by ``block_out_channels`` depth.

    ``encode``: ``[B, 1, 28, 28]`` in [-1, 1] -> ``[B, 4, 14, 14]``;
    ``decode``: the inverse. The config carries what ``FluxPipeline`` reads:
    ``block_out_channels`` (``vae_scale_factor = 2 ** (len - 1) = 2``),
    ``scaling_factor`` and ``shift_factor``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (4, 4),
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        sample_size: int = FLUX_IMAGE_SIZE,
    ):
        super().__init__()
        factor = 2 ** (len(block_out_channels) - 1)
        if latent_channels != in_channels * factor * factor:
            raise ValueError("latent_channels must be in_channels * factor**2")
        self.factor = factor
        # A buffer so that ModelMixin.dtype / .device work (the shell has no weights).
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x.to(self._anchor.dtype), self.factor)
        z = (z - self.config["shift_factor"]) * self.config["scaling_factor"]
        return ShellEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        x = F.pixel_shuffle(z, self.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x, return_dict=False)[0], return_dict=False)[0]


class VideoPixelShuffleVAE(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """Lossless causal "video VAE" for the Wan demo.

    Frames ``[B, C, F, H, W]`` with ``F = 1 + k * scale_factor_temporal`` are
    grouped causally like Wan's VAE: frame 0 alone (repeated to fill a group),
    then groups of ``scale_factor_temporal`` frames; each group is stacked along
    channels and pixel-unshuffled by ``scale_factor_spatial``. Latents are
    ``[B, z_dim, 1 + k, H / s, W / s]`` with ``z_dim = C * s * s * t``. The config
    carries what ``WanPipeline`` reads: ``scale_factor_temporal``,
    ``scale_factor_spatial``, ``z_dim``, ``latents_mean``, ``latents_std``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        scale_factor_spatial: int = WAN_SPATIAL,
        scale_factor_temporal: int = WAN_TEMPORAL,
        z_dim: int = WAN_SPATIAL * WAN_SPATIAL * WAN_TEMPORAL,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        expect = in_channels * scale_factor_spatial**2 * scale_factor_temporal
        if z_dim != expect:
            raise ValueError(f"z_dim must be {expect}")
        if latents_mean is None:
            self.register_to_config(latents_mean=[0.0] * z_dim)
        if latents_std is None:
            self.register_to_config(latents_std=[1.0] * z_dim)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config["z_dim"], 1, 1, 1)
        mean = torch.tensor(self.config["latents_mean"], dtype=like.dtype, device=like.device)
        std = torch.tensor(self.config["latents_std"], dtype=like.dtype, device=like.device)
        return mean.view(shape), std.view(shape)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``[B, C, F, H, W]`` (pixels in [-1, 1]) -> normalized latents."""
        s, t = self.config["scale_factor_spatial"], self.config["scale_factor_temporal"]
        b, c, f, h, w = x.shape
        if (f - 1) % t:
            raise ValueError(f"num_frames - 1 must be divisible by {t}, got {f} frames")
        x = x.to(self._anchor.dtype)
        x = torch.cat([x[:, :, :1].expand(b, c, t, h, w), x[:, :, 1:]], dim=2)
        groups = x.shape[2] // t
        x = x.reshape(b, c, groups, t, h, w).permute(0, 2, 1, 3, 4, 5)  # b g c t h w
        x = x.reshape(b * groups, c * t, h, w)
        z = F.pixel_unshuffle(x, s)
        z = z.reshape(b, groups, c * t * s * s, h // s, w // s).permute(0, 2, 1, 3, 4)
        mean, std = self._norm(z)
        z = (z - mean) / std
        return ShellEncoderOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        """Unnormalized latents (as ``WanPipeline`` hands them) -> ``[B, C, F, H, W]``."""
        s, t = self.config["scale_factor_spatial"], self.config["scale_factor_temporal"]
        b, zc, groups, hh, ww = z.shape
        c = zc // (t * s * s)
        x = z.permute(0, 2, 1, 3, 4).reshape(b * groups, zc, hh, ww)
        x = F.pixel_shuffle(x, s)  # (b g) (c t) h w
        h, w = x.shape[-2:]
        x = x.reshape(b, groups, c, t, h, w).permute(0, 2, 1, 3, 4, 5).reshape(b, c, groups * t, h, w)
        first = x[:, :, :t].mean(dim=2, keepdim=True)
        x = torch.cat([first, x[:, :, t:]], dim=2)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def latents_from_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized latents, as the transformer sees them (for training)."""
        return self.encode(x, return_dict=False)[0]


# --------------------------------------------------------------------------- class embeddings


def make_class_embeddings(num_tokens: int, dim: int, pooled_dim: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic class "prompt" embeddings for 10 classes + the null class.

    Returns ``{"prompt_embeds": [11, T, D]}`` (plus ``"pooled_prompt_embeds": [11, P]``
    when ``pooled_dim`` is given), unit-variance Gaussian, float32.
    """
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(NUM_CLASSES + 1, num_tokens, dim, generator=g)}
    if pooled_dim is not None:
        out["pooled_prompt_embeds"] = torch.randn(NUM_CLASSES + 1, pooled_dim, generator=g)
    return out


Labels = int | Sequence[int] | torch.Tensor | None


GUIDANCE_KWARGS = ("true_cfg_scale", "guidance_scale")


class ClassEmbeddings:
    """Class -> (prompt_embeds, pooled_prompt_embeds) lookup; ``None`` / 10 = null class.

    ``guidance``: the pipeline argument that takes the classifier-free guidance scale:
    ``"true_cfg_scale"`` (``FluxPipeline``) or ``"guidance_scale"`` (``WanPipeline``,
    ``StableDiffusion3Pipeline``); ``None`` picks ``"true_cfg_scale"`` when there is a pooled
    embedding (the Flux demo), else ``"guidance_scale"``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], guidance: str | None = None):
        self.prompt_embeds = tensors["prompt_embeds"]
        self.pooled_prompt_embeds = tensors.get("pooled_prompt_embeds")
        if guidance is None:
            guidance = "true_cfg_scale" if self.pooled_prompt_embeds is not None else "guidance_scale"
        if guidance not in GUIDANCE_KWARGS:
            raise ValueError(f"guidance must be one of {GUIDANCE_KWARGS}, got {guidance!r}")
        self.guidance = guidance

    # -- io
    @classmethod
    def load(cls, path: str | os.PathLike, guidance: str | None = None) -> ClassEmbeddings:
        p = Path(path)
        if p.is_dir():
            p = p / EMBEDDINGS_FILE
        return cls(load_file(str(p)), guidance=guidance)

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / EMBEDDINGS_FILE
        tensors = {"prompt_embeds": self.prompt_embeds.float().contiguous()}
        if self.pooled_prompt_embeds is not None:
            tensors["pooled_prompt_embeds"] = self.pooled_prompt_embeds.float().contiguous()
        save_file(tensors, str(p))

    def to(self, device=None, dtype=None) -> ClassEmbeddings:
        t = {"prompt_embeds": self.prompt_embeds.to(device=device, dtype=dtype)}
        if self.pooled_prompt_embeds is not None:
            t["pooled_prompt_embeds"] = self.pooled_prompt_embeds.to(device=device, dtype=dtype)
        return ClassEmbeddings(t, guidance=self.guidance)

    # -- lookup
    @staticmethod
    def _index(labels: Labels) -> torch.Tensor:
        if labels is None:
            return torch.tensor([NULL_CLASS])
        idx = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if idx.numel() and (idx.min() < 0 or idx.max() > NULL_CLASS):
            raise ValueError(f"class labels must be in 0..{NULL_CLASS}, got {idx.tolist()}")
        return idx

    def __call__(self, labels: Labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds [B, T, D], pooled_prompt_embeds [B, P] or None)`` for ``labels``."""
        idx = self._index(labels).to(self.prompt_embeds.device)
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[idx]
        return self.prompt_embeds[idx], pooled

    def null(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of the null class (negative prompt for classifier-free guidance)."""
        return self([NULL_CLASS] * batch_size)

    def pipeline_kwargs(self, labels: Labels, guidance_scale: float = 1.0) -> dict[str, Any]:
        """Keyword arguments for ``FluxPipeline`` / ``WanPipeline`` / ``StableDiffusion3Pipeline``
        calls for ``labels``.

        With ``guidance_scale > 1`` the null class is passed as negative prompt:
        as ``true_cfg_scale`` for Flux (whose ``guidance_scale`` is for guidance-
        distilled models), as ``guidance_scale`` for Wan and SD3 (always passed: SD3's
        default is 7).
        """
        pe, pooled = self(labels)
        n = pe.shape[0]
        kw: dict[str, Any]
        if self.guidance == "guidance_scale" and pooled is not None:  # SD3
            kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, guidance_scale=guidance_scale)
            if guidance_scale > 1.0:
                npe, npooled = self.null(n)
                kw.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npooled)
            return kw
        if pooled is not None:  # Flux
            kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled)
            if guidance_scale > 1.0:
                npe, npooled = self.null(n)
                kw.update(
                    negative_prompt_embeds=npe,
                    negative_pooled_prompt_embeds=npooled,
                    true_cfg_scale=guidance_scale,
                )
            return kw
        kw = dict(prompt_embeds=pe, guidance_scale=guidance_scale)
        if guidance_scale > 1.0:
            kw["negative_prompt_embeds"] = self.null(n)[0]
        return kw


def flux_class_embeddings() -> ClassEmbeddings:
    cfg = flux_config()
    return ClassEmbeddings(
        make_class_embeddings(
            FLUX_TEXT_TOKENS,
            cfg["joint_attention_dim"],
            cfg["pooled_projection_dim"],
            FLUX_EMBED_SEED,
        )
    )


def sd3_class_embeddings() -> ClassEmbeddings:
    cfg = sd3_config()
    return ClassEmbeddings(
        make_class_embeddings(
            SD3_TEXT_TOKENS, cfg["joint_attention_dim"], cfg["pooled_projection_dim"], SD3_EMBED_SEED
        ),
        guidance="guidance_scale",
    )


def wan_class_embeddings() -> ClassEmbeddings:
    cfg = wan_config()
    return ClassEmbeddings(make_class_embeddings(WAN_TEXT_TOKENS, cfg["text_dim"], None, WAN_EMBED_SEED))


def class_prompt_embeds(
    label: Labels, model: str = "flux", path: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt_embeds, pooled_prompt_embeds)`` of the shipped ``model`` ("flux"/"wan"/"sd3") for ``label``."""
    dirname = {"flux": FLUX_DIRNAME, "wan": WAN_DIRNAME, "sd3": SD3_DIRNAME}[model]
    return ClassEmbeddings.load(_weights_dir(path, dirname, model))(label)


# --------------------------------------------------------------------------- pipelines


def _to(module: Any, device: Any, dtype: torch.dtype) -> Any:
    """Move ``module``; cast only when the dtype changes (avoids diffusers' fp32-modules warning)."""
    module = module.to(device)
    if dtype != module.dtype:
        module = module.to(dtype=dtype)
    return module


def build_flux_pipeline(transformer: FluxTransformer2DModel) -> FluxPipeline:
    """``FluxPipeline`` around ``transformer`` with no tokenizers / text encoders."""
    vae = _to(PixelShuffleVAE(), transformer.device, transformer.dtype)
    components: dict[str, Any] = dict(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan_pipeline(transformer: WanTransformer3DModel) -> WanPipeline:
    """``WanPipeline`` around ``transformer`` with no tokenizer / text encoder."""
    vae = _to(VideoPixelShuffleVAE(), transformer.device, transformer.dtype)
    components: dict[str, Any] = dict(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=wan_scheduler(),
        transformer=transformer,
    )
    pipe = WanPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd3_pipeline(transformer: SD3Transformer2DModel) -> StableDiffusion3Pipeline:
    """``StableDiffusion3Pipeline`` around ``transformer`` with no tokenizers / text encoders."""
    vae = _to(PixelShuffleVAE(), transformer.device, transformer.dtype)
    components: dict[str, Any] = dict(
        transformer=transformer,
        scheduler=sd3_scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_transformer(cls, d: Path, device, dtype: torch.dtype):
    """``cls`` from ``save_pretrained`` output in ``d`` (weights may be stored in fp16).

    Equivalent to ``cls.from_pretrained(d)`` but without the accelerate / low-memory
    code paths (not installed here, and Wan's fp32-module handling rejects them).
    """
    model = cls.from_config(cls.load_config(d))
    state = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return _to(model, device, dtype).eval()


def random_flux_demo(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[FluxPipeline, ClassEmbeddings]:
    """Untrained (random) Flux demo: same pipeline/config as the shipped one."""
    torch.manual_seed(seed)
    tr = _to(FluxTransformer2DModel(**flux_config()), device, dtype).eval()
    return build_flux_pipeline(tr), flux_class_embeddings().to(device, dtype)


def random_wan_demo(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[WanPipeline, ClassEmbeddings]:
    """Untrained (random) Wan demo: same pipeline/config as the shipped one."""
    torch.manual_seed(seed)
    tr = _to(WanTransformer3DModel(**wan_config()), device, dtype).eval()
    return build_wan_pipeline(tr), wan_class_embeddings().to(device, dtype)


def random_sd3_demo(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[StableDiffusion3Pipeline, ClassEmbeddings]:
    """Untrained (random) SD3 demo: same pipeline/config as the shipped one."""
    torch.manual_seed(seed)
    tr = _to(SD3Transformer2DModel(**sd3_config()), device, dtype).eval()
    return build_sd3_pipeline(tr), sd3_class_embeddings().to(device, dtype)


def load_flux_demo(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
) -> tuple[FluxPipeline, ClassEmbeddings]:
    """Load the shipped Flux demo (``assets/demo_flux``): ``(FluxPipeline, ClassEmbeddings)``.

    Generate with e.g. ``pipe(**emb.pipeline_kwargs(3, guidance_scale=3.0), height=28,
    width=28, num_inference_steps=20, output_type="pt").images`` -> ``[1, 1, 28, 28]``.
    """
    d = _weights_dir(path, FLUX_DIRNAME, "flux")
    tr = _load_transformer(FluxTransformer2DModel, d, device, dtype)
    return build_flux_pipeline(tr), ClassEmbeddings.load(d).to(device, dtype)


def load_wan_demo(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
) -> tuple[WanPipeline, ClassEmbeddings]:
    """Load the shipped Wan demo (``assets/demo_wan``): ``(WanPipeline, ClassEmbeddings)``.

    Generate with e.g. ``pipe(**emb.pipeline_kwargs(3, guidance_scale=3.0), height=32,
    width=32, num_frames=9, num_inference_steps=20, output_type="pt").frames`` ->
    ``[1, 9, 1, 32, 32]`` in [0, 1].
    """
    d = _weights_dir(path, WAN_DIRNAME, "wan")
    tr = _load_transformer(WanTransformer3DModel, d, device, dtype)
    return build_wan_pipeline(tr), ClassEmbeddings.load(d).to(device, dtype)


def load_sd3_demo(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
) -> tuple[StableDiffusion3Pipeline, ClassEmbeddings]:
    """Load the shipped SD3 demo (``assets/demo_sd3``): ``(StableDiffusion3Pipeline, ClassEmbeddings)``.

    Generate with e.g. ``pipe(**emb.pipeline_kwargs(3, guidance_scale=3.0), height=28,
    width=28, num_inference_steps=20, output_type="pt").images`` -> ``[1, 1, 28, 28]``.
    """
    d = _weights_dir(path, SD3_DIRNAME, "sd3")
    tr = _load_transformer(SD3Transformer2DModel, d, device, dtype)
    return build_sd3_pipeline(tr), ClassEmbeddings.load(d, guidance="guidance_scale").to(device, dtype)
