"""The main job: ``sc-compile demo`` — uncached against ScalingCache on a shipped trained model.

Generates one sample per class through the real diffusers pipeline twice, uncached (Inductor) and
with ``backend="scalingcache"`` (the α table shipped beside the weights), and prints steps, full
steps, wall time of each (compile excluded, reported apart), the speed-up, and PSNR/SSIM of the
cached samples against the uncached ones. Writes a PNG with both grids side by side and a strip of
which steps ran in full.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_STEPS = {"flux": 28, "wan": 20}
DEFAULT_SAMPLES = {"flux": 10, "wan": 4}


@dataclasses.dataclass
class TimedRun:
    samples: torch.Tensor
    first_seconds: float  # compile + one generation
    seconds: float  # one generation, compiled

    @property
    def compile_seconds(self) -> float:
        return max(0.0, self.first_seconds - self.seconds)


def _timed(pipe: Any, generate) -> TimedRun:
    start = time.perf_counter()
    generate()
    first = time.perf_counter() - start
    start = time.perf_counter()
    samples = generate()
    return TimedRun(samples, first, time.perf_counter() - start)


def _step_strip(num_steps: int, full_steps: tuple[int, ...], width: int, cell: int = 8) -> torch.Tensor:
    """A strip of ``num_steps`` cells: white for full steps, dark for cached ones."""
    strip = torch.full((cell, num_steps * cell), 0.2)
    for step in full_steps:
        strip[:, step * cell : (step + 1) * cell - 1] = 1.0
    canvas = torch.zeros(cell, max(width, num_steps * cell))
    canvas[:, : strip.shape[1]] = strip
    return canvas


def _grid(samples: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] images -> one row; [N, F, 1, H, W] clips -> a row per clip."""
    samples = samples.detach().float().cpu().clamp(0, 1)
    if samples.dim() == 5:
        return torch.cat([torch.cat(list(clip[:, 0]), dim=1) for clip in samples], dim=0)
    return torch.cat(list(samples[:, 0]), dim=1)


def write_picture(path: Path, uncached: torch.Tensor, cached: torch.Tensor, num_steps: int, full_steps: tuple[int, ...]) -> None:
    from PIL import Image

    left, right = _grid(uncached), _grid(cached)
    gap = torch.ones(left.shape[0], 4)
    top = torch.cat([left, gap, right], dim=1)
    strip = _step_strip(num_steps, full_steps, top.shape[1])
    spacer = torch.zeros(4, top.shape[1])
    picture = torch.cat([top, spacer, strip[:, : top.shape[1]]], dim=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture.numpy() * 255).round().astype("uint8"), mode="L").resize(
        (picture.shape[1] * 3, picture.shape[0] * 3), Image.Resampling.NEAREST
    ).save(path)


def run_demo(args: argparse.Namespace) -> int:
    import sc_compile
    from sc_compile.demo.models import load_flux_demo, load_wan_demo
    from sc_compile.demo.sampling import generate as generate_samples
    from sc_compile.metrics import psnr, ssim

    torch.set_num_threads(args.threads)
    model = args.model
    steps = args.steps or DEFAULT_STEPS[model]
    num_samples = args.samples or DEFAULT_SAMPLES[model]
    labels = [i % 10 for i in range(num_samples)]
    pipe, embeddings = (load_flux_demo if model == "flux" else load_wan_demo)()
    transformer = pipe.transformer

    def generate() -> torch.Tensor:
        return generate_samples(pipe, embeddings, labels, args.guidance_scale, steps, seed=0)

    uncached_backend = "inductor" if args.compiler == "inductor" else args.compiler
    pipe.transformer = torch.compile(transformer, backend=uncached_backend)
    print(f"[1/2] uncached ({uncached_backend}): {num_samples} samples x {steps} steps ...", flush=True)
    uncached = _timed(pipe, generate)
    torch._dynamo.reset()

    options: dict[str, Any] = {"compiler": args.compiler, "num_inference_steps": steps}
    if args.warmup_steps is not None:
        options["warmup_steps"] = args.warmup_steps
    pipe.transformer = torch.compile(transformer, backend="scalingcache", options=options)
    print(f"[2/2] scalingcache: {num_samples} samples x {steps} steps ...", flush=True)
    cached = _timed(pipe, generate)
    report = sc_compile.report(transformer)

    picture = Path(args.out) / f"demo_{model}.png"
    write_picture(picture, uncached.samples, cached.samples, report.num_steps, report.full_steps)
    reference = uncached.samples.reshape(-1, *uncached.samples.shape[-3:])
    ours = cached.samples.reshape(-1, *cached.samples.shape[-3:])
    speedup = uncached.seconds / cached.seconds
    print(report)
    print(f"model:          demo {model} ({type(transformer).__name__}, {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters)")
    print(f"steps:          {report.num_steps}")
    print(f"full steps:     {report.num_full_steps} ({report.speedup:.2f}x fewer full evaluations)")
    print(f"uncached time:  {uncached.seconds:.2f} s (compile {uncached.compile_seconds:.1f} s)")
    print(f"cached time:    {cached.seconds:.2f} s (compile {cached.compile_seconds:.1f} s)")
    print(f"speed-up:       {speedup:.2f}x wall time")
    print(f"PSNR:           {psnr(ours, reference):.2f} dB")
    print(f"SSIM:           {ssim(ours, reference):.4f}")
    print(f"picture:        {picture} (left uncached, right ScalingCache; strip: white = full step)")
    return 0
