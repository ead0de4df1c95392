"""Train the demo DiT models on Fashion-MNIST (rectified flow, class-conditional).

Run from the repository root (this folder is an example, not part of the installed library; the
model definitions it trains are ``sc_compile.demo.models``, which the wheel ships)::

    python -m examples.demo_models.train --model flux --out assets/demo_flux \\
        --max-steps 3000 --batch-size 96 --threads 1 --max-minutes 44
    python -m examples.demo_models.train --model wan --out assets/demo_wan \\
        --max-steps 2400 --batch-size 16 --threads 1 --max-minutes 40
    python -m examples.demo_models.train --model sd3 --out assets/demo_sd3 \\
        --max-steps 4000 --batch-size 96 --threads 1 --max-minutes 30
    python -m examples.demo_models.train --model wan --out assets/demo_wan \\
        --init-from assets/demo_wan --max-steps 1700 --batch-size 16 --lr 3e-4 \\
        --warmup 50 --seed 1 --threads 1 --max-minutes 20   # continue (shipped Wan)

Rectified flow: ``x_t = (1 - s) x0 + s noise``, target ``v = noise - x0``, ``s``
logit-normal (Wan's default ``--sigma-dist mixed``: every other sample uniform
instead, so that sigma ~ 1, where sampling starts, is trained too). The
transformers get the timestep the way the pipelines pass it: Flux
``timestep = s`` (``FluxPipeline`` divides the scheduler's ``t = 1000 s`` by 1000),
Wan ``timestep = 1000 s``. Labels are dropped to the null class with
probability ``--label-dropout`` for classifier-free guidance. AdamW with linear
warmup and cosine decay, gradient clipping, EMA of the weights (the EMA weights are
saved). The output directory gets ``config.json`` +
``diffusion_pytorch_model.safetensors`` (``save_pretrained``, fp16 by default),
``class_embeddings.safetensors``, ``train_log.txt``, ``samples.png`` and
``MODEL_CARD.md``. Checkpoints are written every ``--save-every`` steps, so an
interrupted run still leaves usable weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# How train_log.txt records a run's command: this script's, and its name when it was part of the
# library (sc_compile.demo.train), which the logs of the shipped models still carry.
COMMAND_PREFIXES = ("# python -m examples.demo_models.train", "# python -m sc_compile.demo.train")


def flux_tokens(x: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 1, 28, 28]`` in [-1, 1] -> packed Flux tokens ``[B, 49, 16]``."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    z = F.pixel_unshuffle(x, 2)  # same as PixelShuffleVAE.encode with scaling 1 / shift 0
    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def flux_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """``(txt_ids [T, 3], img_ids [N, 3])`` exactly as ``FluxPipeline`` builds them."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from sc_compile.demo.models import FLUX_IMAGE_SIZE, FLUX_TEXT_TOKENS

    side = FLUX_IMAGE_SIZE // 4  # vae factor 2 x packing 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(FLUX_TEXT_TOKENS, 3)
    return txt_ids, img_ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m examples.demo_models.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["flux", "wan", "sd3"], required=True)
    ap.add_argument("--out", required=True, help="output directory (e.g. assets/demo_flux)")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 96 (flux), 16 (wan)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables EMA)")
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument(
        "--sigma-dist",
        choices=["logit-normal", "mixed"],
        default=None,
        help="noise-level distribution: logit-normal(0, 1), or mixed = half logit-normal, half "
        "uniform (covers sigma ~ 1, where sampling starts); default: logit-normal (flux), mixed (wan)",
    )
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=500, help="checkpoint interval (0: only at the end)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--eval-steps", type=int, default=20, help="sampling steps for samples.png / the check")
    ap.add_argument(
        "--init-from",
        default=None,
        help="continue from the weights in this directory (a previous run's --out, same model); "
        "the model card then lists every command found in <out>/train_log.txt",
    )
    ap.add_argument("--no-eval", action="store_true", help="skip samples.png and the separability check")
    a = ap.parse_args(argv)
    if a.batch_size is None:
        a.batch_size = 16 if a.model == "wan" else 96
    if a.sigma_dist is None:
        a.sigma_dist = "mixed" if a.model == "wan" else "logit-normal"
    return a


