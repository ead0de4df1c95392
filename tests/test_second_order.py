"""Two-difference fitted coefficients (issue 22 item 1): closed-form cases and the table formats."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import sc_compile
from sc_compile.calibration.fitting import (
    BandedGram,
    fit_gap_coefficients,
    fit_second_order,
    gram_width,
)
from sc_compile.calibration.table import AlphaTable, AlphaTableError
from sc_compile.decision.budget import plan_full_steps, schedule_error
from sc_compile.decision.coefficients import make_predictor

from dummy_dit import DummyDiT, output_scale

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_GAP = 3


def _gram(trajectory: list[torch.Tensor], width: int) -> BandedGram:
    """One point per entry of ``trajectory[t]`` ([P, D]): the banded Gram of each point."""
    num_points = trajectory[0].shape[0]
    gram = BandedGram(len(trajectory), num_points, width)
    for t, y in enumerate(trajectory):
        row = torch.full((num_points, width), math.nan, dtype=torch.float64)
        for d in range(min(width, t + 1)):
            row[:, d] = (y * trajectory[t - d]).sum(-1)
        gram.set_row(t, row)
    return gram


def _fit(trajectories: list[list[torch.Tensor]], feeds_output: list[bool]):
    grams = [_gram(t, gram_width(MAX_GAP)) for t in trajectories]
    first = fit_gap_coefficients(grams, MAX_GAP, feeds_output)
    return first, fit_second_order(grams, first, feeds_output)


def _runtime_prediction(first, second, trajectory, tau: int, g: int, h: int, k: int) -> torch.Tensor:
    """What the runtime computes: y_full + c₁ · dy + c₂ · dy_prev, with dy and dy_prev as the full
    steps τ and τ − g refreshed them (the refresh table, not the fit, makes the buffers)."""
    dy = (trajectory[tau] - trajectory[tau - g]) * first.refresh[tau, g - 1].double()[:, None]
    dy_prev = (trajectory[tau - g] - trajectory[tau - g - h]) * first.refresh[tau - g, h - 1].double()[:, None]
    c = second.coef[tau, g - 1, h - 1, k - 1].double()  # [P, 2]
    return trajectory[tau] + c[:, 0:1] * dy + c[:, 1:2] * dy_prev


def _quadratic(seed: int, num_steps: int = 14, num_points: int = 2, dim: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(num_points, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    return [a + b * t + 0.3 * c * t * t for t in range(num_steps)]


def test_a_quadratic_trajectory_is_predicted_exactly_where_first_order_is_not():
    trajectories = [_quadratic(seed) for seed in range(4)]
    first, second = _fit(trajectories, [False, True])
    held_out = _quadratic(99)
    checked = 0
    for tau in range(4, 10):
        for g in range(1, MAX_GAP + 2):
            for h in range(1, MAX_GAP + 2):
                for k in range(1, MAX_GAP + 1):
                    if tau - g - h < 0 or k + g + h > gram_width(MAX_GAP) - 1 or tau + k >= len(held_out):
                        continue
                    predicted = _runtime_prediction(first, second, held_out, tau, g, h, k)
                    torch.testing.assert_close(predicted, held_out[tau + k], rtol=1e-4, atol=1e-3)
                    assert float(second.error[tau, g - 1, h - 1, k - 1]) < 1e-9
                    # The first-order table cannot: a curved trajectory is not a line.
                    assert float(first.error[tau, g - 1, k - 1]) > 1e-7
                    checked += 1
    assert checked > 50
    assert bool(second.uses_second_difference()[4:10].any())


def _noise_trajectory(seed: int, noise: float, curvature: float, dim: int = 64) -> list[torch.Tensor]:
    """Steps 0-2 arbitrary, 3-5 on a line, step 6 the line plus ``noise`` plus ``curvature`` times a
    direction that the arbitrary steps predict (D' carries it) or not."""
    generator = torch.Generator().manual_seed(seed)
    a, b, z = (torch.randn(1, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    early = [torch.randn(1, dim, generator=generator, dtype=torch.float64) * 3 for _ in range(3)]
    y3, y4, y5 = a, a + b, a + 2 * b
    d_prev = y3 - early[2]  # D'_1 at τ = 5, g = 2: y_3 − y_2
    y6 = a + 3 * b + noise * z + curvature * d_prev
    return [*early, y3, y4, y5, y6, y6 + b]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_order_is_kept_where_the_second_difference_is_noise(seed):
    trajectories = [_noise_trajectory(seed * 10 + s, noise=0.3, curvature=0.0) for s in range(5)]
    first, second = _fit(trajectories, [True])
    tau, g, h, k = 5, 2, 1, 1
    c = second.coef[tau, g - 1, h - 1, k - 1, 0]
    assert float(c[1]) == 0.0  # exactly first order
    assert float(c[0]) == pytest.approx(float(first.coef[tau, g - 1, k - 1, 0]))
    assert float(second.error[tau, g - 1, h - 1, k - 1]) == pytest.approx(float(first.error[tau, g - 1, k - 1]))
    # The same trajectories with a second-difference signal: the second coefficient is taken.
    curved = [_noise_trajectory(seed * 10 + s, noise=0.3, curvature=0.5) for s in range(5)]
    first, second = _fit(curved, [True])
    c = second.coef[tau, g - 1, h - 1, k - 1, 0]
    assert float(c[1]) != 0.0
    assert float(second.error[tau, g - 1, h - 1, k - 1]) < 0.5 * float(first.error[tau, g - 1, k - 1])


def test_format_3_round_trips_and_old_tables_still_load_and_mean_what_they_meant(tmp_path):
    first, second = _fit([_quadratic(seed) for seed in range(3)], [False, True])
    n, p = first.num_steps, first.num_points
    with_second = AlphaTable(torch.ones(n, p), "Dummy", "fp", "block", fitted=dataclass_replace(first, second))
    with_second.save(tmp_path / "alpha3.safetensors")
    loaded = AlphaTable.load(tmp_path / "alpha3.safetensors")
    assert loaded.fitted is not None and loaded.fitted.second is not None
    torch.testing.assert_close(loaded.fitted.second.coef, second.coef)
    torch.testing.assert_close(loaded.fitted.second.error, second.error)
    torch.testing.assert_close(loaded.fitted.coef, first.coef)
    # Without second-order coefficients the file is format 2, and a format-2 reader's tensors only.
    AlphaTable(torch.ones(n, p), "Dummy", "fp", "block", fitted=first).save(tmp_path / "alpha2.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "alpha2.safetensors"), framework="pt") as handle:
        assert (handle.metadata() or {})["format_version"] == "2"
        assert sorted(handle.keys()) == ["alpha", "coef", "error", "max_gap", "refresh"]
    # A format-3 file missing a second-order tensor is refused.
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "alpha3.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != "error2"}
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(AlphaTableError, match="error2"):
        AlphaTable.load(tmp_path / "broken.safetensors")


def dataclass_replace(first, second):
    import dataclasses

    return dataclasses.replace(first, second=second)


@pytest.mark.parametrize("path", ["demo_flux/alpha_flux_28steps.safetensors", "demo_wan/alpha_wan_20steps.safetensors"])
def test_shipped_format_2_tables_load_and_predict_as_before(path):
    table = AlphaTable.load(ASSETS / path)
    assert table.fitted is not None and table.fitted.second is None
    predictor = make_predictor(
        table, num_points=table.num_points, num_steps=table.num_steps, timestep_of=lambda s: None, fitted=True
    )
    # On its own grid the format-2 predictor multiplies the stored first-order coefficients.
    for tau, g, k in [(5, 1, 1), (10, 2, 3), (14, 4, 2)]:
        assert predictor.cached_coef(tau, g, k) == tuple(table.fitted.coef[tau, g - 1, k - 1].tolist())
        assert predictor.refresh(tau, g) == tuple(table.fitted.refresh[tau, g - 1].tolist())


def test_a_format_1_table_still_loads_as_chained_alpha(tmp_path):
    alpha = torch.full((6, 2), 0.5)
    AlphaTable(alpha, "Dummy", "fp", "block").save(tmp_path / "alpha1.safetensors")
    table = AlphaTable.load(tmp_path / "alpha1.safetensors")
    assert table.fitted is None
    predictor = make_predictor(table, num_points=2, num_steps=6, timestep_of=lambda s: None, fitted=False)
    assert predictor.cached_coef(2, 1, 2) == pytest.approx((0.5 + 0.25, 0.5 + 0.25))


# -- end-to-end schedule search (issue 22 item 2) -------------------------------------------------


def _exhaustive(num_steps, budget, cost, allows_gap, weights, propagation, forced=(), amplification=None):
    best = (math.inf, None)
    for rest in itertools.combinations(range(2, num_steps), budget - 2):
        full = (0, 1, *rest)
        if not set(forced) <= set(full):
            continue
        gaps_ok = all(
            allows_gap(last, step - last)
            for step in range(2, num_steps)
            if step not in full
            for last in [max(f for f in full if f < step)]
        )
        if not gaps_ok:
            continue
        total = schedule_error(
            num_steps, full, cost, weights=weights, propagation=propagation, amplification=amplification
        )
        if total < best[0]:
            best = (total, full)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("propagation", [0.0, 0.7, 3.0])
def test_end_to_end_search_equals_exhaustive_search_with_error_propagation(seed, propagation):
    generator = torch.Generator().manual_seed(seed)
    num_steps, budget = 12, 5
    table = torch.rand(num_steps, num_steps, num_steps, generator=generator, dtype=torch.float64)
    weights = (0.5 + torch.rand(num_steps, generator=generator, dtype=torch.float64)).tolist()

    def cost(tau, g, k):
        return float(table[tau, g, k]) * k

    def allows_gap(tau, k):
        return k <= 4

    planned = plan_full_steps(num_steps, budget, cost, allows_gap, weights=weights, propagation=propagation)
    expected_error, expected = _exhaustive(num_steps, budget, cost, allows_gap, weights, propagation)
    assert len(planned) == budget
    got = schedule_error(num_steps, planned, cost, weights=weights, propagation=propagation)
    assert got == pytest.approx(expected_error, rel=1e-12)
    assert planned == expected


@pytest.mark.parametrize("seed", range(4))
def test_end_to_end_search_is_exact_with_forced_steps_and_any_amplification(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    num_steps, budget, forced = 13, 6, (7, 12)
    table = torch.rand(num_steps, num_steps, num_steps, generator=generator, dtype=torch.float64)
    gain = 2 * torch.rand(num_steps, num_steps, num_steps, generator=generator, dtype=torch.float64)

    def cost(tau, g, k):
        return float(table[tau, g, k])

    def amplification(tau, g, k):
        return float(gain[tau, g, k])

    def allows_gap(tau, k):
        return k <= 5

    planned = plan_full_steps(
        num_steps, budget, cost, allows_gap, forced=forced, propagation=1.5, amplification=amplification
    )
    expected_error, expected = _exhaustive(
        num_steps, budget, cost, allows_gap, None, 1.5, forced=forced, amplification=amplification
    )
    got = schedule_error(num_steps, planned, cost, propagation=1.5, amplification=amplification)
    assert got == pytest.approx(expected_error, rel=1e-12)
    assert planned == expected and set(forced) <= set(planned)


def test_propagation_changes_the_optimum_where_a_sum_of_one_step_errors_cannot_see_it():
    # Uniform one-step errors: a sum of them is indifferent to where long gaps sit next to each
    # other, the propagated model is not: it separates the long gaps by short ones.
    num_steps, budget = 14, 6

    def cost(tau, g, k):
        return 0.01 * k * k

    plain = plan_full_steps(num_steps, budget, cost, lambda tau, k: k <= 4)
    propagated = plan_full_steps(num_steps, budget, cost, lambda tau, k: k <= 4, propagation=5.0)
    e = {
        rho: {
            name: schedule_error(num_steps, plan, cost, propagation=rho)
            for name, plan in (("plain", plain), ("propagated", propagated))
        }
        for rho in (0.0, 5.0)
    }
    assert e[5.0]["propagated"] < e[5.0]["plain"]
    assert e[0.0]["plain"] <= e[0.0]["propagated"]
    assert plain != propagated


def test_a_budget_plan_runs_exactly_its_full_steps_under_propagation():
    for budget in range(5, 13):
        planned = plan_full_steps(
            24, budget, lambda tau, g, k: 0.1 * k, lambda tau, k: k <= 8, propagation=1.0, forced=(23,)
        )
        assert len(planned) == budget and planned[:2] == (0, 1) and planned[-1] == 23


def _run(compiled, values, timesteps):
    with torch.no_grad():
        for value, t in zip(values, timesteps, strict=True):
            compiled(torch.ones(1, 4, 8) * value, torch.tensor([t]))[0, 0, 0].item() / output_scale()


def test_the_propagation_option_reaches_the_plan_the_generation_runs():
    steps, budget = 16, 6
    values = [10.0 - u for u in range(steps)]
    timesteps = [1000.0 - 60.0 * u for u in range(steps)]
    ran = {}
    for rho in (0.0, 1.0):
        torch._dynamo.reset()
        model = DummyDiT()
        compiled = torch.compile(
            model,
            backend="scalingcache",
            options={
                "compiler": "eager",
                "alpha": "ones",
                "full_steps": budget,
                "warmup_steps": 2,
                "propagation": rho,
                "num_inference_steps": steps,
            },
        )
        _run(compiled, values, timesteps)
        ran[rho] = tuple(sc_compile.report(model).full_steps)
        # α = 1 serves gaps up to max(3, ⌈0.2 · 16⌉) = 4 steps and has no error table.
        expected = plan_full_steps(steps, budget, lambda t, g, k: None, lambda t, k: k <= 4, propagation=rho)
        assert ran[rho] == expected
    assert ran[0.0] != ran[1.0]


@pytest.mark.parametrize("value", [-0.5, float("inf"), float("nan"), True, "1"])
def test_propagation_is_validated(value):
    with pytest.raises(ValueError, match="propagation must be a finite number >= 0"):
        sc_compile.ScalingCacheConfig(propagation=value)


def test_the_held_out_error_table_keeps_the_coefficients_and_does_not_flatter_the_fit():
    # Lines with per-sample noise at the predicted step: the leave-one-out error is the error on a
    # sample the coefficient did not see, at least the in-sample one summed over the table.
    trajectories = [_noise_trajectory(s, noise=0.5, curvature=0.0) for s in range(4)]
    grams = [_gram(t, gram_width(MAX_GAP)) for t in trajectories]
    in_sample = fit_gap_coefficients(grams, MAX_GAP, [True])
    held_out = fit_gap_coefficients(grams, MAX_GAP, [True], held_out_error=True)
    torch.testing.assert_close(held_out.coef, in_sample.coef)
    torch.testing.assert_close(held_out.refresh, in_sample.refresh)
    finite = torch.isfinite(in_sample.error)
    assert float(held_out.error[finite].sum()) > float(in_sample.error[finite].sum())
    # Noise-free lines: every sample agrees, both errors vanish.
    lines = [[torch.full((1, 4), float(s)) + t * torch.arange(4.0)[None] for t in range(8)] for s in range(3)]
    exact = fit_gap_coefficients([_gram(t, gram_width(MAX_GAP)) for t in lines], MAX_GAP, [True], held_out_error=True)
    assert float(exact.error[2:7].nan_to_num(posinf=0.0).abs().max()) < 1e-9


def _quadratic_generation(curvature: float, steps: int):
    """The dummy's input scale s_t = 10 − t + curvature · t², one full generation."""

    def run(compiled):
        for t in range(steps):
            compiled(torch.ones(1, 4, 8) * (10.0 - t + curvature * t * t), torch.tensor([1000.0 - 50.0 * t]))

    return run


def test_calibrate_writes_a_format_3_table_whose_first_order_is_predictor_order_1(tmp_path):
    model = DummyDiT()
    samples = [_quadratic_generation(c, 12) for c in (0.02, 0.05, 0.08)]
    table = sc_compile.calibrate(model, samples, progress=False, max_gap=3, second_order=True)
    assert table.fitted is not None and table.fitted.second is not None
    assert tuple(table.fitted.second.coef.shape) == (12, 4, 4, 3, table.num_points, 2)
    table.save(tmp_path / "alpha.safetensors")
    loaded = AlphaTable.load(tmp_path / "alpha.safetensors")
    assert loaded.fitted is not None and loaded.fitted.second is not None
    first_only = AlphaTable(
        loaded.alpha,
        loaded.model_class,
        loaded.fingerprint,
        loaded.granularity,
        timesteps=loaded.timesteps,
        fitted=dataclass_replace(loaded.fitted, None),
    )
    outputs = []
    for alpha, order in ((loaded, 1), (first_only, None)):
        torch._dynamo.reset()
        compiled = torch.compile(
            model,
            backend="scalingcache",
            options={
                "compiler": "eager",
                "alpha": alpha,
                "full_steps": 6,
                "num_inference_steps": 12,
                "predictor_order": order,
            },
        )
        with torch.no_grad():
            outputs.append(
                [
                    compiled(torch.ones(1, 4, 8) * (10.0 - t + 0.05 * t * t), torch.tensor([1000.0 - 50.0 * t]))
                    for t in range(12)
                ]
            )
        assert sc_compile.report(model).num_full_steps == 6
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
