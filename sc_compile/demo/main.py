"""The main job: ``sc-compile demo`` — uncached against ScalingCache on a shipped trained model.

Generates one sample per class through the real diffusers pipeline, uncached (Inductor) and with
``backend="scalingcache"`` (the α table shipped beside the weights). Both compiled models stay
alive (two pipelines around the one transformer), each is compiled and warmed by a first
generation, then the two generations are timed in interleaved repeats, so that load on the machine
falls on both alike. Prints steps, full steps, the median and range of the wall time of each
(compile excluded, reported apart), the paired speed-up beside its ideal (steps / full steps), and
PSNR/SSIM of the cached samples against the uncached ones. Writes a PNG with both grids, the class
names, and a strip of which steps ran in full.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_STEPS = {"flux": 28, "wan": 20}
DEFAULT_SAMPLES = {"flux": 10, "wan": 4}
DEFAULT_REPEATS = 3
# Per-repeat speed-ups spread wider than this fraction of the speed-up: the timings were disturbed.
DISAGREEMENT = 0.25


@dataclasses.dataclass
class TimedRuns:
    """The timed generations of one compiled pipeline."""

    samples: torch.Tensor
    first_seconds: float  # compile + one generation
    seconds: list[float]  # generations after the first, in the order they ran

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def compile_seconds(self) -> float:
        return max(0.0, self.first_seconds - self.median)


def first_generation(generate: Callable[[], torch.Tensor]) -> TimedRuns:
    """The first (compiling, warming) generation."""
    start = time.perf_counter()
    samples = generate()
    return TimedRuns(samples, time.perf_counter() - start, [])


def time_interleaved(runs: Sequence[tuple[TimedRuns, Callable[[], torch.Tensor]]], repeats: int) -> None:
    """Time every generation ``repeats`` times, interleaved and in alternating order (A B, B A,
    ...), so that a change of load on the machine falls on all of them alike."""
    for repeat in range(repeats):
        for timed, generate in runs if repeat % 2 == 0 else list(reversed(runs)):
            start = time.perf_counter()
            generate()
            timed.seconds.append(time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class SpeedUp:
    """The wall-time speed-up of interleaved runs, against what skipping steps allows."""

    uncached: tuple[float, ...]  # seconds per generation, in the order they ran
    cached: tuple[float, ...]
    ideal: float  # steps / full steps: the speed-up if a cached step cost nothing

    @property
    def median(self) -> float:
        """Median uncached time over median cached time (the ratio of the times printed)."""
        return statistics.median(self.uncached) / statistics.median(self.cached)

    @property
    def ratios(self) -> tuple[float, ...]:
        """Uncached over cached time of each repeat (runs next to each other): the spread."""
        return tuple(u / c for u, c in zip(self.uncached, self.cached, strict=True))

    @property
    def plausible(self) -> bool:
        """A cached step still runs part of the model and the pipeline runs around it, so the
        speed-up cannot exceed the ideal; a measured one above it says the timings were disturbed."""
        return self.median <= self.ideal

    @property
    def disturbed(self) -> bool:
        """Whether the repeats' ratios spread wider than ``DISAGREEMENT`` of the speed-up."""
        return (max(self.ratios) - min(self.ratios)) > DISAGREEMENT * self.median

    def describe(self) -> str:
        spread = f"{len(self.ratios)} repeats range {min(self.ratios):.2f}-{max(self.ratios):.2f}x"
        if self.plausible:
            text = (
                f"{self.median:.2f}x wall time (median times; {spread}); ideal {self.ideal:.2f}x (steps / full steps)"
            )
            if self.disturbed:
                text += (
                    f"; the repeats disagree by more than {DISAGREEMENT:.0%} (other load on the machine): rerun on "
                    "a quieter machine or with more --repeats before quoting it"
                )
            return text
        return (
            f"not measured: the ratio of the median times ({self.median:.2f}x; {spread}) is above the ideal "
            f"{self.ideal:.2f}x (steps / full steps), which skipping steps cannot exceed, so other load on the "
            "machine changed the timings (machine noise); rerun on a quieter machine or with more --repeats"
        )


def describe_times(timed: TimedRuns) -> str:
    return (
        f"{timed.median:.2f} s median of {len(timed.seconds)} (range {min(timed.seconds):.2f}-"
        f"{max(timed.seconds):.2f} s); compile {timed.compile_seconds:.1f} s, not counted"
    )


# Pixels per step in the strip, before the picture is scaled up.
STRIP_CELL = 8
PICTURE_SCALE = 3
FONT_SIZE = 16
DIVIDER_VALUE = 100  # the vertical line between the two halves
# Images per row of the Flux grids (10 samples: two rows of five).
MAX_COLUMNS = 5


@dataclasses.dataclass(frozen=True)
class PictureCaptions:
    """What the demo picture says, beside what it shows."""

    uncached: str  # over the left grid
    cached: str  # over the right grid
    strip: str  # under the step strip: what its cells mean
    summary: str  # the last lines ("\n" between them): speed-up, full steps, fidelity
    layout: str = ""  # under the grids: how they are laid out (rows, columns)