class Logger:
    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")


def lr_at(step: int, a: argparse.Namespace) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.max_steps - a.warmup))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build(a: argparse.Namespace):
    """Model, class embeddings and a ``loss(step_generator) -> tensor`` closure."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    from sc_compile.demo import models as M

    from .data import load_fashion_mnist, make_clips, to_unit_range

    images, labels = load_fashion_mnist("train")
    n = images.shape[0]

    if a.model == "flux":
        model: Any = FluxTransformer2DModel(**M.flux_config())
        emb = M.flux_class_embeddings()
        txt_ids, img_ids = flux_ids()
    elif a.model == "sd3":
        model = SD3Transformer2DModel(**M.sd3_config())
        emb = M.sd3_class_embeddings()
    else:
        model = WanTransformer3DModel(**M.wan_config())
        emb = M.wan_class_embeddings()
        vae = M.VideoPixelShuffleVAE()

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        b = a.batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(b, generator=gen) < a.label_dropout] = M.NULL_CLASS
        sigma = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
        if a.sigma_dist == "mixed":
            uniform = torch.rand(b, generator=gen)
            sigma = torch.where(torch.arange(b) % 2 == 1, uniform, sigma)
        pe, pooled = emb(y)
        if a.model == "flux":
            x0 = flux_tokens(to_unit_range(images[idx]).unsqueeze(1))  # [B, 49, 16]
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(b, 1, 1)
            xt = (1 - s) * x0 + s * noise
            pred = model(
                hidden_states=xt,
                timestep=sigma,  # FluxPipeline passes t / 1000 = sigma
                pooled_projections=pooled,
                encoder_hidden_states=pe,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        elif a.model == "sd3":
            x0 = F.pixel_unshuffle(to_unit_range(images[idx]).unsqueeze(1), 2)  # [B, 4, 14, 14] (PixelShuffleVAE)
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(b, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            pred = model(
                hidden_states=xt,
                timestep=sigma * 1000.0,  # StableDiffusion3Pipeline passes the scheduler's t = 1000 sigma
                encoder_hidden_states=pe,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        else:
            clips = make_clips(images[idx], num_frames=M.WAN_NUM_FRAMES, size=M.WAN_FRAME_SIZE, seed=gen)
            x0 = vae.latents_from_frames(clips)  # [B, 8, 5, 16, 16]
            noise = torch.randn(x0.shape, generator=gen)
            s = sigma.view(b, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            pred = model(
                hidden_states=xt,
                timestep=sigma * 1000.0,  # WanPipeline passes the scheduler's t = 1000 sigma
                encoder_hidden_states=pe,
                return_dict=False,
            )[0]
        return F.mse_loss(pred.float(), noise - x0)

    return model, emb, loss_fn


def save_model(model, ema, emb, out: Path, save_dtype: str) -> float:
    """Write the (EMA) weights + class embeddings; returns the size in MB."""
    m = copy.deepcopy(model)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(m.parameters(), ema, strict=True):
                p.copy_(e)
    if save_dtype == "fp16":
        for p in m.parameters():
            p.data = p.data.to(torch.float16)
    m.save_pretrained(out, safe_serialization=True)
    emb.save(out)
    files = [out / "diffusion_pytorch_model.safetensors", out / "class_embeddings.safetensors"]
    return sum(f.stat().st_size for f in files) / 1e6


def evaluate(a: argparse.Namespace, out: Path) -> dict:
    from sc_compile.demo import models as M

    from .check import class_separability, save_grid

    loader = {"flux": M.load_flux_demo, "wan": M.load_wan_demo, "sd3": M.load_sd3_demo}[a.model]
    pipe, emb = loader(path=out)
    r = class_separability(pipe, emb, samples_per_class=2, num_inference_steps=a.eval_steps)
    s = r["samples"]
    if s.dim() == 4:  # Flux: a row per sample index, a column per class
        s = s.view(10, 2, *s.shape[1:]).transpose(0, 1).reshape(-1, *s.shape[1:])
    save_grid(s, str(out / "samples.png"))  # Wan: one clip per row, classes 0,0,1,1,...
    return r


def write_card(a, out, cfg, nparams, step, final_loss, wall, s_per_step, mb, command, eval_result, done):
    from sc_compile.demo import models as M

    status = "final" if done else f"checkpoint at step {step} (training still running)"
    if a.model == "flux":
        what = (
            "Class-conditional image model: diffusers `FluxTransformer2DModel`, run by the real "
            "`FluxPipeline`. Pixel space: 28x28 grayscale in [-1, 1], pixel-unshuffled 2x2 by the "
            "`PixelShuffleVAE` shell (4x14x14 latent), packed 2x2 by FluxPipeline into 49 tokens of "
            f"16 channels; {M.FLUX_TEXT_TOKENS} class-prompt tokens (joint attention) + pooled "
            "class embedding."
        )
        usage = (
            "```python\nfrom sc_compile.demo.models import load_flux_demo\n"
            "pipe, emb = load_flux_demo()\n"
            "imgs = pipe(**emb.pipeline_kwargs([0, 7, 9], guidance_scale=3.0), height=28, width=28,\n"
            '            num_inference_steps=20, output_type="pt").images  # [3, 1, 28, 28]\n```'
        )
        sched = "FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)"
        tconv = "timestep passed to the transformer = sigma (FluxPipeline divides t=1000*sigma by 1000)"
        cfg_note = "guidance: `true_cfg_scale` with the null class as negative prompt (no guidance embedding)"
    elif a.model == "sd3":
        what = (
            "Class-conditional image model: diffusers `SD3Transformer2DModel` (MMDiT: joint attention "
            "over image and text tokens, pooled projection in the timestep embedding), run by the real "
            "`StableDiffusion3Pipeline`. Pixel space: 28x28 grayscale in [-1, 1], pixel-unshuffled 2x2 by "
            "the `PixelShuffleVAE` shell (4x14x14 latent), patchified 2x2 by the transformer into 49 tokens "
            f"of 16 values; {M.SD3_TEXT_TOKENS} class-prompt tokens (joint attention) + pooled class embedding."
        )
        usage = (
            "```python\nfrom sc_compile.demo.models import load_sd3_demo\n"
            "pipe, emb = load_sd3_demo()\n"
            "imgs = pipe(**emb.pipeline_kwargs([0, 7, 9], guidance_scale=3.0), height=28, width=28,\n"
            '            num_inference_steps=20, output_type="pt").images  # [3, 1, 28, 28]\n```'
        )
        sched = "FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)"
        tconv = "timestep passed to the transformer = 1000*sigma (as StableDiffusion3Pipeline passes the scheduler's t)"
        cfg_note = (
            "guidance: `guidance_scale` with the null class as `negative_prompt_embeds` / "
            "`negative_pooled_prompt_embeds` (always passed: the pipeline's default is 7)"
        )
    else:
        what = (
            "Class-conditional video model: diffusers `WanTransformer3DModel`, run by the real "
            f"`WanPipeline`. Clips of {M.WAN_NUM_FRAMES} frames of {M.WAN_FRAME_SIZE}x{M.WAN_FRAME_SIZE} "
            "(a Fashion-MNIST item starting centred and upright, then drifting <=0.5 px/frame and "
            "rotating <=2.5 deg/frame); the causal `VideoPixelShuffleVAE` shell (temporal factor "
            f"{M.WAN_TEMPORAL}: frame 0 alone, then frame pairs; spatial factor {M.WAN_SPATIAL}) gives "
            "latents [B, 8, 5, 16, 16], patchified (1, 2, 2) into 320 tokens; "
            f"{M.WAN_TEXT_TOKENS} class-prompt tokens (cross attention)."
        )
        usage = (
            "```python\nfrom sc_compile.demo.models import load_wan_demo\n"
            "pipe, emb = load_wan_demo()\n"
            "clips = pipe(**emb.pipeline_kwargs([0, 7], guidance_scale=3.0), height=32, width=32,\n"
            '             num_frames=9, num_inference_steps=20, output_type="pt").frames  # [2, 9, 1, 32, 32]\n```'
        )
        sched = "FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)"
        tconv = "timestep passed to the transformer = 1000*sigma (as WanPipeline passes the scheduler's t)"
        cfg_note = "guidance: `guidance_scale` with the null class as `negative_prompt_embeds`"

    commands, history = [command], ""
    log_path = out / "train_log.txt"
    if a.init_from is not None and log_path.is_file():
        lines = log_path.read_text().splitlines()
        commands = [
            ln[2:].replace("python -m sc_compile.demo.train", "python -m examples.demo_models.train", 1)
            for ln in lines
            if ln.startswith(COMMAND_PREFIXES)
        ]
        saved = [ln for ln in lines if ln.startswith("# saved ")]
        prev = [(int(ln.split(" after ")[1].split()[0]), float(ln.split(" steps, ")[1].split()[0])) for ln in saved]
        if done:  # the last "saved" line is this run's own final save
            prev = prev[:-1]
        if prev:
            history = (
                f" (this run, continued from {len(prev)} earlier run(s) of "
                f"{sum(n for n, _ in prev)} steps / {sum(t for _, t in prev):.1f} min; total "
                f"{step + sum(n for n, _ in prev)} steps, {wall / 60 + sum(t for _, t in prev):.1f} min)"
            )
    sigma_desc = (
        "logit-normal(0, 1)"
        if a.sigma_dist == "logit-normal"
        else "logit-normal(0, 1) for half of each batch, uniform(0, 1) for the other half"
    )
    ev = ""
    if eval_result is not None:
        ev = (
            f"- class separability (`python -m examples.demo_models.check`, 2 samples/class, {a.eval_steps} steps, "
            f"guidance 3.0): nearest-class-mean accuracy **{eval_result['accuracy']:.2f}** "
            f"(margin {eval_result['margin']:.3f}); real test images: "
            f"{eval_result.get('reference', float('nan')):.2f}; "
            "an untrained model gives ~0.1\n- samples: `samples.png`\n"
        )
    import diffusers

    extra_encoders = {
        "flux": ", `tokenizer_2=None, text_encoder_2=None`",
        "sd3": ", `tokenizer_2=None, text_encoder_2=None`, `tokenizer_3=None, text_encoder_3=None`",
    }.get(a.model, "")
    in_order = "; in order; each later one continues from the weights of the one before" if len(commands) > 1 else ""
    text = f"""# sc_compile demo model: {a.model} ({status})

