"""The two-difference predictor at run time (issue 22 item 1): ``y_full + c₁·dy + c₂·dy_prev``.

A format-3 table whose fitted second coefficient is nonzero somewhere gives graphs with a third
buffer per cache point (the difference before last) and a second coefficient input; every other
table, α = 1 and ``predictor_order=1`` keep the two-buffer graphs (``test_passes.py``'s goldens).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sc_compile
from sc_compile.calibration.collect import error_db, relative_error
from sc_compile.calibration.fitting import SecondOrderCoefficients
from sc_compile.calibration.table import AlphaTable, SchedulePlans
from sc_compile.config import ScalingCacheConfig
from sc_compile.contract import state_input_names
from sc_compile.decision.coefficients import FittedPredictor, second_order_in_use
from sc_compile.decision.schedule import DecisionUnit
from sc_compile.errors import AlphaTableError, CacheMemoryError
from sc_compile.runtime.dispatch import runtimes_of
from sc_compile.runtime.state import StreamState

from dummy_dit import DummyDiT

STEPS = 12
CURVATURES = (0.02, 0.05, 0.08)


def _scale(t: int, curvature: float) -> float:
    """The dummy's input scale at step t: quadratic in t, so every cache point is too."""
    return 10.0 - t + curvature * t * t


def _inputs(t: int, curvature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(1, 4, 8) * _scale(t, curvature), torch.tensor([1000.0 - 50.0 * t])


def _sample(curvature: float):
    def run(compiled):
        for t in range(STEPS):
            compiled(*_inputs(t, curvature))

    return run


@pytest.fixture(scope="module")
def quadratic_table() -> AlphaTable:
    """A format-3 table fitted on quadratic trajectories of the dummy (three curvatures)."""
    table = sc_compile.calibrate(
        DummyDiT(), [_sample(c) for c in CURVATURES], progress=False, max_gap=3, second_order=True
    )
    assert table.fitted is not None and table.fitted.second is not None
    return table


def _first_order_only(table: AlphaTable) -> AlphaTable:
    """The same table as format 2 (its first-order coefficients only)."""
    assert table.fitted is not None
    return dataclasses.replace(table, fitted=dataclasses.replace(table.fitted, second=None))


def _generate(model, alpha, curvature: float, **options):
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": alpha, "full_steps": 6, "num_inference_steps": STEPS} | options,
    )
    with torch.no_grad():
        outputs = [compiled(*_inputs(t, curvature)) for t in range(STEPS)]
    return outputs, sc_compile.report(model), runtimes_of(model)[-1]


def test_a_quadratic_trajectory_is_predicted_exactly_with_two_differences_and_not_with_one(quadratic_table):
    model = DummyDiT()
    curvature = 0.065  # held out: not a calibration curvature
    with torch.no_grad():
        reference = [model(*_inputs(t, curvature)) for t in range(STEPS)]
    second, report2, runtime2 = _generate(model, quadratic_table, curvature)
    first, report1, runtime1 = _generate(model, quadratic_table, curvature, predictor_order=1)
    assert runtime2.layout.second_order and not runtime1.layout.second_order
    assert report1.full_steps == report2.full_steps and len(report2.full_steps) == 6
    assert report2.second_difference_steps and not report1.second_difference_steps
    # The cached steps right after the warm-up (full steps 0, 1) have one difference only.
    first_cached = [s for s in report2.cached_steps if s < report2.full_steps[2]]
    assert first_cached and not set(first_cached) & set(report2.second_difference_steps)
    assert "two differences" in str(report2) and "two differences" in report2.alpha_source
    for step in report2.second_difference_steps:
        scale = reference[step].abs().max()
        # Exact up to float32 rounding of the coefficients and buffers.
        assert (second[step] - reference[step]).abs().max() <= 1e-5 * scale, step
        assert (first[step] - reference[step]).abs().max() >= 1e-3 * scale, step
    # Full steps are the model's own outputs, bit for bit.
    for step in report2.full_steps:
        assert torch.equal(second[step], reference[step]), step


