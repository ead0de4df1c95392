"""Schedules chosen end to end at calibration time, stored in the α table, and the planned default
(issue 22 items 2-4; :mod:`sc_compile.decision.plans`)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import sc_compile
from sc_compile.calibration.collect import candidate_schedules, choose_plans
from sc_compile.calibration.fitting import FittedCoefficients
from sc_compile.calibration.table import AlphaTable, SchedulePlans
from sc_compile.config import ScalingCacheConfig, Schedule
from sc_compile.decision.budget import schedule_error
from sc_compile.decision.coefficients import make_predictor
from sc_compile.decision.plans import feasible, interval_schedules, leading_full, map_plan, uniform_schedule
from sc_compile.errors import AlphaTableError, BudgetError

from dummy_dit import DummyDiT

STEPS = 20


def _toy_table(num_steps: int = 12, max_gap: int = 4) -> AlphaTable:
    """A fitted table whose one-step errors grow as k² (with a ripple over τ), every gap up to ``max_gap`` served."""
    k = torch.arange(1, max_gap + 1, dtype=torch.float32).view(1, 1, max_gap)
    tau = torch.arange(num_steps, dtype=torch.float32).view(num_steps, 1, 1)
    error = (0.01 * k**2 * (1 + 0.3 * torch.cos(tau))).expand(num_steps, max_gap + 1, max_gap).contiguous()
    fitted = FittedCoefficients(
        coef=k.view(1, 1, max_gap, 1).expand(num_steps, max_gap + 1, max_gap, 1).contiguous(),
        refresh=torch.ones(num_steps, max_gap + 1, 1),
        error=error,
        max_gap=torch.full((num_steps,), max_gap, dtype=torch.int64),
    )
    return AlphaTable(torch.ones(num_steps, 1), "Toy", "toy", "block", fitted=fitted)


def test_end_to_end_choice_matches_exhaustive_search_where_one_step_errors_mislead():
    """A toy whose closed-loop error propagates (the error model of budget.py with ρ = 3): the sum of
    one-step errors (today's planner, ρ = 0) picks a schedule the closed loop ranks badly; the end-to-end
    choice picks the exhaustive search's best schedule."""
    table, n, budget = _toy_table(), 12, 6
    predictor = make_predictor(table, num_points=1, num_steps=n, timestep_of=lambda s: None, fitted=True)

    def closed_loop(steps) -> float:
        return schedule_error(n, steps, predictor.segment_cost, propagation=3.0)

    everything = [(0, 1, *rest) for rest in itertools.combinations(range(2, n), budget - 2)]
    exhaustive = min((s for s in everything if feasible(s, n, predictor.allows_gap)), key=closed_loop)
    candidates = dict((steps, name) for name, steps in candidate_schedules(table, n, budget, [True]))
    one_step = next(s for s, name in candidates.items() if name == "budget planner ρ=0")
    assert closed_loop(one_step) > 2 * closed_loop(exhaustive)  # the sum of one-step errors picks wrong

    ran: list[tuple[int, ...]] = []

    def rollout(config: ScalingCacheConfig, run_table: AlphaTable):
        if config.schedule is Schedule.DYNAMIC:
            steps = tuple(range(n))  # stands for the dynamic rule's schedule
            return [10 * math.log10(closed_loop(uniform_schedule(n, 8, 2, 0)))], [steps]
        assert run_table.plans is not None and config.full_steps == budget
        steps = run_table.plans.steps(0)
        ran.append(steps)
        return [10 * math.log10(closed_loop(steps))], [steps]

    plans = choose_plans(table, rollout, base=ScalingCacheConfig(alpha=table), feeds_output=[True], budgets=[budget])
    assert plans.steps(0) == exhaustive
    assert float(plans.error[0]) == pytest.approx(10 * math.log10(closed_loop(exhaustive)))
    assert set(ran) == set(candidates)  # every candidate was run closed loop, each once
    # Without the closed loop, the choice would have been the one-step planner's.
    assert one_step != exhaustive
    # Local search from a worse start (only the one-step planner's candidate) climbs to a local optimum.
    monkey_candidates = [("budget planner ρ=0", one_step)]
    import sc_compile.calibration.collect as collect

    original = collect.candidate_schedules
    collect.candidate_schedules = lambda *args, **kwargs: monkey_candidates
    try:
        refined = choose_plans(
            table, rollout, base=ScalingCacheConfig(alpha=table), feeds_output=[True], budgets=[budget], refine=5
        )
    finally:
        collect.candidate_schedules = original
    steps = refined.steps(0)
    assert closed_loop(steps) < closed_loop(one_step) and refined.source(0) == "budget planner ρ=0, refined"
    for position in range(2, budget):
        for shift in (-1, 1):
            moved = list(steps)
            moved[position] += shift
            if len(set(moved)) == budget and moved == sorted(moved) and moved[-1] < n:
                assert closed_loop(tuple(moved)) >= closed_loop(steps)


def _plans(counts_errors, reference=-40.0, num_steps=STEPS) -> SchedulePlans:
    rows = [uniform_schedule(num_steps, count, 2, 0) for count, _ in counts_errors]
    full = torch.zeros(len(rows), num_steps, dtype=torch.bool)
    for i, row in enumerate(rows):
        full[i, list(row)] = True
    return SchedulePlans(full, torch.tensor([e for _, e in counts_errors]), reference, 12.0, ("a", "b", "c", "d"))


def test_a_candidate_replaces_the_planners_schedule_only_where_it_is_better_on_every_sample():
    """Two rollout samples: a candidate whose mean error is lower because one sample is much better,
    the other worse, does not replace the budget planner's schedule; one better on both does."""
    table, n, budget = _toy_table(), 12, 6
    candidates = dict((steps, name) for name, steps in candidate_schedules(table, n, budget, [True]))
    planner = next(s for s, name in candidates.items() if name == "budget planner ρ=0")
    others = [s for s in candidates if s != planner]
    assert len(others) >= 2

    def run(per_schedule):
        def rollout(config: ScalingCacheConfig, run_table: AlphaTable):
            if config.schedule is Schedule.DYNAMIC:
                return [-30.0, -30.0], [tuple(range(n))] * 2
            assert run_table.plans is not None
            steps = run_table.plans.steps(0)
            return per_schedule.get(steps, [-10.0, -10.0]), [steps] * 2

        return choose_plans(
            table, rollout, base=ScalingCacheConfig(alpha=table), feeds_output=[True], budgets=[budget]
        ).steps(0)

    noisy = {planner: [-20.0, -20.0], others[0]: [-40.0, -15.0]}  # mean -27.5, but worse on sample 2
    assert run(noisy) == planner
    better = {**noisy, others[1]: [-21.0, -22.0]}  # better on both samples
    assert run(better) == others[1]


def test_default_choice_is_the_largest_speedup_within_the_dynamic_rules_error():
    plans = _plans([(12, -45.0), (10, -41.0), (8, -39.0), (6, -30.0)])
    assert plans.counts()[plans.default_index()] == 10  # 8 full is worse than the dynamic rule's -40 dB
    assert _plans([(12, -35.0), (8, -30.0)]).default_index() is None  # none is within: the dynamic rule runs
    assert plans.index_for_budget(8, STEPS) == 2 and plans.index_for_budget(9, STEPS) is None
    assert plans.index_for_budget(20, 2 * STEPS) == 1  # 10 of 20 steps maps to 20 of 40


@pytest.mark.parametrize("steps", [7, 10, 20, 25, 28, 40, 100, 200])
def test_mapping_a_plan_keeps_its_fraction_and_is_deterministic(steps):
    for plan in (uniform_schedule(50, 16, 4, 1), uniform_schedule(50, 10, 2, 0), tuple(range(25)) + (30, 40)):
        mapped = map_plan(plan, 50, steps)
        assert mapped == map_plan(plan, 50, steps)
        assert len(mapped) == max(2, min(steps, round(len(plan) * steps / 50)))
        assert mapped[:2] == (0, 1) and list(mapped) == sorted(set(mapped)) and mapped[-1] < steps
        assert (49 in plan) == (steps - 1 in mapped) or len(mapped) == 2
    plan = uniform_schedule(50, 16, 4, 1)
    assert map_plan(plan, 50, 50) == plan
    assert map_plan(plan, 50, 100, budget=20)[:2] == (0, 1) and len(map_plan(plan, 50, 100, budget=20)) == 20
    # Twice the steps and twice the full steps: the same spacing in steps, a warm-up twice as long.
    doubled = map_plan(plan, 50, 100)
    assert leading_full(doubled) == 2 * leading_full(plan) - 1 or leading_full(doubled) == 2 * leading_full(plan)
    with pytest.raises(ValueError, match="steps 0 and 1"):
        map_plan((0, 2, 5), 10, 20)


def test_interval_candidates_are_taylorseers_spacing_with_exactly_the_budget():
    # TaylorSeer (diffusers) runs step s in full where s < w or (s - w - 1) % I == 0.
    def taylorseer(n: int, w: int, interval: int) -> tuple[int, ...]:
        return tuple(s for s in range(n) if s < w or (s - w - 1) % interval == 0)

    for n, budget in ((50, 16), (50, 12), (50, 10), (28, 9), (100, 20)):
        found = interval_schedules(n, budget)
        assert found, (n, budget)
        for name, steps in found:
            w, interval = int(name.split("warm-up ")[1]), int(name.split()[1])
            assert len(steps) == budget and steps == taylorseer(n, w, interval)
            # the shortest such interval: one less gives more than the budget
            assert len(taylorseer(n, w, interval - 1)) > budget or interval == 2
    assert (0, 1, 3, 8, 13, 18, 23, 28, 33, 38, 43, 48) in [s for _, s in interval_schedules(50, 12)]
    assert interval_schedules(50, 25) == []  # no interval gives exactly 25 after a warm-up of 2 to 6


def _generation(seed: int, steps: int = STEPS):
    """A closed-loop generation of the dummy model (a nonlinear sampler), returning its output."""

    def run(compiled):
        x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(seed))
        for t in range(steps):
            v = compiled(x, torch.tensor([1000.0 - (1000.0 / steps) * t]))
            x = x + (1.0 / steps) * torch.sin(v + t / (steps / 6.0))
        return x

    return run


