"""The dummy DiT with exact arithmetic: which steps are full and what the cached steps output.

``hidden_states = s_t * ones`` makes every cache point ``s_t`` times a constant, so the relative
change of a step is ``|s_t - s_{t-1}| / |s_{t-1}|`` and the cached output is the head applied to
``y_full + c_t * dy``. The expected values below are derived by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

import sc_compile
from sc_compile.calibration.table import AlphaTable

from dummy_dit import DummyDiT, output_scale

SEQUENCE = [16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]


def _run(model, compiled, values, timesteps=None):
    outputs = []
    timesteps = timesteps or [1000.0 - 100.0 * i for i in range(len(values))]
    with torch.no_grad():
        for value, t in zip(values, timesteps, strict=True):
            out = compiled(torch.ones(1, 4, 8) * value, torch.tensor([t]))
            outputs.append(out[0, 0, 0].item() / output_scale())
    return outputs


def test_alpha_one_decisions_and_predictions():
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3, "alpha": "ones"}
    )
    outputs = _run(model, compiled, SEQUENCE)
    report = sc_compile.report(compiled)
    # t0..t2 warm-up. ē1 = 4/16 = .25, ē2 = 2/12 = .1667: δ = .2083, ε = .1667 and dy = -2.
    # t3 cached: c3 = 1 -> 10 - 2 = 8; predicted ē3 = 1 * 2/10 = .2, ε = .3667 > δ.
    # t4 full: change against the prediction |8.5 - 8|/8 = .0625; E = [.25, .1667, .0625],
    #    δ = .1597; eq. 6 over a two-step gap with α = 1: dy = (8.5 - 10)/2 = -.75.
    # t5 cached: 8.5 - .75 = 7.75, ē5 = .75/8.5 = .0882, ε = .1507 <= δ.
    # t6 cached: c6 = 2 -> 8.5 - 1.5 = 7.0.
    assert report.full_steps == (0, 1, 2, 4)
    assert report.cached_steps == (3, 5, 6)
    assert outputs == pytest.approx([16.0, 12.0, 10.0, 8.0, 8.5, 7.75, 7.0], abs=1e-5)
    changes = report.streams[0].changes
    assert changes[0] is None
    assert changes[1:] == pytest.approx([0.25, 1 / 6, 0.2, 0.0625, 0.75 / 8.5, 0.75 / 8.5], abs=1e-6)


def _table_for(model, value: float, steps: int) -> AlphaTable:
    explanation = sc_compile.explain(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    alpha = torch.full((steps, len(explanation.cache_points)), value)
    alpha[:2] = 1.0  # undefined before the second step
    return AlphaTable(alpha, explanation.model_class, explanation.fingerprint, "block")


def test_alpha_table_scales_the_prediction_and_the_refresh():
    model = DummyDiT()
    table = _table_for(model, 0.5, len(SEQUENCE))
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3, "alpha": table}
    )
    outputs = _run(model, compiled, SEQUENCE)
    report = sc_compile.report(model)
    # After the warm-up: dy = -2 (gap 1: Π/Σ = α2/α2 = 1), δ = .2083, ε = .1667.
    # t3 cached: c3 = α3 = .5 -> 10 - 1 = 9; ē3 = .5 * 2/10 = .1, ε = .2667 > δ.
    # t4 full: ē4 = .5/9; eq. 6 over two steps: Π = .25, Σ = .5 + .25 -> dy = (8.5 - 10)/3 = -.5.
    # t5 cached: c5 = .5 -> 8.5 - .25 = 8.25; ε = .0556 + .5 * .5/8.5 = .0850 <= δ = .1574.
    # t6 cached: c6 = .5 + .25 = .75 -> 8.5 - .375 = 8.125.
    assert report.full_steps == (0, 1, 2, 4)
    assert outputs == pytest.approx([16.0, 12.0, 10.0, 9.0, 8.5, 8.25, 8.125], abs=1e-5)


def test_every_step_full_when_warmup_covers_the_generation():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 7})
    assert _run(model, compiled, SEQUENCE) == pytest.approx(SEQUENCE)
    assert sc_compile.report(model).cached_steps == ()


def test_generations_restart_when_the_timestep_goes_up():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    first = _run(model, compiled, SEQUENCE)
    second = _run(model, compiled, SEQUENCE)
    assert first == second
    report = sc_compile.report(model)
    assert report.num_steps == len(SEQUENCE)
    assert report.full_steps == (0, 1, 2, 4)


def test_separate_guidance_calls_are_streams_sharing_one_decision():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    cond, uncond = [], []
    with torch.no_grad():
        for i, value in enumerate(SEQUENCE):
            t = torch.tensor([1000.0 - 100.0 * i])
            cond.append(compiled(torch.ones(1, 4, 8) * value, t)[0, 0, 0].item() / output_scale())
            uncond.append(compiled(torch.ones(1, 4, 8) * value * 2, t)[0, 0, 0].item() / output_scale())
    report = sc_compile.report(model)
    assert len(report.streams) == 2
    assert report.streams[0].full_steps == report.streams[1].full_steps == (0, 1, 2, 4)
    # Each stream predicts from its own buffers: the uncond stream is the cond stream doubled.
    assert uncond == pytest.approx([2 * v for v in cond], abs=1e-5)


def test_independent_decisions_per_stream():
    model = DummyDiT()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "warmup_steps": 3, "share_decision_across_streams": False},
    )
    steady = [16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]
    # Stream 1 stops changing at t2: ē2 = 0, δ = .125, ε = 0 and dy = 0, so every later predicted
    # change is 0 and it never needs another full step.
    flat = [16.0, 12.0, 12.0, 12.0, 12.0, 12.0, 12.0]
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(steady, flat, strict=True)):
            t = torch.tensor([1000.0 - 100.0 * i])
            compiled(torch.ones(1, 4, 8) * a, t)
            compiled(torch.ones(1, 4, 8) * b, t)
    report = sc_compile.report(model)
    assert report.streams[0].full_steps == (0, 1, 2, 4)
    assert report.streams[1].full_steps == (0, 1, 2)
    assert report.shared_decisions is False


def test_report_string_summarises_the_generation():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    _run(model, compiled, SEQUENCE)
    report = sc_compile.report(model)
    text = str(report)
    assert "7 steps, 4 full, 3 cached" in text
    assert "FFF.F.." in text
    assert "stream(s)" not in text and "streams:  1 (stream 0)" in text, text
    # One row per step: the rule's ε and δ where it decided, and why the step ran as it did.
    rows = {int(line.split()[0]): line for line in text.splitlines() if line[:6].strip().isdigit()}
    assert sorted(rows) == list(range(7)), text
    assert rows[0].split()[1:2] == ["full"] and rows[0].endswith("warm-up"), text
    epsilon, delta = report.streams[0].rule[4]
    assert epsilon > delta, report
    assert rows[4].split()[1:4] == ["full", f"{epsilon:.3g}", f"{delta:.3g}"] and rows[4].endswith("ε > δ"), text
    epsilon, delta = report.streams[0].rule[3]
    assert epsilon <= delta and rows[3].split()[1] == "cached" and rows[3].endswith("ε ≤ δ"), text
    # Where α came from, as a description (no command to run, no source-tree path).
    assert "α:        α = 1 (no α table fits this model" in text, text
    assert "python -m" not in text and "assets/" not in text, text


def test_report_before_any_call_is_a_clear_error():
    with pytest.raises(RuntimeError, match="has not run under backend='scalingcache'"):
        sc_compile.report(DummyDiT())


def test_static_interval_ablation_ignores_the_changes():
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3, "static_interval": 2}
    )
    _run(model, compiled, SEQUENCE)
    # Full at the warm-up, then every second step: t3, t5 (ε and δ play no part).
    assert sc_compile.report(model).full_steps == (0, 1, 2, 3, 5)


def test_change_over_output_points_only():
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3, "change_points": "output"}
    )
    outputs = _run(model, compiled, SEQUENCE)
    # Every point changes by the same ratio here, so the last point alone gives the same schedule.
    assert sc_compile.report(model).full_steps == (0, 1, 2, 4)
    assert outputs == pytest.approx([16.0, 12.0, 10.0, 8.0, 8.5, 7.75, 7.0], abs=1e-5)


def test_cache_dtype_keeps_the_model_dtype():
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3, "cache_dtype": torch.float64}
    )
    outputs = []
    with torch.no_grad():
        for t, value in enumerate(SEQUENCE):
            out = compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - t]))
            assert out.dtype == torch.float32
            outputs.append(out[0, 0, 0].item() / output_scale())
    assert sc_compile.report(model).full_steps == (0, 1, 2, 4)
    assert outputs == pytest.approx([16.0, 12.0, 10.0, 8.0, 8.5, 7.75, 7.0], abs=1e-5)
    from sc_compile.runtime.dispatch import latest_runtime

    runtime = latest_runtime(model)
    assert all(buffer.dtype == torch.float64 for buffer in runtime.streams[0].buffers)


def test_residual_prediction_adds_the_predicted_residual_to_the_current_input():
    """``prediction="residual"``: every block's residual ``g * x`` is predicted and added to the
    block's input of the current step, the first block's being the step's real input."""
    model = DummyDiT()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "warmup_steps": 3, "alpha": "ones", "prediction": "residual"},
    )
    outputs = _run(model, compiled, SEQUENCE)
    report = sc_compile.report(compiled)
    # Every residual is s_t times a constant, so the relative changes - and the decisions - are
    # those of the hidden-state test above.
    assert report.full_steps == (0, 1, 2, 4)
    assert report.cached_steps == (3, 5, 6)
    # The residuals are extrapolated as if the scale were ŝ (8, 7.75, 7.0: the hidden-state test's
    # predictions); block l adds g_l * prod_{k<l}(1 + g_k) * ŝ, which sums to (prod(1 + g) - 1) * ŝ,
    # on top of the real input s_t; the head doubles.
    growth = output_scale() / 2 - 1.0  # prod(1 + g) - 1 = 2.75

    def cached(s_t: float, s_hat: float) -> float:
        return 2 * (s_t + growth * s_hat) / output_scale()

    expected = [16.0, 12.0, 10.0, cached(9.0, 8.0), 8.5, cached(8.0, 7.75), cached(4.0, 7.0)]
    assert outputs == pytest.approx(expected, abs=1e-5)