def test_the_full_step_shifts_dy_into_dy_prev_under_inductor(quadratic_table):
    """The difference before last is the dy the previous full step wrote, also when Inductor
    compiles the full step (it once wrote a mutated input aliased to another input from that input
    after its update: dy_prev got the new dy, a silent 3-5 % error)."""
    model = DummyDiT()
    curvature = 0.065
    with torch.no_grad():
        reference = [model(*_inputs(t, curvature)) for t in range(STEPS)]
    outputs, report, _ = _generate(model, quadratic_table, curvature, compiler="inductor")
    assert report.second_difference_steps
    for step in report.second_difference_steps:
        assert (outputs[step] - reference[step]).abs().max() <= 1e-5 * reference[step].abs().max(), step


def test_the_second_term_is_not_read_before_two_differences_exist(quadratic_table):
    """The first cached step after the warm-up has one difference (h = 0): c₂ = 0 from the decision
    side, even where the table's second coefficient is nonzero for every (τ, g, h, k)."""
    fitted = quadratic_table.fitted
    assert fitted is not None and fitted.second is not None
    everywhere = SecondOrderCoefficients(
        coef=torch.stack([fitted.second.coef[..., 0], torch.ones_like(fitted.second.coef[..., 1])], dim=-1),
        error=fitted.second.error,
    )
    predictor = FittedPredictor(dataclasses.replace(fitted, second=everywhere), None, second_order=True)
    unit = DecisionUnit(
        num_points=fitted.num_points,
        warmup_steps=2,
        predictor=predictor,
        planned_full_steps={0, 1, 4, 7, 10, 11},
        num_steps=STEPS,
        second_order=True,
    )
    decisions = [unit.decide(step) for step in range(STEPS)]
    assert [d.step for d in decisions if d.full] == [0, 1, 4, 7, 10, 11]
    # Steps 2, 3: after full steps 0, 1 only one difference exists (dy_prev holds none).
    for step in (2, 3):
        assert decisions[step].coef2 == (0.0,) * fitted.num_points
        assert not decisions[step].uses_second_difference
        assert decisions[step].coef == predictor.cached_coef(1, 1, step - 1)
    # Steps 5, 6: the full step 1 before the last one (4) had a difference (gap 1 after step 0).
    for step in (5, 6, 8, 9):
        assert decisions[step].uses_second_difference
    # A full step measures its change against what the step before it output (c₁ and c₂ of step 3).
    assert decisions[4].coef2 == decisions[3].coef2 and decisions[7].coef2 == decisions[6].coef2


def test_the_runtime_does_not_predict_from_a_difference_before_last_no_synced_full_step_wrote():
    """A stream's dy_prev is readable only when the full step that wrote it (as dy) ran in its unit's
    schedule and had a difference itself."""
    from sc_compile.contract import CachePointSpec, PointLayout

    point = CachePointSpec(0, "blocks.0", "x", (2,), torch.float32, feeds_output=True)
    state = StreamState(PointLayout([point], torch.device("cpu"), "f", second_order=True), None)
    assert len(state.buffers) == 3
    state.record_full(0, in_sync=True)
    state.record_full(1, in_sync=True)
    assert state.has_difference and not state.has_second_difference  # step 0's dy was no difference
    state.record_full(3, in_sync=True)
    assert state.has_second_difference and state.previous_full_step == 1
    state.record_full(4, in_sync=False)  # catching up: its dy is not the schedule's
    state.record_full(6, in_sync=True)
    assert not state.has_second_difference


