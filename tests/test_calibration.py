"""α calibration (paper eq. 5), the EMA over samples, the CLI, and step-count resampling."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sc_compile
from sc_compile.calibration.collect import AlphaAccumulator
from sc_compile.calibration.fitting import BandedGram, one_step_alpha
from sc_compile.calibration.table import AlphaTable
from sc_compile.config import InnerCompiler, ScalingCacheConfig

from dummy_dit import DummyDiT


def test_eq5_against_a_hand_computed_case():
    trajectory = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([1.5, 3.0])]
    gram = BandedGram(3, 1, 4)
    for t, y in enumerate(trajectory):
        gram.set_row(t, torch.tensor([[float(torch.dot(y, trajectory[t - d])) if d <= t else 0.0 for d in range(4)]]))
    # <y_2 - y_1, Δ> / <Δ, Δ> with Δ = y_1 - y_0: (0.5 * 1 + 1 * 2) / (1 + 4) = 0.5
    assert one_step_alpha(gram)[2, 0].item() == pytest.approx(0.5)
    assert one_step_alpha(gram)[:2, 0].tolist() == [1.0, 1.0]  # undefined before the second difference
    still = BandedGram(3, 1, 4)
    for t in range(3):
        still.set_row(t, torch.tensor([[4.0] * 4]))
    assert one_step_alpha(still)[2, 0].item() == 1.0  # no difference: α undefined, held at 1


def test_ema_against_a_hand_computed_case():
    accumulator = AlphaAccumulator(num_points=1, beta=0.5)
    for value in (1.0, 0.0, 1.0):
        accumulator.observe(2, [value])
    # 1.0 initialises; then .5 * 1 + .5 * 0 = .5; then .5 * .5 + .5 * 1 = .75
    assert accumulator.rows[2] == [pytest.approx(0.75)]


def _geometric_generation(ratio: float, steps: int, offset: float = 1.0):
    """A generation whose hidden states follow s_t = 10 + offset * Σ_{k<=t} ratio^k exactly."""

    def run(compiled):
        value = 10.0
        for t in range(steps):
            value += offset * ratio**t
            compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 50.0 * t]))

    return run


def test_geometric_trajectory_calibrates_to_its_ratio():
    table = sc_compile.calibrate(
        DummyDiT(), [_geometric_generation(0.8, 8), _geometric_generation(0.8, 8, offset=-2.0)], progress=False
    )
    assert table.num_steps == 8 and table.num_points == 3
    torch.testing.assert_close(table.alpha[:2], torch.ones(2, 3))
    torch.testing.assert_close(table.alpha[2:], torch.full((6, 3), 0.8), rtol=1e-4, atol=1e-4)
    assert table.timesteps == tuple(1000.0 - 50.0 * t for t in range(8))
    assert table.num_samples == 2 and table.granularity == "block"


def test_calibrations_of_one_model_do_not_mix():
    """Each calibration reads its own runtime, not one an earlier compilation left on the model."""
    model = DummyDiT()
    module = sc_compile.calibrate(model, [_geometric_generation(0.8, 8)], granularity="module", progress=False)
    block = sc_compile.calibrate(model, [_geometric_generation(0.8, 8)], progress=False)
    residual = sc_compile.calibrate(model, [_geometric_generation(0.8, 8)], prediction="residual", progress=False)
    assert (module.granularity, module.num_points) == ("module", 6)
    assert (block.granularity, block.num_points) == ("block", 3)
    assert residual.num_points == 3 and len({module.fingerprint, block.fingerprint, residual.fingerprint}) == 3
    # A block's residual g * x (+ 0 * temb) follows the hidden state's geometric ratio too.
    torch.testing.assert_close(residual.alpha[2:], torch.full((6, 3), 0.8), rtol=1e-4, atol=1e-4)


def test_calibrated_table_is_accepted_and_mapped_to_other_step_counts(tmp_path, caplog):
    model = DummyDiT()
    table = sc_compile.calibrate(model, [_geometric_generation(0.9, 20)], progress=False)
    assert table.fitted is not None and table.fitted.num_steps == 20
    path = tmp_path / "alpha.safetensors"
    table.save(path)
    # The file records the config the calibration ran with (versioned, ScalingCacheConfig.to_dict).
    recorded = AlphaTable.load(path).config
    assert recorded == table.config and recorded is not None and recorded["_version"] == 1
    assert ScalingCacheConfig.from_dict(recorded) == ScalingCacheConfig.from_dict(table.config)
    assert ScalingCacheConfig.from_dict(recorded).alpha == "ones"
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "alpha": str(path), "warmup_steps": 3}
    )
    for steps in (10, 40, 20):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sc_compile.runtime"), torch.no_grad():
            with sc_compile.generation(model, num_inference_steps=steps):
                for t in torch.linspace(1000.0, 50.0, steps):
                    compiled(torch.ones(1, 4, 8) * (1 + t / 1000), t.reshape(1))
        mapped = [r for r in caplog.records if "over normalised time" in r.getMessage()]
        assert len(mapped) == (0 if steps == 20 else 1), steps
        report = sc_compile.report(model)
        assert report.num_steps == steps, steps
        assert report.config is not None
        ran = ScalingCacheConfig.from_dict(report.config)
        assert (ran.alpha, ran.warmup_steps, ran.compiler) == (str(path), 3, InnerCompiler.EAGER)


def test_cli_calibrates_a_tiny_pipeline_and_inspects_the_table(tmp_path):
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    model_dir = tmp_path / "tiny_flux"
    pipe.transformer.save_pretrained(model_dir)
    embeddings.save(model_dir / "class_embeddings.safetensors")
    out = tmp_path / "alpha.safetensors"
    command = [
        sys.executable,
        "-m",
        "sc_compile",
        "calibrate",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        "6",
        "--classes",
        "2",
        "--seeds",
        "1",
        "--max-gap",
        "2",
        "--second-order",
        "--finer-steps",
        "18",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "2 samples x 6 steps" in result.stdout
    table = AlphaTable.load(out)
    assert table.model_class == "FluxTransformer2DModel"
    assert table.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert "calibrate" in table.command
    assert table.fitted is not None and table.fitted.max_gap_limit == 2
    inspect = subprocess.run(
        [sys.executable, "-m", "sc_compile", "inspect", str(out)], capture_output=True, text=True, check=True
    )
    assert "steps=6" in inspect.stdout and "α mean" in inspect.stdout
    # The fitted per-gap coefficients the runtime multiplies, not only the one-step α.
    assert table.fitted is not None and "fitted per-gap coefficients" in inspect.stdout, inspect.stdout
    served = int(table.fitted.max_gap[2])
    expected = " ".join(f"{c:6.3g}" for c in table.fitted.coef[2, 0, :served].mean(dim=-1).tolist())
    assert any(line.startswith(f"   2  {served:3d}  {expected}") for line in inspect.stdout.splitlines()), (
        inspect.stdout
    )
    # --second-order: a format-3 table whose stored plans say the order each was chosen with; inspect lists them.
    assert table.fitted.second is not None and table.plans is not None
    assert len(table.plans.orders) == len(table.plans.counts())
    for index, count in enumerate(table.plans.counts()):
        line = f"{count:5d}  {float(table.plans.error[index]):8.2f}  {table.plans.source(index)}: "
        assert line + str(list(table.plans.steps(index))) in inspect.stdout.splitlines(), inspect.stdout
    # --finer-steps: the coefficients checked at 18 steps against α = 1; inspect says what it found.
    assert table.finer is not None and table.finer.num_steps == 18
    assert f"finer grid: {table.finer.describe()}" in inspect.stdout.splitlines(), inspect.stdout
    # The backend accepts the file for the same architecture.
    pipe.transformer = torch.compile(
        pipe.transformer, backend="scalingcache", options={"compiler": "eager", "alpha": str(out), "warmup_steps": 2}
    )
    with torch.no_grad():
        pipe(**embeddings.pipeline_kwargs([0]), height=28, width=28, num_inference_steps=6, output_type="pt")
    report = sc_compile.report(pipe.transformer)
    assert report.num_steps == 6 and report.alpha_source.startswith(f"{out} (")


@pytest.mark.slow
def test_shipped_table_at_other_step_counts_on_the_demo_model():
    """The shipped 28-step table mapped to half and twice its step count, against α = 1 with the
    same budgeted schedule (same full-step count), on seeds the table never saw."""
    from sc_compile.demo.models import load_flux_demo
    from sc_compile.metrics import psnr

    pipe, embeddings = load_flux_demo()
    transformer = pipe.transformer
    labels = [0, 3, 5, 8]
    shipped = AlphaTable.load(Path(__file__).resolve().parents[1] / "assets/demo_flux/alpha_flux_28steps.safetensors")
    assert shipped.fitted is not None and shipped.num_steps == 28

    def generate(steps):
        with torch.no_grad():
            return pipe(
                **embeddings.pipeline_kwargs(labels, guidance_scale=3.0),
                height=28,
                width=28,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(7),
                output_type="pt",
            ).images

    results = {}
    for steps in (14, 56):
        reference = generate(steps)
        for name, table in (("mapped table", shipped), ("alpha = 1", "ones")):
            torch._dynamo.reset()
            pipe.transformer = torch.compile(
                transformer,
                backend="scalingcache",
                options={"compiler": "eager", "alpha": table, "num_inference_steps": steps, "full_steps": steps // 2},
            )
            results[(steps, name)] = (psnr(generate(steps), reference), sc_compile.report(transformer).num_full_steps)
            pipe.transformer = transformer
    # (PSNR against uncached, full steps) per step count and α, shown when an assertion fails.
    summary = {f"{k[0]} steps, {k[1]}": (round(v[0], 2), v[1]) for k, v in results.items()}
    for steps in (14, 56):
        mapped, ones = results[(steps, "mapped table")], results[(steps, "alpha = 1")]
        assert mapped[1] == ones[1] == steps // 2, summary  # the budget is met exactly
        assert mapped[0] > ones[0] - 1.0, summary


def test_missing_table_warning_names_both_ways_and_prints_above_a_progress_bar(capsys):
    """The warning (given at the first call, inside the pipeline's progress bar) names the Python
    API and the CLI, and starts on a line of its own: the bar is cleared for it and redrawn."""
    from tqdm.auto import tqdm

    from sc_compile.calibration.table import resolve_alpha_source

    logger = logging.getLogger("sc_compile.calibration.table")
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as a user's logging setup has
    logger.addHandler(handler)
    try:
        bar = tqdm(total=4, file=sys.stderr, desc="denoising")
        bar.update(1)
        table = resolve_alpha_source(
            None, model_class="Tiny", fingerprint="f00", num_points=2, granularity="block", search_dirs=()
        )
        bar.close()
    finally:
        logger.removeHandler(handler)
    assert table is None
    err = capsys.readouterr().err
    start = err.index("ScalingCache: no α table for Tiny")
    assert err[start - 1] in "\r\n", repr(err[max(0, start - 80) : start + 20])  # not after the bar's text
    message = err[start:].splitlines()[0]
    assert "sc_compile.calibrate(pipe" in message and "sc-compile calibrate MODEL_DIR" in message, message
    assert "denoising" in err[start + len(message) :], "the bar is drawn again after the warning"


def test_calibration_shows_one_progress_bar_with_the_thread_count(capsys):
    """One bar over all steps of all generations (the pipeline's own bars are off meanwhile and
    its setting is restored after), which says how many CPU threads torch runs on."""
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    pipe.set_progress_bar_config(disable=False, leave=True)
    samples = [
        {**embeddings.pipeline_kwargs([label]), "height": 28, "width": 28, "num_inference_steps": 3, "seed": label}
        for label in (0, 1)
    ]
    sc_compile.calibrate(pipe, samples, compiler="eager")
    err = capsys.readouterr().err
    drawn = [piece for piece in err.replace("\r", "\n").splitlines() if "%|" in piece]
    assert drawn and all(
        piece.startswith(f"calibrating (torch threads: {torch.get_num_threads()})") for piece in drawn
    ), err
    assert "6/6" in drawn[-1], drawn[-1]
    assert pipe._progress_bar_config == {"disable": False, "leave": True}


def test_calibration_runs_every_step_full_without_warning_about_it(caplog):
    """Calibration's all-full warm-up is on purpose: no "nothing will be cached" warning, even where the
    generation declares its step count; a user's warm-up that covers the generation is still warned."""
    model = DummyDiT()
    run = _geometric_generation(0.8, 6)

    def declared(compiled):
        with sc_compile.generation(model, num_inference_steps=6):
            run(compiled)

    with caplog.at_level(logging.WARNING, logger="sc_compile"):
        sc_compile.calibrate(model, [declared], progress=False)
    assert not [r for r in caplog.records if "nothing will be cached" in r.getMessage()]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 6})
    with caplog.at_level(logging.WARNING, logger="sc_compile"), torch.no_grad():
        declared(compiled)
    assert [r for r in caplog.records if "warm-up of 6 steps covers the whole 6-step" in r.getMessage()]
