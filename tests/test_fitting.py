"""Per-gap fitted coefficients, the budgeted schedule search and other step counts, with known answers."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

import sc_compile
from sc_compile.calibration.fitting import BandedGram, fit_gap_coefficients, gram_width, one_step_alpha
from sc_compile.calibration.table import AlphaTable, AlphaTableError
from sc_compile.decision.budget import BudgetError, plan_full_steps
from sc_compile.decision.coefficients import ChainedPredictor, FittedPredictor, make_predictor

from dummy_dit import DummyDiT, output_scale

# Zig-zag residuals: step t moves by MAGNITUDES[t] along e1 (t odd) or e2 (t even). Consecutive
# differences are orthogonal, so every one-step α is 0 and the chain predicts no change at all,
# while a gap's least-squares coefficient on D_g = y_τ - y_{τ-g} is known in closed form.
MAGNITUDES = [0.0, 3.0, 2.5, 2.0, 1.7, 1.5, 1.2, 1.0, 0.8]


def _zigzag(num_steps: int = len(MAGNITUDES), start=(10.0, 10.0)) -> list[torch.Tensor]:
    y = torch.tensor(start, dtype=torch.float64)
    trajectory = []
    for t in range(num_steps):
        if t > 0:
            direction = torch.tensor([1.0, 0.0] if t % 2 else [0.0, 1.0], dtype=torch.float64)
            y = y + MAGNITUDES[t] * direction
        trajectory.append(y.clone())
    return trajectory


def _gram(trajectory: list[torch.Tensor], max_gap: int) -> BandedGram:
    gram = BandedGram(len(trajectory), 1, gram_width(max_gap))
    for t, y in enumerate(trajectory):
        row = torch.tensor(
            [[float(torch.dot(y, trajectory[t - d])) if t - d >= 0 else math.nan for d in range(gram.width)]],
            dtype=torch.float64,
        )
        gram.set_row(t, row)
    return gram


def _difference(trajectory, tau: int, g: int) -> torch.Tensor:
    return trajectory[tau] - trajectory[tau - g]


def test_fitted_coefficients_equal_their_closed_form_and_the_chain_predicts_nothing():
    trajectory = _zigzag()
    fitted = fit_gap_coefficients([_gram(trajectory, 3)], 3, [True])
    for tau, g, k in itertools.product(range(2, 5), (1, 2, 3), (1, 2, 3)):
        if tau - g < 0 or tau + k >= len(trajectory):
            continue
        d_g, d_1 = _difference(trajectory, tau, g), _difference(trajectory, tau, 1)
        target = trajectory[tau + k] - trajectory[tau]
        a = float(torch.dot(target, d_g) / torch.dot(d_g, d_g))
        r = float(torch.dot(d_1, d_g) / torch.dot(d_g, d_g))
        assert float(fitted.refresh[tau, g - 1, 0]) == pytest.approx(r, rel=1e-5)
        assert float(fitted.coef[tau, g - 1, k - 1, 0]) * r == pytest.approx(a, rel=1e-5, abs=1e-6)
        error = float(
            torch.dot(target - a * d_g, target - a * d_g) / torch.dot(trajectory[tau + k], trajectory[tau + k])
        )
        assert float(fitted.error[tau, g - 1, k - 1]) == pytest.approx(error, rel=1e-4, abs=1e-9)
    # Hand-derived case: τ = 4, g = 2: D_2 = 2.0 e1 + 1.7 e2, y_6 - y_4 = 1.5 e1 + 1.2 e2.
    assert float(fitted.coef[4, 1, 1, 0] * fitted.refresh[4, 1, 0]) == pytest.approx(
        (2.0 * 1.5 + 1.7 * 1.2) / (2.0**2 + 1.7**2), rel=1e-5
    )
    # The paper's one-step α: consecutive differences are orthogonal.
    alpha = one_step_alpha(_gram(trajectory, 3))
    torch.testing.assert_close(alpha[2:, 0], torch.zeros(len(trajectory) - 2, dtype=torch.float64), atol=1e-9, rtol=0)
    chain = ChainedPredictor(1, lambda step: alpha[step].tolist(), max_gap=3)
    assert chain.cached_coef(4, 2, 2) == (0.0,)


def test_gaps_the_prediction_cannot_beat_reuse_are_not_served():
    # A trajectory that reverses every step: extrapolating goes the wrong way, reuse is better.
    values = [torch.tensor([10.0 + (0.5 if t % 2 else 0.0)], dtype=torch.float64) for t in range(8)]
    fitted = fit_gap_coefficients([_gram(values, 2)], 2, [True], shrink=False)
    # D_1 reverses sign every step: the gap-1 fit is -1 (predicts y_{τ+1} exactly), gap 2 is 0.
    assert int(fitted.max_gap[3]) >= 1
    smooth = fit_gap_coefficients([_gram(_zigzag(), 2)], 2, [True])
    # τ = 1 has only g = 1, orthogonal to the next difference: no better than reuse.
    assert int(smooth.max_gap[1]) == 0
    assert (smooth.max_gap[2:] >= 1).all()


def test_shrinkage_falls_back_to_alpha_one_where_samples_disagree():
    # Two trajectories with opposite curvature: each alone fits a different gap coefficient, and
    # the pooled fit is not better on a held-out one than α = 1, which is exact on their mean.
    rising = [torch.tensor([float(t) + 0.3 * t * t, 1.0], dtype=torch.float64) for t in range(6)]
    falling = [torch.tensor([float(t) - 0.3 * t * t, 1.0], dtype=torch.float64) for t in range(6)]
    grams = [_gram(rising, 2), _gram(falling, 2)]
    fitted = fit_gap_coefficients(grams, 2, [True])
    unshrunk = fit_gap_coefficients(grams, 2, [True], shrink=False)
    # τ = 2, g = 1, k = 2: α = 1 gives c · r = k / g = 2.
    assert float(fitted.coef[2, 0, 1, 0] * fitted.refresh[2, 0, 0]) == pytest.approx(2.0, abs=1e-6)
    assert float(unshrunk.coef[2, 0, 1, 0] * unshrunk.refresh[2, 0, 0]) != pytest.approx(2.0, abs=1e-3)


def test_shrinkage_trusts_the_fit_only_as_far_as_it_helps_every_left_out_sample():
    # Two large trajectories that decelerate (their fit is well below α = 1) and one small one that
    # moves on at a constant rate (α = 1 nearly exact). Summed squared errors are the large ones':
    # the sum rule keeps their fit. Left out, the small one is predicted far worse by that fit than by
    # α = 1 (relative to its own error), so the worst-sample rule shrinks to α = 1 (the default is the sum).
    def curve(scale: float, bend: float, wobble: float = 0.0) -> list[torch.Tensor]:
        return [
            torch.tensor([scale * (t - bend * t * t), 1.0 + wobble * (t % 2)], dtype=torch.float64) for t in range(7)
        ]

    grams = [_gram(curve(10.0, 0.1), 2), _gram(curve(12.0, 0.08), 2), _gram(curve(0.1, 0.0, wobble=1e-3), 2)]
    worst = fit_gap_coefficients(grams, 2, [True], shrink_rule="worst")
    summed = fit_gap_coefficients(grams, 2, [True])
    # τ = 2, g = 1, k = 2: α = 1 is c · r = k / g = 2.
    assert float(worst.coef[2, 0, 1, 0] * worst.refresh[2, 0, 0]) == pytest.approx(2.0, abs=1e-6)
    assert float(summed.coef[2, 0, 1, 0] * summed.refresh[2, 0, 0]) < 1.5
    with pytest.raises(ValueError, match="shrink_rule"):
        fit_gap_coefficients(grams, 2, [True], shrink_rule="mean")


def _brute_force(num_steps, budget, cost, allows_gap, forced=()):
    best = None
    middle = [t for t in range(2, num_steps)]
    for chosen in itertools.combinations(middle, budget - 2):
        full = (0, 1, *chosen)
        if not set(forced) <= set(full):
            continue
        total, ok = 0.0, True
        for index, tau in enumerate(full):
            g = tau - full[index - 1] if index else 0
            end = full[index + 1] if index + 1 < len(full) else num_steps
            for k in range(1, end - tau):
                if tau == 0 or not allows_gap(tau, k):
                    ok = False
                    break
                total += cost(tau, g, k)
        if ok and (best is None or total < best[0] - 1e-12):
            best = (total, full)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_budget_search_finds_the_exhaustive_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    num_steps, budget = 11, 5
    table = torch.rand(num_steps, num_steps, num_steps, generator=generator)

    def cost(tau, g, k):
        return float(table[tau, g, k]) * k  # longer gaps cost more, with random structure

    def allows_gap(tau, k):
        return k <= 3

    planned = plan_full_steps(num_steps, budget, cost, allows_gap)
    expected = _brute_force(num_steps, budget, cost, allows_gap)
    assert len(planned) == budget
    assert planned == expected[1]


def test_budget_search_known_optimum_and_refusals():
    # Cached steps are free except right after step 5: the optimum makes step 6 full... no, step 5's
    # successors expensive to cache means 6 must be full; the rest spreads to respect gap <= 2.
    def cost(tau, g, k):
        return 100.0 if tau + k == 6 else 1.0

    planned = plan_full_steps(9, 5, cost, lambda tau, k: k <= 2)
    assert 6 in planned and len(planned) == 5 and planned[:2] == (0, 1)
    with pytest.raises(BudgetError, match="cannot be met"):
        plan_full_steps(9, 2, cost, lambda tau, k: k <= 2)  # 7 cached steps after step 1: too long a gap
    with pytest.raises(BudgetError, match="at least 3"):
        plan_full_steps(9, 2, cost, lambda tau, k: True, forced=(8,))


def _table_from(model, trajectories, timesteps, max_gap=3) -> AlphaTable:
    """A format-2 table fitted from hand-made trajectories of the dummy's input scale s_t.

    Every cache point of the dummy is s_t times a constant, and the coefficients are scale-free,
    so the 1-D trajectory's Gram serves every point.
    """
    explanation = sc_compile.explain(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    points = len(explanation.cache_points)
    grams = []
    for values in trajectories:
        one = _gram([torch.tensor([v], dtype=torch.float64) for v in values], max_gap)
        gram = BandedGram(len(values), points, one.width)
        gram.gram[:] = one.gram.expand(-1, points, -1)
        grams.append(gram)
    fitted = fit_gap_coefficients(grams, max_gap, [p.feeds_output for p in explanation.cache_points], shrink=False)
    alpha = torch.stack([one_step_alpha(g) for g in grams]).mean(0).float()
    return AlphaTable(
        alpha, explanation.model_class, explanation.fingerprint, "block", timesteps=tuple(timesteps), fitted=fitted
    )


def _run(compiled, values, timesteps):
    outputs = []
    with torch.no_grad():
        for value, t in zip(values, timesteps, strict=True):
            outputs.append(compiled(torch.ones(1, 4, 8) * value, torch.tensor([t]))[0, 0, 0].item() / output_scale())
    return outputs


def test_fitted_table_predicts_a_quadratic_trajectory_exactly_on_its_grid():
    """y(u) = 10 - u + 0.05 u²: the second difference is constant, and the gap-k coefficient on
    D_g predicts y_{τ+k} exactly for every (τ, g, k): cached steps equal the trajectory."""
    steps = 12
    values = [10.0 - u + 0.05 * u * u for u in range(steps)]
    timesteps = [1000.0 - 80.0 * u for u in range(steps)]
    model = DummyDiT()
    table = _table_from(model, [values], timesteps)
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": table, "full_steps": 5, "num_inference_steps": steps},
    )
    outputs = _run(compiled, values, timesteps)
    report = sc_compile.report(model)
    assert report.num_full_steps == 5 and report.cached_steps
    assert outputs == pytest.approx(values, abs=1e-4)
    # α = 1 extrapolates linearly and misses the curvature.
    torch._dynamo.reset()
    ones = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": "ones", "full_steps": 5, "num_inference_steps": steps},
    )
    assert _run(ones, values, timesteps) != pytest.approx(values, abs=1e-3)


@pytest.mark.parametrize("factor", [2, 4])
def test_other_step_counts_keep_the_gap_meaning_in_normalised_time(factor):
    """A table calibrated at 8 steps on a linear trajectory y(u) = 10 - u, used at 16 and 32 steps
    (u = t / factor): the mapped coefficient is α = 1 in normalised time, exact on a line; the
    chained table of a geometric trajectory r^u maps α to r^(1/factor) per step, exact too."""
    steps = 8
    linear = [10.0 - u for u in range(steps)]
    timesteps = [1000.0 - 100.0 * u for u in range(steps)]
    model = DummyDiT()
    table = _table_from(model, [linear], timesteps)
    n = steps * factor
    fine_values = [10.0 - t / factor for t in range(n)]
    fine_times = [1000.0 - 100.0 * t / factor for t in range(n)]
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": table, "full_steps": n // 3, "num_inference_steps": n},
    )
    assert _run(compiled, fine_values, fine_times) == pytest.approx(fine_values, abs=1e-4)
    report = sc_compile.report(model)
    assert report.num_full_steps == n // 3 and len(report.cached_steps) == n - n // 3

    # Chained: a geometric trajectory s_u = 2 + 8 · 0.7^u, α = 0.7 per calibrated step.
    geometric = [2.0 + 8.0 * 0.7**u for u in range(steps)]
    chained_table = _table_from(model, [geometric], timesteps)
    torch.testing.assert_close(
        chained_table.alpha[2:], torch.full_like(chained_table.alpha[2:], 0.7), rtol=1e-4, atol=1e-4
    )
    fine_geometric = [2.0 + 8.0 * 0.7 ** (t / factor) for t in range(n)]
    torch._dynamo.reset()
    chained = torch.compile(
        model,
        backend="scalingcache",
        options={
            "compiler": "eager",
            "alpha": chained_table,
            "coefficients": "chained",
            "full_steps": n // 3,
            "num_inference_steps": n,
        },
    )
    assert _run(chained, fine_geometric, fine_times) == pytest.approx(fine_geometric, abs=1e-4)


def test_a_table_that_cannot_serve_a_step_count_runs_full_with_a_warning(caplog):
    steps = 12
    model = DummyDiT()
    values = [10.0 - u for u in range(steps)]
    table = _table_from(model, [values], [1000.0 - 80.0 * u for u in range(steps)], max_gap=2)
    # 3 steps: each spans 4 calibrated steps, beyond the longest gap the table serves (2). The
    # predictor refuses the step count; a generation uses the table for what it serves (nothing).
    with pytest.raises(AlphaTableError, match="Calibrate at 3 steps"):
        make_predictor(table, num_points=table.num_points, num_steps=3, timestep_of=lambda s: None, fitted=True)
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "alpha": table, "num_inference_steps": 3}
    )
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        for step in range(3):
            compiled(torch.ones(1, 4, 8), torch.tensor([1000.0 - 300.0 * step]))
    report = sc_compile.report(model)
    assert report.full_steps == (0, 1, 2) and report.streams[0].reasons[2] == "α table serves no gap", str(report)
    assert sum("so no step could be cached" in r.message for r in caplog.records) == 1
    # Fitted coefficients asked of a format-1 table.
    old = AlphaTable(table.alpha, table.model_class, table.fingerprint, "block")
    with pytest.raises(AlphaTableError, match="format-2"):
        make_predictor(old, num_points=old.num_points, num_steps=steps, timestep_of=lambda s: None, fitted=True)


def test_format_1_tables_still_load_and_mean_chained_alpha(tmp_path):
    model = DummyDiT()
    explanation = sc_compile.explain(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    alpha = torch.full((7, len(explanation.cache_points)), 0.5)
    alpha[:2] = 1.0
    old = AlphaTable(alpha, explanation.model_class, explanation.fingerprint, "block")
    path = tmp_path / "alpha_v1.safetensors"
    old.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1" and list(handle.keys()) == ["alpha"]
    loaded = AlphaTable.load(path)
    assert loaded.fitted is None
    torch.testing.assert_close(loaded.alpha, alpha)
    predictor = make_predictor(
        loaded, num_points=loaded.num_points, num_steps=7, timestep_of=lambda s: None, fitted=False
    )
    # c for a 2-step gap after τ = 2: α3 + α3 α4 = .5 + .25.
    assert predictor.cached_coef(2, 1, 2) == pytest.approx((0.75,) * loaded.num_points)


def test_format_2_round_trip(tmp_path):
    model = DummyDiT()
    table = _table_from(model, [[10.0 - u + 0.05 * u * u for u in range(10)]], [1000.0 - 90.0 * u for u in range(10)])
    table.save(tmp_path / "alpha.safetensors")
    loaded = AlphaTable.load(tmp_path / "alpha.safetensors")
    assert loaded.fitted is not None
    for name in ("coef", "refresh", "error", "max_gap"):
        torch.testing.assert_close(getattr(loaded.fitted, name), getattr(table.fitted, name))
    assert isinstance(
        make_predictor(loaded, num_points=3, num_steps=10, timestep_of=lambda s: None, fitted=True), FittedPredictor
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"full_steps": 1}, "full_steps must be an int >= 2"),
        ({"speedup": 0.5}, "speedup must be a number >= 1"),
        ({"full_steps": 6, "static_interval": 2}, "full_steps and static_interval"),
        ({"coefficients": "taylor"}, "coefficients must be one of 'fitted', 'chained'"),
    ],
)
def test_schedule_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        sc_compile.ScalingCacheConfig(**options)


def test_budget_needs_the_step_count_and_speedup_sets_the_budget():
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "alpha": "ones", "full_steps": 4}
    )
    with pytest.raises(ValueError, match="need its step count"), torch.no_grad():
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
    torch._dynamo.reset()
    values = [10.0 - 0.5 * u for u in range(12)]
    timesteps = [1000.0 - 80.0 * u for u in range(12)]
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "alpha": "ones", "speedup": 3.0}
    )
    with sc_compile.generation(model, num_inference_steps=12):
        outputs = _run(compiled, values, timesteps)
    report = sc_compile.report(model)
    # α = 1 without a table: 4 full steps spread evenly; a line is extrapolated exactly.
    assert report.num_full_steps == 4 and report.full_steps[:2] == (0, 1)
    assert set(report.streams[0].reasons) == {"warm-up", "planned", "cached"}
    assert outputs == pytest.approx(values, abs=1e-4)


def _fitted_table(steps: int = 8, max_gap: int = 2):
    model = DummyDiT()
    return _table_from(
        model, [[10.0 - u + 0.05 * u * u for u in range(steps)]], [1000.0 - 100.0 * u for u in range(steps)], max_gap
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_gap", lambda f: torch.full_like(f.max_gap, 5), "max_gap must be int64 values in"),
        ("max_gap", lambda f: f.max_gap.float(), "max_gap must be int64"),
        ("error", lambda f: -f.error.nan_to_num(posinf=1.0).abs() - 1.0, "error must be >= 0"),
        ("refresh", lambda f: torch.zeros_like(f.refresh), "refresh must be positive"),
    ],
)
def test_inconsistent_format_2_files_are_refused_on_load(tmp_path, field, value, message):
    from safetensors.torch import load_file, save_file

    table = _fitted_table()
    path = tmp_path / "alpha.safetensors"
    table.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[field] = value(table.fitted)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AlphaTableError, match=message):
        AlphaTable.load(path)


def test_timesteps_beyond_the_calibrated_range_extrapolate_with_alpha_one():
    """Two full steps clamped to one position have no slope in the table: α = 1, not a crash."""
    table = _fitted_table()
    times = {0: 1200.0, 1: 1100.0, 2: 1050.0, 3: 1000.0}
    predictor = make_predictor(table, num_points=3, num_steps=None, timestep_of=times.get, fitted=True)
    assert predictor.cached_coef(1, 1, 1) == (1.0, 1.0, 1.0)
    assert predictor.refresh(1, 1) == (1.0, 1.0, 1.0)


def test_a_generation_past_a_table_without_timesteps_is_refused():
    table = _fitted_table()
    bare = AlphaTable(table.alpha, table.model_class, table.fingerprint, "block", fitted=table.fitted)
    predictor = make_predictor(bare, num_points=3, num_steps=None, timestep_of=lambda s: None, fitted=True)
    assert len(predictor.refresh(7, 1)) == 3
    with pytest.raises(AlphaTableError, match="past the 8 steps of the α table"):
        predictor.refresh(8, 1)


def test_a_plan_never_serves_a_gap_the_table_refuses():
    """A full step the plan did not place starts a gap the plan never checked: still bounded."""
    from sc_compile.decision.schedule import DecisionUnit

    class OnlyOneGap(ChainedPredictor):
        def allows_gap(self, last_full, gap):
            return gap <= 1

    unit = DecisionUnit(
        num_points=1,
        warmup_steps=3,
        predictor=OnlyOneGap(1, None, max_gap=1),
        planned_full_steps=(0, 1, 5),
        num_steps=8,
    )
    decisions = [unit.decide(step) for step in range(8)]
    # Steps 0-2 warm-up; 3 cached (gap 1), 4 full (gap 2 refused), 5 planned, 6 cached, 7 full.
    assert [d.full for d in decisions] == [True, True, True, False, True, True, False, True]
    assert decisions[4].reason == "longest gap"


def test_a_shifted_schedule_at_the_calibrated_step_count_is_mapped_not_read_as_the_grid():
    """Same step count, other sigmas (a scheduler shift): the steps are placed by sigma. Reading the
    table as its own grid there would apply each step's coefficients at the wrong noise level."""
    import dataclasses

    steps = 8
    sigmas = [1.0 - i / steps for i in range(steps + 1)]
    table = dataclasses.replace(_fitted_table(steps), sigmas=tuple(sigmas))
    same = make_predictor(table, num_points=3, num_steps=steps, timestep_of=lambda s: None, fitted=True, sigmas=sigmas)
    assert isinstance(same, FittedPredictor) and same._direct()
    shifted_sigmas = [3.0 * s / (1.0 + 2.0 * s) for s in sigmas]
    shifted = make_predictor(
        table, num_points=3, num_steps=steps, timestep_of=lambda s: None, fitted=True, sigmas=shifted_sigmas
    )
    assert not shifted._direct()
    assert shifted._u(2) == pytest.approx(steps * (1.0 - shifted_sigmas[2]), abs=1e-6)
    assert shifted.cached_coef(3, 1, 2) != pytest.approx(same.cached_coef(3, 1, 2), rel=1e-3)
    # Without the schedule's sigmas (no pipeline clock) the calibrated count reads the grid, as before.
    assert make_predictor(table, num_points=3, num_steps=steps, timestep_of=lambda s: None, fitted=True)._direct()