def test_first_order_where_the_second_term_is_noise_keeps_the_first_order_graph_and_outputs(quadratic_table):
    """A format-3 table whose fit chose first order everywhere (c₂ = 0) compiles the two-buffer
    graph and predicts bit for bit as its format-2 self; per point, c₁ where c₂ = 0 is the
    first-order coefficient exactly."""
    fitted = quadratic_table.fitted
    assert fitted is not None and fitted.second is not None
    noise = SecondOrderCoefficients(
        coef=torch.stack([fitted.second.coef[..., 0], torch.zeros_like(fitted.second.coef[..., 1])], dim=-1),
        error=fitted.second.error,
    )
    none_used = dataclasses.replace(quadratic_table, fitted=dataclasses.replace(fitted, second=noise))
    assert not second_order_in_use(none_used, ScalingCacheConfig())
    model = DummyDiT()
    outputs, _, runtime = _generate(model, none_used, 0.05)
    expected, _, _ = _generate(model, _first_order_only(quadratic_table), 0.05)
    assert not runtime.layout.second_order
    for a, b in zip(outputs, expected, strict=True):
        assert torch.equal(a, b)
    # Mixed: the second term at point 0 only; the other points keep c₁ of first order.
    mixed_coef = fitted.second.coef.clone()
    mixed_coef[..., 1:, 1] = 0.0
    mixed = dataclasses.replace(fitted, second=SecondOrderCoefficients(coef=mixed_coef, error=fitted.second.error))
    predictor = FittedPredictor(mixed, None, second_order=True)
    c1, c2 = predictor.cached_coefs(4, 3, 1, 2)
    assert c2 is not None and all(c == 0.0 for c in c2[1:])
    assert c1[1:] == predictor.cached_coef(4, 3, 2)[1:]


@pytest.mark.parametrize("kind", ["ones", "format-1", "format-2", "format-3 order 1"])
def test_first_order_tables_keep_the_two_buffer_state_and_decisions(quadratic_table, kind):
    alpha = {
        "ones": "ones",
        "format-1": dataclasses.replace(quadratic_table, fitted=None),
        "format-2": _first_order_only(quadratic_table),
        "format-3 order 1": quadratic_table,
    }[kind]
    options = {"predictor_order": 1} if kind == "format-3 order 1" else {}
    model = DummyDiT()
    _, report, runtime = _generate(model, alpha, 0.05, **options)
    assert not runtime.layout.second_order and not report.second_difference_steps
    (stream,) = runtime.streams
    assert len(stream.buffers) == 2 * runtime.num_points
    generation = runtime.session.last_generation
    (layout_state,) = generation.layouts.values()
    unit = next(iter(layout_state.decisions.units.values()))
    assert all(d.coef2 is None for d in unit.decisions)
    assert layout_state.first_step.values.shape[0] == 2


def test_memory_counts_the_third_buffer(quadratic_table):
    model = DummyDiT()
    args = torch.ones(1, 4, 8), torch.tensor([1.0])
    first = sc_compile.explain(model, *args)
    second = sc_compile.explain(model, *args, alpha=quadratic_table)
    off = sc_compile.explain(model, *args, alpha=quadratic_table, predictor_order=1)
    stats = first.buffer_bytes_per_stream - sum(p.buffer_nbytes(None) for p in first.cache_points)
    assert second.second_order and not off.second_order
    assert off.buffer_bytes_per_stream == first.buffer_bytes_per_stream
    assert second.buffer_bytes_per_stream - stats == (first.buffer_bytes_per_stream - stats) * 3 // 2
    assert "(second term)" in str(second) and "two differences" in str(second)
    _, _, runtime = _generate(model, quadratic_table, 0.05)
    (stream,) = runtime.streams
    assert stream.nbytes == second.buffer_bytes_per_stream
    # A limit between the two sizes refuses the second-order state and names predictor_order=1.
    limit = (first.buffer_bytes_per_stream + second.buffer_bytes_per_stream) // 2
    with pytest.raises(Exception, match=f"{CacheMemoryError.__name__}(.|\n)*predictor_order=1"):
        _generate(model, quadratic_table, 0.05, max_cache_bytes=limit)
    _generate(model, quadratic_table, 0.05, max_cache_bytes=limit, predictor_order=1)