{what}

Class conditioning: fixed seeded embeddings (`class_embeddings.safetensors`: `prompt_embeds`
[11, T, D]{", `pooled_prompt_embeds` [11, P]" if a.model != "wan" else ""}); index 10 is the null class
(unconditional / negative prompt). No tokenizer or text encoder: the pipeline is built with
`tokenizer=None, text_encoder=None`{extra_encoders}.
Scheduler: `{sched}`. {cfg_note}.

## Usage

{usage}

## Training

- data: Fashion-MNIST train split (60000 images, Debian package `dataset-fashion-mnist`)
- objective: rectified flow, x_t = (1-s) x0 + s noise, target noise - x0, s ~ {sigma_desc}; {tconv}
- label dropout {a.label_dropout} to the null class; AdamW lr {a.lr} (warmup {a.warmup}, cosine to x{a.min_lr_ratio}),
  weight decay {a.weight_decay}, grad clip {a.grad_clip}, EMA {a.ema} (EMA weights saved, {a.save_dtype})
- steps: {step} of {a.max_steps}, batch {a.batch_size}, seed {a.seed}, threads {a.threads}{history}
- final loss (mean of the last {a.log_every} steps): {final_loss:.4f}
- wall time: {wall / 60:.1f} min ({s_per_step:.3f} s/step) on {platform.machine()} CPU, \
torch {torch.__version__}, diffusers {diffusers.__version__}
- parameters: {nparams:,}; weights + embeddings on disk: {mb:.2f} MB
{ev}
Command{"s" if len(commands) > 1 else ""} (from the repository root; the training code is \
`examples/demo_models/`, not installed{in_order}):