def _step_strip(num_steps: int, full_steps: tuple[int, ...], cell: int = STRIP_CELL) -> torch.Tensor:
    """A strip of ``num_steps`` cells: white for full steps, dark grey for cached ones."""
    strip = torch.zeros(cell, num_steps * cell)
    for step in range(num_steps):
        strip[:, step * cell : (step + 1) * cell - 1] = 1.0 if step in full_steps else 0.3
    return strip


def _tiles(samples: torch.Tensor) -> list[torch.Tensor]:
    """[N, 1, H, W] images -> N images; [N, F, 1, H, W] clips -> N strips of F frames."""
    samples = samples.detach().float().cpu().clamp(0, 1)
    if samples.dim() == 5:
        return [torch.cat(list(clip[:, 0]), dim=1) for clip in samples]
    return list(samples[:, 0])


def _image(pixels: torch.Tensor, scale: int) -> Any:
    from PIL import Image

    image = Image.fromarray((pixels.numpy() * 255).round().astype("uint8"), mode="L")
    return image.resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.Resampling.NEAREST)


def _font() -> Any:
    from PIL import ImageFont, features

    # Pillow's own scalable font where FreeType is built in, else its small bitmap font.
    return ImageFont.load_default(size=FONT_SIZE) if features.check("freetype2") else ImageFont.load_default()


