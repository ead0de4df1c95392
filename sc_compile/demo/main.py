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


# Pixels per step in the strip, before the picture is scaled up.
STRIP_CELL = 8
PICTURE_SCALE = 3
FONT_SIZE = 16


@dataclasses.dataclass(frozen=True)
class PictureCaptions:
    """What the demo picture says, beside what it shows."""

    uncached: str  # over the left grid
    cached: str  # over the right grid
    strip: str  # under the step strip: what its cells mean
    summary: str  # the last line: speed-up, full steps, fidelity


def _step_strip(num_steps: int, full_steps: tuple[int, ...], cell: int = STRIP_CELL) -> torch.Tensor:
    """A strip of ``num_steps`` cells: white for full steps, dark grey for cached ones."""
    strip = torch.zeros(cell, num_steps * cell)
    for step in range(num_steps):
        strip[:, step * cell : (step + 1) * cell - 1] = 1.0 if step in full_steps else 0.3
    return strip


def _grid(samples: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] images -> one row; [N, F, 1, H, W] clips -> a row per clip."""
    samples = samples.detach().float().cpu().clamp(0, 1)
    if samples.dim() == 5:
        return torch.cat([torch.cat(list(clip[:, 0]), dim=1) for clip in samples], dim=0)
    return torch.cat(list(samples[:, 0]), dim=1)


def _image(pixels: torch.Tensor, scale: int) -> Any:
    from PIL import Image

    image = Image.fromarray((pixels.numpy() * 255).round().astype("uint8"), mode="L")
    return image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)


def _font() -> Any:
    from PIL import ImageFont, features

    # Pillow's own scalable font where FreeType is built in, else its small bitmap font.
    return ImageFont.load_default(size=FONT_SIZE) if features.check("freetype2") else ImageFont.load_default()


def write_picture(
    path: Path,
    uncached: torch.Tensor,
    cached: torch.Tensor,
    num_steps: int,
    full_steps: tuple[int, ...],
    captions: PictureCaptions,
    scale: int = PICTURE_SCALE,
) -> None:
    """Both grids side by side under their labels, the step strip with its legend, the summary."""
    from PIL import Image, ImageDraw

    left, right = _image(_grid(uncached), scale), _image(_grid(cached), scale)
    strip = _image(_step_strip(num_steps, full_steps), scale)
    font = _font()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    line = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 6
    gap = 4 * scale
    texts = (captions.uncached, captions.cached, captions.strip, captions.summary)
    width = max(left.width + gap + right.width, strip.width, *(int(measure.textlength(t, font=font)) for t in texts))
    right_x = max(left.width + gap, int(measure.textlength(captions.uncached, font=font)) + 2 * gap)
    width = max(width, right_x + right.width, right_x + int(measure.textlength(captions.cached, font=font)))
    grids_y = line
    strip_y = grids_y + max(left.height, right.height) + gap
    height = strip_y + strip.height + 2 * line + gap
    canvas = Image.new("L", (width + 2 * gap, height + gap), color=0)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), captions.uncached, fill=255, font=font)
    draw.text((gap + right_x, 2), captions.cached, fill=255, font=font)
    canvas.paste(left, (gap, grids_y))
    canvas.paste(right, (gap + right_x, grids_y))
    canvas.paste(strip, (gap, strip_y))
    draw.text((gap, strip_y + strip.height + 2), captions.strip, fill=255, font=font)
    draw.text((gap, strip_y + strip.height + 2 + line), captions.summary, fill=255, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def compile_notice(compiler: str, threads: int) -> str:
    """What the wait before the first samples is, and roughly how long it takes.

    Measured on one thread of a shared 2-core CPU: with an empty on-disk cache Inductor took
    81 s / 76 s (Flux demo, uncached / ScalingCache) and 69 s / 95 s (Wan demo), from a warm one
    9 s / 25 s (Flux); eager about 2 s.
    """
    if compiler != "inductor":
        return f"compiling on the first generation ({compiler}: a few seconds)"
    return (
        f"compiling on the first generation with Inductor: 1-2 minutes on {threads} CPU thread(s) the first "
        "time on this machine, under half a minute once Inductor's on-disk cache holds it"
    )


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
    print(f"      {compile_notice(args.compiler, args.threads)}", flush=True)
    uncached = _timed(pipe, generate)
    torch._dynamo.reset()

    options: dict[str, Any] = {"compiler": args.compiler}
    if args.warmup_steps is not None:
        options["warmup_steps"] = args.warmup_steps
    pipe.transformer = torch.compile(transformer, backend="scalingcache", options=options)
    # The pipeline's step clock: a generation per pipeline call, its steps from the scheduler.
    sc_compile.enable(pipe)
    print(f"[2/2] scalingcache: {num_samples} samples x {steps} steps ...", flush=True)
    print(f"      {compile_notice(args.compiler, args.threads)}", flush=True)
    cached = _timed(pipe, generate)
    report = sc_compile.report(transformer)

    reference = uncached.samples.reshape(-1, *uncached.samples.shape[-3:])
    ours = cached.samples.reshape(-1, *cached.samples.shape[-3:])
    speedup = uncached.seconds / cached.seconds
    psnr_db, ssim_value = psnr(ours, reference), ssim(ours, reference)
    picture = Path(args.out) / f"demo_{model}.png"
    captions = PictureCaptions(
        uncached=f"uncached ({uncached_backend}): every step full",
        cached=f"ScalingCache: {report.num_full_steps} of {report.num_steps} steps full",
        strip=f"steps 1-{report.num_steps}, left to right: white = full step, grey = cached step",
        summary=f"speed-up {speedup:.2f}x wall time, {report.speedup:.2f}x fewer full steps; "
        f"PSNR {psnr_db:.1f} dB, SSIM {ssim_value:.4f} against uncached",
    )
    write_picture(picture, uncached.samples, cached.samples, report.num_steps, report.full_steps, captions)
    print(report)
    print(
        f"model:          demo {model} ({type(transformer).__name__}, "
        f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters)"
    )
    print(f"steps:          {report.num_steps}")
    print(f"full steps:     {report.num_full_steps} ({report.speedup:.2f}x fewer full evaluations)")
    print(f"uncached time:  {uncached.seconds:.2f} s (compile {uncached.compile_seconds:.1f} s)")
    print(f"cached time:    {cached.seconds:.2f} s (compile {cached.compile_seconds:.1f} s)")
    print(f"speed-up:       {speedup:.2f}x wall time")
    print(f"PSNR:           {psnr_db:.2f} dB")
    print(f"SSIM:           {ssim_value:.4f}")
    print(f"picture:        {picture} (labelled: left uncached, right ScalingCache; strip: white = full step)")
    return 0