```
{chr(10).join(commands)}
```

## Transformer config

```json
{json.dumps(cfg, indent=2)}
```
"""
    (out / "MODEL_CARD.md").write_text(text)


def init_from(model, emb, d: Path) -> None:
    """Load the weights of a previous run (same config and class embeddings) into ``model``."""
    from safetensors.torch import load_file

    from sc_compile.demo.models import ClassEmbeddings

    saved_cfg = json.loads((d / "config.json").read_text())
    for k, v in model.config.items():
        if not k.startswith("_") and k in saved_cfg:
            sv, mv = saved_cfg[k], list(v) if isinstance(v, tuple) else v
            if sv != mv:
                raise ValueError(f"--init-from {d}: config {k}={sv!r} differs from {mv!r}")
    state = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    old = ClassEmbeddings.load(d)
    if not torch.equal(old.prompt_embeds, emb.prompt_embeds):
        raise ValueError(f"--init-from {d}: class embeddings differ")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train_log.txt")
    command = "python -m examples.demo_models.train " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)
    )

    model, emb, loss_fn = build(a)
    if a.init_from is not None:
        init_from(model, emb, Path(a.init_from))
    model.train()
    cfg = dict(model.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    nparams = sum(p.numel() for p in model.parameters())
    log(f"# {command}")
    log(f"# model={a.model} params={nparams:,} batch={a.batch_size} threads={a.threads} pid={os.getpid()}")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": a.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, 0.99),
    )
    ema = [p.detach().clone() for p in model.parameters()] if a.ema > 0 else None
    gen = torch.Generator().manual_seed(a.seed)

    t0 = time.time()
    window: list[float] = []
    final_loss = float("nan")
    step = 0
    mb = 0.0
    while step < a.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step += 1
        if ema is not None:
            d = min(a.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(model.parameters()), 1 - d)
        window.append(loss.item())
        elapsed = time.time() - t0
        out_of_time = a.max_minutes is not None and elapsed > a.max_minutes * 60
        last = step == a.max_steps or out_of_time
        if step % a.log_every == 0 or last:
            final_loss = sum(window) / len(window)
            log(
                f"step {step:6d} loss {final_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"gnorm {float(gnorm):.3f} {elapsed / step:.3f}s/step elapsed {elapsed / 60:.1f}min"
            )
            window = []
        if a.save_every and step % a.save_every == 0 and not last:
            mb = save_model(model, ema, emb, out, a.save_dtype)
            write_card(
                a,
                out,
                cfg,
                nparams,
                step,
                final_loss,
                elapsed,
                elapsed / step,
                mb,
                command,
                None,
                False,
            )
            log(f"# checkpoint saved at step {step}")
        if out_of_time:
            log(f"# stopping at step {step}: --max-minutes {a.max_minutes} reached")
            break

    wall = time.time() - t0
    mb = save_model(model, ema, emb, out, a.save_dtype)
    log(f"# saved {out} ({mb:.2f} MB) after {step} steps, {wall / 60:.1f} min, {wall / max(step, 1):.3f} s/step")
    eval_result = None
    if not a.no_eval:
        from .check import reference_accuracy

        eval_result = evaluate(a, out)
        eval_result["reference"] = reference_accuracy()
        log(
            f"# class separability: accuracy {eval_result['accuracy']:.3f} margin {eval_result['margin']:.4f} "
            f"(reference on real test images {eval_result['reference']:.3f})"
        )
    write_card(
        a,
        out,
        cfg,
        nparams,
        step,
        final_loss,
        wall,
        wall / max(step, 1),
        mb,
        command,
        eval_result,
        True,
    )
    log("# done")


if __name__ == "__main__":
    main()
