"""The shipped demo models are trained, the main job runs, the training scripts run, metrics."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sc_compile.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parents[1]

# Measured on this machine for `sc-compile demo --steps 10 --samples 4` on the shipped Flux model
# (the shipped 28-step α table, resampled to 10 steps): 34.2 dB with 5 full steps. The same run
# with α = 1 gives 30.3 dB (6 full), with α negated 27.9 dB (6 full), and with α = 0 (plain reuse
# of the last full step) 17.5 dB (2 full). The floor separates the calibrated prediction from all
# of those; the run is seeded and deterministic on the CPU.
DEMO_PSNR_FLOOR = 32.0


def test_metrics_match_scikit_image():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 1, 28, 28, generator=generator)
    noisy = (reference + 0.1 * torch.randn(reference.shape, generator=generator)).clamp(0, 1)
    expected_ssim = np.mean(
        [
            structural_similarity(
                noisy[i, 0].numpy(),
                reference[i, 0].numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
            for i in range(3)
        ]
    )
    assert ssim(noisy, reference) == pytest.approx(expected_ssim, abs=1e-6)
    assert psnr(noisy, reference) == pytest.approx(
        peak_signal_noise_ratio(reference.numpy(), noisy.numpy(), data_range=1.0), abs=1e-6
    )
    assert psnr(reference, reference) == float("inf")


# Nearest Fashion-MNIST class mean of generated samples (first frame for the video model), at 10
# steps with guidance 3.0, one sample per class. Measured: Flux trained 0.9-1.0 (margin +1.6 to
# +1.85), random 0.10 (margin -1.16); Wan trained 0.70 (margin +0.39), random 0.10 (margin -1.30);
# SD3 trained 0.90 (margin +1.60), random 0.10 (margin -1.25); real test images 0.68. The floors sit
# between the trained and the random models' values.
FLOORS = {"flux": (0.7, 0.0), "wan": (0.5, 0.0), "sd3": (0.7, 0.0)}


@pytest.mark.parametrize("model", ["flux", "wan", "sd3"])
def test_shipped_weights_are_trained(model):
    # The separability check is an example outside the library: run it as its documentation says.
    command = [
        sys.executable,
        "-m",
        "examples.demo_models.check",
        "--model",
        model,
        "--samples-per-class",
        "1",
        "--steps",
        "10",
        "--guidance",
        "3.0",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    accuracy = float(re.search(r"^accuracy=([\d.]+)", output, re.M).group(1))
    margin = float(re.search(r"^accuracy=\S+ margin=(-?[\d.]+)", output, re.M).group(1))
    accuracy_floor, margin_floor = FLOORS[model]
    assert accuracy >= accuracy_floor, output
    assert margin > margin_floor, output


@pytest.mark.slow
def test_demo_main_job_runs_and_keeps_fidelity(tmp_path):
    command = [
        sys.executable,
        "-m",
        "sc_compile",
        "demo",
        "--steps",
        "10",
        "--samples",
        "4",
        "--compiler",
        "aot_eager",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Nothing but our own output: no notices of diffusers, transformers or torch on the console.
    assert result.stderr == "", result.stderr
    output = result.stdout
    psnr_db = float(re.search(r"PSNR:\s+([\d.]+) dB", output).group(1))
    full_steps = int(re.search(r"full steps:\s+(\d+)", output).group(1))
    # Before each first (compiling) generation, the wait is announced with what it is.
    assert output.count("compiling on the first generation (aot_eager") == 2, output
    assert psnr_db > DEMO_PSNR_FLOOR, output
    assert full_steps < 10, output
    assert (tmp_path / "demo_flux.png").is_file()
    # Timed in interleaved repeats after a warm first generation: median and range of each, the
    # paired speed-up (or why none is given) beside the ideal steps / full steps.
    assert re.search(r"uncached time:\s+[\d.]+ s median of 3 \(range [\d.]+-[\d.]+ s\); compile", output), output
    assert re.search(r"cached time:\s+[\d.]+ s median of 3 \(range", output), output
    ideal = 10 / full_steps
    assert re.search(rf"speed-up:\s+(.*3 repeats range .*ideal {ideal:.2f}x)", output), output
    assert re.search(r"^threads:\s+\d+ \(torch's default", output, re.M), output


@pytest.mark.parametrize("model", ["flux", "wan", "sd3"])
def test_training_script_runs_a_few_steps(tmp_path, model):
    command = [
        sys.executable,
        "-m",
        "examples.demo_models.train",
        "--model",
        model,
        "--out",
        str(tmp_path),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--log-every",
        "1",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "MODEL_CARD.md").is_file()


def test_demo_size_sees_through_torch_compile():
    from sc_compile.demo.models import WAN_FRAME_SIZE, WAN_NUM_FRAMES, random_wan_demo
    from sc_compile.demo.sampling import demo_size

    pipe, _ = random_wan_demo()
    expected = {"height": WAN_FRAME_SIZE, "width": WAN_FRAME_SIZE, "num_frames": WAN_NUM_FRAMES}
    assert demo_size(pipe) == expected
    pipe.transformer = torch.compile(pipe.transformer, backend="scalingcache")  # wraps; compiles on first call
    assert demo_size(pipe) == expected


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_shipped_residual_alpha_table_is_picked_for_residual_prediction(model, caplog):
    """alpha=None finds the table of the compiled layout: the residual one for prediction="residual"."""
    import sc_compile
    from sc_compile.demo.models import random_flux_demo, random_wan_demo
    from sc_compile.demo.sampling import generate

    pipe, emb = (random_flux_demo if model == "flux" else random_wan_demo)()
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "eager", "prediction": "residual"}
    )
    with caplog.at_level(logging.INFO, logger="sc_compile.calibration.table"):
        generate(pipe, emb, [1], num_inference_steps=3)
    assert re.search(rf"using the shipped α table \S*alpha_{model}_\d+steps_residual\.safetensors", caplog.text)
    assert "the table shipped with sc_compile" in sc_compile.report(transformer).alpha_source


def test_demo_picture_says_what_it_shows(tmp_path):
    """Captions over both grids with a divider between them, a label under every sample, rows of
    at most five images, the step strip with one cell per step, its legend and the summary."""
    from PIL import Image

    from sc_compile.demo.main import (
        DIVIDER_VALUE,
        PICTURE_SCALE,
        STRIP_CELL,
        PictureCaptions,
        write_picture,
    )

    samples = torch.full((10, 1, 28, 28), 0.5)  # uniform grids: every other non-black pixel is text or strip
    captions = PictureCaptions(
        "uncached (eager): every step full",
        "ScalingCache: 3 of 6 steps full",
        "steps 1-6: white = full step, grey = cached step",
        "speed-up 1.50x\nPSNR 30.0 dB",
        layout="one sample per class",
    )
    path = tmp_path / "demo.png"
    labels = [f"class {i}" for i in range(10)]
    write_picture(path, samples, samples, 6, (0, 1, 3), captions, labels)
    image = np.asarray(Image.open(path)).astype(int)
    height, width = image.shape
    assert width / height < 4, (width, height)  # two rows of samples, not one long row
    grid_value = round(0.5 * 255)
    tile = 28 * PICTURE_SCALE
    grid_rows = np.flatnonzero((image == grid_value).sum(axis=1) >= tile)
    # Two rows of tiles per grid: a break in the grid rows, with the labels of the first row in it.
    row_breaks = np.flatnonzero(np.diff(grid_rows) > 1)
    assert len(row_breaks) == 1, grid_rows
    first_row_bottom, second_row_top = grid_rows[row_breaks[0]], grid_rows[row_breaks[0] + 1]
    assert (image[first_row_bottom + 1 : second_row_top] > 200).any(), "no labels under the first row"
    top, bottom = grid_rows.min(), grid_rows.max()
    assert (image[bottom + 1 : bottom + 1 + 3 * 16] > 200).any(), "no labels under the second row"
    grid_columns = np.flatnonzero(image[top] == grid_value)
    assert len(grid_columns) == 2 * 5 * tile, "five images per row in each grid"
    # The divider: a vertical line between the two grids, from the captions to under the grids.
    column_gaps = np.flatnonzero(np.diff(grid_columns) > 1)
    widest = column_gaps[np.argmax(np.diff(grid_columns)[column_gaps])]
    left_end, right_start = grid_columns[widest], grid_columns[widest + 1]
    divider = [x for x in range(left_end + 1, right_start) if (image[top:bottom, x] == DIVIDER_VALUE).all()]
    assert divider, "no divider between the halves"
    header = image[:top]
    assert (header[:, :left_end] > 200).any(), "no caption over the uncached grid"
    assert (header[:, right_start:] > 200).any(), "no caption over the cached grid"
    # The strip: one cell per step, white where the step ran in full, grey where it was cached.
    cell = STRIP_CELL * PICTURE_SCALE
    left = PICTURE_SCALE * 4  # the margin
    centres = [left + step * cell + cell // 2 for step in range(6)]
    expected = [255, 255, round(0.3 * 255), 255, round(0.3 * 255), round(0.3 * 255)]
    strip_rows = [y for y in range(bottom + 1, height) if list(image[y, centres]) == expected]
    assert strip_rows, "no step strip with full steps 0, 1, 3"
    below_strip = image[max(strip_rows) + 1 :]
    text_rows = np.flatnonzero((below_strip > 200).any(axis=1))
    # The legend and the two summary lines: three lines of text under the strip.
    assert len(text_rows) and (np.diff(text_rows) > 1).sum() >= 2, "expected three lines of text under the strip"


def test_speedup_above_the_ideal_is_flagged_not_reported():
    from sc_compile.demo.main import SpeedUp

    plausible = SpeedUp((3.0, 2.8, 3.1), (2.0, 2.0, 2.1), ideal=1.75)
    assert plausible.plausible and plausible.median == pytest.approx(1.5)  # median 3.0 over median 2.0
    text = plausible.describe()
    assert text.startswith("1.50x wall time (median times; 3 repeats range 1.40-1.50x)"), text
    assert "ideal 1.75x" in text and "disagree" not in text, text
    spread = SpeedUp((3.0, 2.8, 4.0), (2.0, 2.0, 1.6), ideal=1.75)
    assert spread.plausible and spread.disturbed
    assert "the repeats disagree by more than 25%" in spread.describe(), spread.describe()
    noisy = SpeedUp((3.4, 2.0, 2.6), (2.0, 2.0, 2.0), ideal=1.25)
    assert not noisy.plausible
    text = noisy.describe()
    assert text.startswith("not measured") and "machine noise" in text and "ideal 1.25x" in text, text


def test_timed_generations_are_interleaved_in_alternating_order():
    from sc_compile.demo.main import TimedRuns, time_interleaved

    order = []
    runs = [
        (TimedRuns(torch.zeros(1), 1.0, []), lambda: order.append("uncached")),
        (TimedRuns(torch.zeros(1), 1.0, []), lambda: order.append("cached")),
    ]
    time_interleaved(runs, 3)
    assert order == ["uncached", "cached", "cached", "uncached", "uncached", "cached"]
    assert all(len(timed.seconds) == 3 for timed, _ in runs)


def test_demo_announces_the_inductor_cold_compile_and_its_length():
    from sc_compile.demo.main import compile_notice

    notice = compile_notice("inductor", threads=1)
    assert "Inductor" in notice and "1-2 minutes" in notice and "cache" in notice
    assert "a few seconds" in compile_notice("eager", threads=1)