def test_predictor_order_is_validated(quadratic_table):
    for bad in (0, 3, True, 1.0, "2"):
        with pytest.raises(ValueError, match="predictor_order must be 1, 2 or None"):
            ScalingCacheConfig(predictor_order=bad)
    with pytest.raises(ValueError, match="alpha='ones'"):
        ScalingCacheConfig(predictor_order=2, alpha="ones")
    with pytest.raises(ValueError, match="chained"):
        ScalingCacheConfig(predictor_order=2, coefficients="chained")
    with pytest.raises(AlphaTableError, match="two-difference"):
        second_order_in_use(_first_order_only(quadratic_table), ScalingCacheConfig(predictor_order=2))
    assert second_order_in_use(quadratic_table, ScalingCacheConfig(predictor_order=2))
    assert not second_order_in_use(quadratic_table, ScalingCacheConfig(coefficients="chained"))
    assert ScalingCacheConfig.from_dict(ScalingCacheConfig(predictor_order=1).to_dict()).predictor_order == 1


def test_state_inputs_of_a_second_order_graph():
    assert state_input_names(2, second_order=True) == [
        "sc_is_full",
        "sc_y_full_0",
        "sc_dy_0",
        "sc_dy_prev_0",
        "sc_y_full_1",
        "sc_dy_1",
        "sc_dy_prev_1",
        "sc_coef",
        "sc_refresh",
        "sc_coef2",
        "sc_stats",
    ]
    assert state_input_names(1) == ["sc_is_full", "sc_y_full_0", "sc_dy_0", "sc_coef", "sc_refresh", "sc_stats"]


def test_sketched_points_keep_a_third_sketch_buffer(quadratic_table):
    """Points no cached step reads keep sketches: the second-order layout gives them a third one."""
    model = DummyDiT()
    args = torch.ones(1, 1024, 8), torch.tensor([1.0])
    first = sc_compile.explain(model, *args)
    second = sc_compile.explain(model, *args, alpha=quadratic_table)
    sketched = [p for p in second.cache_points if p.sketch is not None]
    assert sketched and [p.sketch for p in first.cache_points] == [p.sketch for p in second.cache_points]
    stats = first.buffer_bytes_per_stream - sum(p.buffer_nbytes(None) for p in first.cache_points)
    assert second.buffer_bytes_per_stream - stats == (first.buffer_bytes_per_stream - stats) * 3 // 2
    assert "sc_dy_prev_0" in second.full_step_graph and "sc_dy_prev_0" not in second.cached_step_graph
    # A generation with sketched points predicts the quadratic as exactly as with full ones.
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": quadratic_table, "full_steps": 6, "num_inference_steps": STEPS},
    )
    with torch.no_grad():
        inputs = [(torch.ones(1, 1024, 8) * _scale(t, 0.065), torch.tensor([1000.0 - 50.0 * t])) for t in range(STEPS)]
        outputs = [compiled(*x) for x in inputs]
        reference = [model(*x) for x in inputs]
    report = sc_compile.report(model)
    assert report.second_difference_steps
    for step in report.second_difference_steps:
        assert (outputs[step] - reference[step]).abs().max() <= 1e-5 * reference[step].abs().max(), step


def _returning(curvature: float):
    """The dummy's generation on a quadratic trajectory, returning every step's output."""

    def run(compiled):
        return torch.stack([compiled(*_inputs(t, curvature)) for t in range(STEPS)])

    return run