def _labelled_grid(samples: torch.Tensor, labels: Sequence[str], columns: int, scale: int, font: Any) -> Any:
    """The samples in rows of ``columns``, each with its label under it (no labels: none)."""
    from PIL import Image, ImageDraw

    tiles = [_image(tile, scale) for tile in _tiles(samples)]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    line = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 4 if labels else 0
    pad = 2 * scale
    cell_width = max(tile.width for tile in tiles) + pad
    if labels:
        cell_width = max(cell_width, *(int(measure.textlength(label, font=font)) + pad for label in labels))
    cell_height = max(tile.height for tile in tiles) + line + pad
    rows = -(-len(tiles) // columns)
    grid = Image.new("L", (cell_width * min(columns, len(tiles)), cell_height * rows), color=0)
    draw = ImageDraw.Draw(grid)
    for index, tile in enumerate(tiles):
        x, y = (index % columns) * cell_width, (index // columns) * cell_height
        grid.paste(tile, (x + (cell_width - tile.width) // 2, y))
        if labels:
            label = labels[index]
            width = int(measure.textlength(label, font=font))
            draw.text((x + (cell_width - width) // 2, y + tile.height + 1), label, fill=255, font=font)
    return grid


def write_picture(
    path: Path,
    uncached: torch.Tensor,
    cached: torch.Tensor,
    num_steps: int,
    full_steps: tuple[int, ...],
    captions: PictureCaptions,
    labels: Sequence[str] = (),
    columns: int | None = None,
    scale: int = PICTURE_SCALE,
) -> None:
    """Both grids side by side under their captions with a divider between them, each sample with
    its label under it, the layout line, the step strip with its legend, the summary.

    ``columns``: samples per row (default: one clip per row for clips, at most ``MAX_COLUMNS``
    images per row for images)."""
    from PIL import Image, ImageDraw

    if columns is None:
        columns = 1 if uncached.dim() == 5 else min(MAX_COLUMNS, uncached.shape[0])
    font = _font()
    left = _labelled_grid(uncached, labels, columns, scale, font)
    right = _labelled_grid(cached, labels, columns, scale, font)
    strip = _image(_step_strip(num_steps, full_steps), scale)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    line = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 6
    gap = 4 * scale

    def text_width(text: str) -> int:
        return int(measure.textlength(text, font=font))

    summary = captions.summary.split("\n")
    notes = ([captions.layout] if captions.layout else []) + [captions.strip, *summary]
    half = max(left.width, text_width(captions.uncached) + gap)
    right_x = half + 2 * gap  # the divider sits in the middle of the 2 * gap between the halves
    width = max(right_x + max(right.width, text_width(captions.cached)), strip.width, *map(text_width, notes))
    grids_y = line
    notes_y = grids_y + max(left.height, right.height) + gap
    layout_lines = 1 if captions.layout else 0
    strip_y = notes_y + layout_lines * line
    height = strip_y + strip.height + (1 + len(summary)) * line + gap
    canvas = Image.new("L", (width + 2 * gap, height + gap), color=0)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), captions.uncached, fill=255, font=font)
    draw.text((gap + right_x, 2), captions.cached, fill=255, font=font)
    canvas.paste(left, (gap, grids_y))
    canvas.paste(right, (gap + right_x, grids_y))
    divider_x = gap + half + gap
    draw.line([(divider_x, 0), (divider_x, notes_y - gap // 2)], fill=DIVIDER_VALUE, width=2)
    if captions.layout:
        draw.text((gap, notes_y), captions.layout, fill=255, font=font)
    canvas.paste(strip, (gap, strip_y))
    for index, text in enumerate([captions.strip, *summary]):
        draw.text((gap, strip_y + strip.height + 2 + index * line), text, fill=255, font=font)
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
    from sc_compile.demo.models import (
        CLASS_NAMES,
        build_flux_pipeline,
        build_wan_pipeline,
        load_flux_demo,
        load_wan_demo,
    )
    from sc_compile.demo.sampling import generate as generate_samples
    from sc_compile.metrics import psnr, ssim

    threads = torch.get_num_threads()
    model = args.model
    steps = args.steps or DEFAULT_STEPS[model]
    num_samples = args.samples or DEFAULT_SAMPLES[model]
    repeats = args.repeats
    labels = [i % 10 for i in range(num_samples)]
    uncached_pipe, embeddings = (load_flux_demo if model == "flux" else load_wan_demo)()
    transformer = uncached_pipe.transformer
    # Two pipelines around the one transformer, each with its compiled model: both stay compiled,
    # so their generations can be timed in turn (Dynamo keeps one compiled entry per backend).
    cached_pipe = (build_flux_pipeline if model == "flux" else build_wan_pipeline)(transformer)

    uncached_backend = "inductor" if args.compiler == "inductor" else args.compiler
    uncached_pipe.transformer = torch.compile(transformer, backend=uncached_backend)
    options: dict[str, Any] = {"compiler": args.compiler}
    if args.warmup_steps is not None:
        options["warmup_steps"] = args.warmup_steps
    cached_pipe.transformer = torch.compile(transformer, backend="scalingcache", options=options)
    # The pipeline's step clock: a generation per pipeline call, its steps from the scheduler.
    sc_compile.enable(cached_pipe)

    def generator(pipe: Any) -> Callable[[], torch.Tensor]:
        return lambda: generate_samples(pipe, embeddings, labels, args.guidance_scale, steps, seed=0)

    generate_uncached, generate_cached = generator(uncached_pipe), generator(cached_pipe)
    print(f"[1/3] uncached ({uncached_backend}): {num_samples} samples x {steps} steps ...", flush=True)
    print(f"      {compile_notice(args.compiler, threads)}", flush=True)
    uncached = first_generation(generate_uncached)
    print(f"[2/3] scalingcache: {num_samples} samples x {steps} steps ...", flush=True)
    print(f"      {compile_notice(args.compiler, threads)}", flush=True)
    cached = first_generation(generate_cached)
    print(f"[3/3] timing: {repeats} generations of each, interleaved ...", flush=True)
    time_interleaved([(uncached, generate_uncached), (cached, generate_cached)], repeats)
    report = sc_compile.report(transformer)

    reference = uncached.samples.reshape(-1, *uncached.samples.shape[-3:])
    ours = cached.samples.reshape(-1, *cached.samples.shape[-3:])
    speedup = SpeedUp(tuple(uncached.seconds), tuple(cached.seconds), report.speedup)
    psnr_db, ssim_value = psnr(ours, reference), ssim(ours, reference)
    picture = Path(args.out) / f"demo_{model}.png"
    names = [CLASS_NAMES[label] for label in labels]
    wall = (
        f"speed-up {speedup.median:.2f}x wall time (median of {repeats}), ideal {speedup.ideal:.2f}x"
        if speedup.plausible
        else f"wall-time speed-up not measured (machine noise), ideal {speedup.ideal:.2f}x"
    )
    captions = PictureCaptions(
        uncached=f"uncached ({uncached_backend}): every step full",
        cached=f"ScalingCache: {report.num_full_steps} of {report.num_steps} steps full",
        layout=(
            f"rows are clips (its class under each), columns are frames 1-{uncached.samples.shape[1]}"
            if uncached.samples.dim() == 5
            else "one sample per class, the same seed in both halves"
        ),
        strip=f"steps 1-{report.num_steps}, left to right: white = full step, grey = cached step",
        summary=f"{wall}\nPSNR {psnr_db:.1f} dB, SSIM {ssim_value:.4f} against uncached",
    )
    write_picture(picture, uncached.samples, cached.samples, report.num_steps, report.full_steps, captions, names)
    print(report)
    parameters = sum(p.numel() for p in transformer.parameters()) / 1e6
    print(f"model:          demo {model} ({type(transformer).__name__}, {parameters:.2f}M parameters)")
    print(f"steps:          {report.num_steps}")
    print(f"full steps:     {report.num_full_steps} ({report.speedup:.2f}x fewer full evaluations)")
    print(f"uncached time:  {describe_times(uncached)}")
    print(f"cached time:    {describe_times(cached)}")
    print(f"speed-up:       {speedup.describe()}")
    print(f"PSNR:           {psnr_db:.2f} dB")
    print(f"SSIM:           {ssim_value:.4f}")
    print(f"picture:        {picture} (left uncached, right ScalingCache, class names under the samples)")
    return 0