@pytest.fixture(scope="module")
def planned_table():
    return sc_compile.calibrate(DummyDiT(), [_generation(s) for s in range(2)], progress=False)


def _run(table, steps: int, **options):
    torch._dynamo.reset()
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "alpha": table, **options})
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=steps):
        _generation(7, steps)(compiled)
    return sc_compile.report(model)


def test_calibration_stores_plans_that_run_exactly(planned_table, tmp_path):
    plans = planned_table.plans
    assert plans is not None and plans.num_steps == STEPS and plans.samples == 2
    counts = plans.counts()
    assert counts == sorted(counts, reverse=True) and STEPS // 2 in counts and STEPS // 5 in counts
    assert all(e <= -5.0 for e in plans.error.tolist())  # errors of outputs, in dB
    # A budget the table stores runs that plan, exactly its full steps, at the calibrated count and mapped.
    for steps, budget in ((STEPS, STEPS // 4), (2 * STEPS, STEPS // 2)):
        report = _run(planned_table, steps, full_steps=budget)
        assert report.num_full_steps == budget, report
        assert "end-to-end plan" in report.schedule
        if steps == STEPS:
            assert report.full_steps == plans.steps(plans.counts().index(budget))
    report = _run(planned_table, STEPS, speedup=4)
    assert report.full_steps == plans.steps(plans.counts().index(STEPS // 4))
    assert report.schedule.startswith(f"speedup=4 ({STEPS // 4} full): the α table's end-to-end plan")
    # Without stored plans (or with propagation), today's planner places the budget, and says so.
    report = _run(dataclasses.replace(planned_table, plans=None), STEPS, full_steps=STEPS // 4)
    assert report.num_full_steps == STEPS // 4 and "one-step errors" in report.schedule
    report = _run(planned_table, STEPS, full_steps=STEPS // 4, propagation=1.0)
    assert report.num_full_steps == STEPS // 4 and "(ρ = 1)" in report.schedule
    # schedule='planned': the stored default, said in one line.
    report = _run(planned_table, STEPS, schedule="planned")
    index = plans.default_index()
    if index is None:
        assert report.schedule.startswith("dynamic rule")
    else:
        assert report.full_steps == plans.steps(index) and report.schedule.startswith("planned default")
        assert "schedule: planned default" in str(report)
    # The plans survive a file.
    path = tmp_path / "alpha.safetensors"
    planned_table.save(path)
    loaded = AlphaTable.load(path).plans
    assert loaded is not None and torch.equal(loaded.full, plans.full) and torch.equal(loaded.error, plans.error)
    assert (loaded.reference_error, loaded.sources) == (plans.reference_error, plans.sources)


def test_the_default_stays_dynamic_and_schedule_options_are_checked(planned_table):
    assert _run(planned_table, STEPS).schedule == "dynamic rule ε > δ (the default)"
    assert _run(planned_table, STEPS, schedule="dynamic").schedule == "dynamic rule ε > δ (schedule='dynamic')"
    with pytest.raises(ValueError, match="each choose the schedule"):
        ScalingCacheConfig(schedule="planned", full_steps=5)
    with pytest.raises(ValueError, match="alpha='ones'"):
        ScalingCacheConfig(schedule="planned", alpha="ones")
    with pytest.raises(ValueError, match="schedule must be one of"):
        ScalingCacheConfig(schedule="fastest")


def test_the_default_above_the_calibrated_step_count_runs_the_stored_plan(planned_table):
    """No option: at or below the table's step count the dynamic rule, above it the stored default plan
    mapped by position (the dynamic rule lost there held out); without plans, or the step count
    unknown, the dynamic rule."""
    known = _plans([(12, -45.0), (10, -41.0), (8, -39.0)], reference=-40.0)
    table = dataclasses.replace(planned_table, plans=known)
    assert _run(table, STEPS).schedule == "dynamic rule ε > δ (the default)"
    assert _run(table, STEPS - 5).schedule == "dynamic rule ε > δ (the default)"
    report = _run(table, 2 * STEPS)
    assert report.num_full_steps == 20 and report.schedule.startswith("planned default"), report.schedule
    assert f"the default above the table's calibrated {STEPS} steps" in report.schedule
    assert _run(table, 2 * STEPS, schedule="dynamic").schedule == "dynamic rule ε > δ (schedule='dynamic')"
    bare = dataclasses.replace(planned_table, plans=None)
    assert _run(bare, 2 * STEPS).schedule == "dynamic rule ε > δ (the default)"
    # The step count unknown (no context declaring it): the dynamic rule, never an error.
    torch._dynamo.reset()
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "alpha": table})
    with torch.no_grad():
        _generation(7, 2 * STEPS)(compiled)
    assert sc_compile.report(model).schedule == "dynamic rule ε > δ (the default)"


def test_a_warm_up_longer_than_the_planned_default_runs_the_dynamic_rule_and_says_why(planned_table):
    """Above the calibrated step count the default runs the stored plan; where the user's warm-up alone
    needs more full steps than that plan has, the default is the dynamic rule (said in the report),
    and an explicit schedule='planned' is refused saying what forces the steps, not a budget the
    user never set."""
    known = _plans([(12, -45.0), (10, -41.0), (8, -39.0)], reference=-40.0)
    table = dataclasses.replace(planned_table, plans=known)
    for warmup in (30, 20):  # more full steps than the plan's 20 of 40, and as many (no gap left to place)
        report = _run(table, 2 * STEPS, warmup_steps=warmup)
        assert report.schedule.startswith("dynamic rule ε > δ: the table's planned default"), report.schedule
        assert f"around the {warmup} full steps the warm-up and final steps force" in report.schedule
        assert set(range(warmup)) <= set(report.full_steps)
        with pytest.raises(BudgetError, match="schedule='planned': the table's planned default .* lower warmup_steps"):
            _run(table, 2 * STEPS, warmup_steps=warmup, schedule="planned")
    # A warm-up the plan can hold: the planner places the plan's count with it.
    report = _run(table, 2 * STEPS, warmup_steps=12)
    assert report.num_full_steps == 20 and set(range(12)) <= set(report.full_steps), report.schedule


def test_tables_without_plans_load_and_mean_what_they_meant(planned_table, tmp_path):
    bare = dataclasses.replace(planned_table, plans=None)
    first_order = dataclasses.replace(bare, fitted=None)
    for table, version in ((first_order, "1"), (bare, "2")):
        path = tmp_path / f"format{version}.safetensors"
        table.save(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            assert (handle.metadata()["format_version"], "plans" in handle.keys()) == (version, False)
        loaded = AlphaTable.load(path)
        assert loaded.plans is None and (loaded.fitted is None) == (version == "1")
    # A file with half of the plan tensors is refused, saying what it expected.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "with_plans.safetensors"
    planned_table.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    del tensors["plan_error"]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(AlphaTableError, match="expected the tensors"):
        AlphaTable.load(tmp_path / "broken.safetensors")


def test_calibrate_checks_plan_samples():
    with pytest.raises(ValueError, match="plan_samples"):
        sc_compile.calibrate(DummyDiT(), [_generation(0)], progress=False, plan_samples=2)

    def returns_nothing(compiled):
        _generation(0)(compiled)

    with pytest.raises(ValueError, match="returned no tensor"):
        sc_compile.calibrate(DummyDiT(), [returns_nothing], progress=False, plan_samples=1)
    assert sc_compile.calibrate(DummyDiT(), [returns_nothing], progress=False).plans is None


def test_planned_default_runs_the_stored_choice_or_says_why_not(planned_table, monkeypatch):
    """With the default switched to planned (one constant), no option runs the stored default plan; a
    table whose plans are all worse than the dynamic rule runs the dynamic rule and says why."""
    import sc_compile.config as config

    plans = planned_table.plans
    known = _plans([(12, -45.0), (10, -41.0), (8, -39.0)], reference=-40.0)
    table = dataclasses.replace(planned_table, plans=known)
    monkeypatch.setattr(config, "DEFAULT_SCHEDULE", Schedule.PLANNED)
    report = _run(table, STEPS)
    assert report.full_steps == known.steps(1) and report.num_full_steps == 10
    assert report.schedule.startswith("planned default") and "-41.0 dB" in report.schedule
    # At twice the steps: the same plan by position, twice its full steps.
    assert _run(table, 2 * STEPS).num_full_steps == 20
    worse = dataclasses.replace(known, error=torch.tensor([-30.0, -20.0, -10.0]))
    report = _run(dataclasses.replace(planned_table, plans=worse), STEPS)
    assert report.schedule.startswith("dynamic rule ε > δ: no stored plan")
    assert plans is not None


@pytest.mark.parametrize("steps", [20, 28, 50, 100, 200])
def test_alpha_one_default_never_collapses(steps):
    """Without a table the default (dynamic, α = 1) caches at every step count and never runs more
    cached steps in a row than the safeguard (20 % of the steps)."""
    torch._dynamo.reset()
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "alpha": "ones"})
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=steps):
        x = torch.ones(1, 4, 8)
        for t in range(steps):
            x = x - (0.1 / steps) * compiled(x, torch.tensor([1000.0 - (1000.0 / steps) * t]))
    report = sc_compile.report(model)
    assert report.warmup_steps < report.num_full_steps < 0.9 * steps, report
    full = [*report.full_steps, steps]
    assert max(b - a for a, b in zip(full, full[1:], strict=False)) - 1 <= math.ceil(0.2 * steps)
    assert report.schedule == "dynamic rule ε > δ (the default)"


def test_calibration_skips_budgets_no_schedule_meets_within_the_served_gaps():
    """With gaps of one step only, fewer than half the steps full is no schedule at all: the default
    budgets below it are left out of the table (it once raised the planner's BudgetError from
    inside calibration), and asking for one at run time says why."""
    table = sc_compile.calibrate(DummyDiT(), [_generation(s) for s in range(2)], progress=False, max_gap=1)
    plans = table.plans
    assert plans is not None and plans.counts() and min(plans.counts()) >= STEPS // 2
    with pytest.raises(BudgetError, match="cannot be met"):
        _run(table, STEPS, full_steps=STEPS // 4)