def _with_tensor(tmp_path, table: AlphaTable, name: str, value: torch.Tensor):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "alpha.safetensors"
    table.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors[name] = value
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", ["coef", "refresh", "alpha"])
def test_a_table_with_finite_but_huge_coefficients_is_refused_on_load(tmp_path, name):
    """Issue 21 item 6: 1e30 is finite, loads under a finiteness check alone, and makes NaN outputs."""
    table = _fitted_table()
    value = (table.alpha if name == "alpha" else getattr(table.fitted, name)).clone()
    value.view(-1)[value.numel() // 2] = 1e30
    path = _with_tensor(tmp_path, table, name, value)
    with pytest.raises(AlphaTableError, match="past what a fit can produce") as caught:
        AlphaTable.load(path)
    assert str(path) in str(caught.value)  # which file
    assert "Recalibrate" in str(caught.value)  # what to do


def test_the_limits_leave_what_the_fit_produces():
    """The fallback coefficients of the fit's floor on r sit inside the limits (the documented
    derivation), and the shipped tables load."""
    from sc_compile.calibration.fitting import COEF_LIMIT, REFRESH_FLOOR

    assert 1.0 / REFRESH_FLOOR <= COEF_LIMIT  # (k / g) / (REFRESH_FLOOR / g) = k / REFRESH_FLOOR
    from sc_compile.resources import assets_dir

    tables = sorted(assets_dir().glob("demo_*/alpha_*.safetensors"))
    assert len(tables) == 5  # Flux (2), Wan (2), SD3
    for path in tables:
        AlphaTable.load(path)