def test_calibration_chooses_plans_with_the_predictor_that_runs_them():
    """``calibrate(second_order=True)`` judges every candidate schedule with two differences, as a
    generation with the table runs it: each stored plan's calibrated error is the error of running
    it. (The rollouts once ran on the calibration's graphs, which keep no difference before last:
    the plans were chosen, and their errors stored, for a predictor the table does not run.)"""
    model = DummyDiT()
    table = sc_compile.calibrate(
        model, [_returning(c) for c in CURVATURES], progress=False, max_gap=3, second_order=True, plan_samples=1
    )
    plans = table.plans
    assert plans is not None
    with torch.no_grad():
        reference = _returning(CURVATURES[0])(model)
    read_second = False
    for index, budget in enumerate(plans.counts()):
        torch._dynamo.reset()
        options = {"compiler": "eager", "alpha": table, "full_steps": budget, "num_inference_steps": STEPS}
        compiled = torch.compile(model, backend="scalingcache", options=options)
        with torch.no_grad():
            output = _returning(CURVATURES[0])(compiled)
        report = sc_compile.report(model)
        assert report.full_steps == plans.steps(index)
        read_second |= bool(report.second_difference_steps)
        measured = error_db([relative_error(output, reference)])
        assert measured == pytest.approx(float(plans.error[index]), abs=0.01), (budget, report)
    assert read_second  # the second term is read at some budget: the check above tells the predictors apart
    # Each budget also ran with one difference; the better order is stored with its plan.
    assert len(plans.orders) == len(plans.counts()) and set(plans.orders) <= {1, 2}
    assert all(source.endswith(("one difference", "two differences")) for source in plans.sources)


def test_a_plan_chosen_with_one_difference_runs_with_one(quadratic_table, tmp_path):
    """A format-3 table's stored plan says which order its rollouts chose; a generation running it
    reads the second term only where the plan was chosen with it (``predictor_order`` overrides)."""
    model = DummyDiT()
    steps = (0, 1, 2, 4, 6, 8, 10, 11)
    mask = torch.zeros(1, STEPS, dtype=torch.bool)
    mask[0, list(steps)] = True

    def with_order(order: int) -> AlphaTable:
        plans = SchedulePlans(mask, torch.tensor([-40.0]), -30.0, 10.0, ("a test plan",), 1, (order,))
        return dataclasses.replace(quadratic_table, plans=plans)

    curvature = 0.065
    ran = {}
    for order in (1, 2):
        outputs, report, runtime = _generate(model, with_order(order), curvature, full_steps=len(steps))
        assert report.full_steps == steps and runtime.layout.second_order  # one layout, three buffers
        ran[order] = (outputs, report)
    assert ran[2][1].second_difference_steps and not ran[1][1].second_difference_steps
    first, _, _ = _generate(model, with_order(2), curvature, full_steps=len(steps), predictor_order=1)
    assert all(torch.equal(a, b) for a, b in zip(ran[1][0], first, strict=True))  # the first-order coefficients
    _, report, _ = _generate(model, with_order(1), curvature, full_steps=len(steps), predictor_order=2)
    assert report.second_difference_steps and "run with two differences (predictor_order=2)" in report.schedule
    # A table without the two-difference coefficients runs such a plan with one, and says so.
    _, report, runtime = _generate(
        model,
        dataclasses.replace(_first_order_only(quadratic_table), plans=with_order(2).plans),
        curvature,
        full_steps=len(steps),
    )
    assert not runtime.layout.second_order and not report.second_difference_steps
    assert "run with one difference)" in report.schedule, report.schedule
    # The orders survive a file; a file without them (and any plan) means the table's own order.
    path = tmp_path / "alpha.safetensors"
    with_order(1).save(path)
    loaded = AlphaTable.load(path).plans
    assert loaded is not None and loaded.orders == (1,) and loaded.order(0) == 1
    assert SchedulePlans(mask, torch.tensor([-40.0]), -30.0, 10.0).order(0) is None
    with pytest.raises(AlphaTableError, match="plan orders"):
        SchedulePlans(mask, torch.tensor([-40.0]), -30.0, 10.0, (), 1, (3,))
