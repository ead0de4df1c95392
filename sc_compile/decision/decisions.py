"""The seam between the runtime and the decision logic (``schedule.py``, ``coefficients.py``,
``budget.py``).

Everything the runtime asks of the decision logic goes through :class:`Decisions`: the
generation's predictor (the coefficients of the α table, fitted or chained, mapped to the
generation's step count) and, for a budget, its planned full steps; the decision units; folding in
the statistics of full steps (none are read when the schedule does not depend on them); deciding a
step; and writing a decision's coefficients into the step's device buffers. The runtime gives it, per step,
a :class:`StepInfo`: the step index, the generation's step count when known, and the step's
timestep and sigma when known (read lazily, so a decision that does not need them costs no host
read).

The steps a unit decides are contiguous from the first step it sees: a step at which none of its
streams ran is decided (and its coefficients accumulated) when a later step asks, so a stream that
comes back predicts across the gap with the closed form of SPEC §1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from sc_compile.calibration.table import AlphaTable
from sc_compile.config import ChangePoints, Coefficients, ScalingCacheConfig, Schedule
from sc_compile.decision.budget import plan_full_steps
from sc_compile.decision.coefficients import (
    SHORT_SCHEDULE_STEPS,
    FittedPredictor,
    NoCachePredictor,
    Predictor,
    make_predictor,
    step_weights,
    unservable_step_count,
)
from sc_compile.decision.plans import feasible, leading_full, map_plan
from sc_compile.decision.schedule import DecisionUnit, StepDecision
from sc_compile.errors import BudgetError
from sc_compile.runtime.state import StepCoefficients

# The runtime's logger: what a generation did is logged under one name users filter on.
log = logging.getLogger("sc_compile.runtime")

StatsReader = Callable[[Sequence[int]], list[list[list[float]]]]


class StepInfo:
    """What the clock knows about a step. ``timestep()``/``sigma()`` may read the device once."""

    def __init__(
        self,
        step: int,
        num_steps: int | None,
        timestep: Callable[[], float | None],
        sigma: Callable[[], float | None] = lambda: None,
    ):
        self.step = step
        self.num_steps = num_steps
        self._timestep = timestep
        self._sigma = sigma

    def timestep(self) -> float | None:
        return self._timestep()

    def sigma(self) -> float | None:
        return self._sigma()


class Decisions:
    """The decision units of one generation (one per stream, or one shared) and their α rows."""

    def __init__(
        self,
        *,
        config: ScalingCacheConfig,
        num_points: int,
        feeds_output: Sequence[bool],
        alpha: AlphaTable | None,
        num_steps: int | None,
        read_stats: StatsReader,
        warn: Callable[..., None],
        schedule_sigmas: Callable[[], Sequence[float] | None] = lambda: None,
        second_order: bool = False,
    ):
        self.config = config
        # The layout keeps the difference before last: cached steps may read the second term.
        self.second_order = second_order
        self.num_points = num_points
        self.alpha = alpha
        self.num_steps = num_steps
        self.warmup_steps = config.warmup_for(num_steps)
        self.change_points = (
            None if config.change_points is ChangePoints.ALL else [i for i, feeds in enumerate(feeds_output) if feeds]
        )
        self._read_stats = read_stats
        # The sampler's sigmas of this generation when the pipeline knows them (read once, when the
        # predictor is built): they place the steps on the α table's grid.
        self._schedule_sigmas = schedule_sigmas
        self._warn = warn
        self._predictor: Predictor | None = None
        # Why the generation caches no step (short schedule, a table that serves no gap), if so.
        self.cache_off: str | None = None
        self.planned_full_steps: tuple[int, ...] | None = None
        # The table's stored plan the generation runs, if one (its index).
        self._stored_index: int | None = None
        # Which schedule ran and why, one line (the report's "schedule"); "" until the predictor is built.
        self._schedule = ""
        # How the table's coefficients were mapped to this generation where the table's finer-grid check
        # decided it (the report's "coefficients"); "" otherwise.
        self.coefficient_note = ""
        self.units: dict[int, DecisionUnit] = {}
        self._first_step: dict[int, int] = {}
        self._observed_through: dict[int, int] = {}
        # Streams whose statistics measure the unit's last full step (they ran it in sync).
        self._synced: dict[int, list[int]] = {}
        self._coefficients: dict[int, StepCoefficients] = {}

    def unit_key(self, stream: int) -> int:
        return 0 if self.config.share_decision_across_streams else stream

    @property
    def uses_fitted_coefficients(self) -> bool:
        if self.config.coefficients is not None:
            return self.config.coefficients is Coefficients.FITTED
        return self.alpha is not None and self.alpha.fitted is not None

    def predictor(self, step_info: Callable[[int], StepInfo]) -> Predictor:
        """The coefficients of this generation (built at its first decision, then kept)."""
        if self._predictor is None:
            if self.alpha is None and self.config.coefficients is Coefficients.FITTED:
                raise ValueError(
                    "coefficients='fitted' needs a calibrated α table (format 2), but this model runs with "
                    "α = 1: pass options={'alpha': 'alpha.safetensors'} or drop coefficients."
                )
            self.cache_off = self._cache_off_reason()
            if self.cache_off is not None:
                self._predictor = NoCachePredictor(self.num_points)
                return self._predictor
            sigmas = self._schedule_sigmas() if self.alpha is not None else None

            def predictor(second_order: bool) -> Predictor:
                return make_predictor(
                    self.alpha,
                    num_points=self.num_points,
                    num_steps=self.num_steps,
                    timestep_of=lambda step: step_info(step).timestep(),
                    fitted=self.uses_fitted_coefficients,
                    sigmas=sigmas,
                    second_order=second_order,
                )

            self._predictor = predictor(self.second_order)
            finer = self.alpha.finer if self.alpha is not None else None
            if isinstance(self._predictor, FittedPredictor) and finer is not None and self.alpha is not None:
                if self.num_steps is not None and self.num_steps > self.alpha.num_steps:
                    using = "α = 1" if self._predictor.ones_mapped else "the table's coefficients mapped"
                    self.coefficient_note = (
                        f"{using} at this {self.num_steps}-step generation, as the table's check decided "
                        f"({finer.describe()})"
                    )
            if self.alpha is not None and self.num_steps is not None and self.num_steps != self.alpha.num_steps:
                log.info(
                    "ScalingCache: the α table was calibrated at %d steps; this %d-step generation maps its "
                    "coefficients over normalised time",
                    self.alpha.num_steps,
                    self.num_steps,
                )
            if self.config.budgeted:
                self.planned_full_steps = self._plan(self._predictor)
            elif self.config.planned_default or self._plans_beyond_calibration():
                self.planned_full_steps = self._planned_default(self._predictor)
            elif self._plans_beyond_calibration(checked=False):
                # Above the calibrated count, where the table's check found the dynamic rule better there.
                assert self.alpha is not None and self.alpha.finer is not None
                check = self.alpha.finer
                self._schedule = (
                    f"dynamic rule ε > δ (the default): above the table's calibrated {self.alpha.num_steps} steps the "
                    f"planned default runs where it stays within the dynamic rule's error, and the table's check at "
                    f"{check.num_steps} steps found it did not ({check.planned_error:.1f} dB against "
                    f"{check.dynamic_error:.1f} dB)"
                )
            if self.second_order and self._stored_index is not None and self._plan_runs_with(self._stored_index) == 1:
                # The stored plan was chosen with one difference (its rollouts were better so): it runs
                # as it was chosen, with the first-order coefficients (the layout's third buffer idles).
                self._predictor = predictor(False)
        return self._predictor

    def _plan_runs_with(self, index: int) -> int:
        """How many differences the table's stored plan ``index`` runs with: the compile option
        ``predictor_order`` where given; else one where the layout keeps no difference before last;
        else the order the plan was chosen with (two where the table does not say)."""
        assert self.alpha is not None and self.alpha.plans is not None
        if self.config.predictor_order is not None:
            return self.config.predictor_order
        if not self.second_order:
            return 1
        return self.alpha.plans.order(index) or 2

    def _plans_beyond_calibration(self, checked: bool = True) -> bool:
        """The default (no ``schedule``, budget or static interval) at more steps than the table was
        calibrated at runs the stored plan, where it has plans: held out on three demo models the dynamic
        rule lost to it there at 100 and 200 steps of a 50-step table (by 1.9 to 12.7 dB), and won at 50
        and below (README, "Schedules chosen end to end"). ``checked``: also where the table's check at more
        steps found the planned default within the dynamic rule's error there (on the shipped 28-step Flux
        demo table its plan, mapped to 56 steps, lost 10 dB to the dynamic rule held out)."""
        config, alpha = self.config, self.alpha
        return (
            config.schedule is None
            and not config.budgeted
            and config.static_interval is None
            and alpha is not None
            and alpha.plans is not None
            and self.num_steps is not None
            and self.num_steps > alpha.plans.num_steps
            and (not checked or alpha.finer is None or alpha.finer.planned_default_kept)
        )

    @property
    def schedule(self) -> str:
        """Which schedule the generation ran and why, in one line."""
        config = self.config
        if self.cache_off is not None:
            return f"every step after the warm-up in full ({self.cache_off})"
        if self._schedule:
            return self._schedule
        if config.static_interval is not None:
            return f"static: every {config.static_interval}-th step in full after the warm-up (static_interval)"
        if config.schedule is Schedule.DYNAMIC:
            return "dynamic rule ε > δ (schedule='dynamic')"
        return "dynamic rule ε > δ (the default)"

    def _stored_plan(self, predictor: Predictor, index: int, budget: int | None) -> tuple[int, ...] | None:
        """The table's stored plan ``index`` mapped to this generation (``budget`` full steps; ``None``:
        the plan's fraction), or ``None`` where it does not fit: a gap the predictor does not serve, or a
        forced step (a warm-up or final steps the user set) it does not run in full."""
        assert self.alpha is not None and self.alpha.plans is not None and self.num_steps is not None
        plans, num_steps = self.alpha.plans, self.num_steps
        try:
            steps = map_plan(plans.steps(index), plans.num_steps, num_steps, budget)
        except ValueError:
            return None
        forced = self._forced_steps()
        if not forced <= set(steps) or not feasible(steps, num_steps, predictor.allows_gap):
            return None
        self.warmup_steps = leading_full(steps)
        self._stored_index = index
        log.info("ScalingCache: stored plan %d mapped to full steps %s of %d", index, list(steps), num_steps)
        return steps

    def _forced_steps(self) -> set[int]:
        """The steps the user's options force to run in full: the final steps, and the warm-up where set."""
        assert self.num_steps is not None
        num_steps = self.num_steps
        forced = set(range(max(0, num_steps - self.config.final_full_steps), num_steps))
        if self.config.warmup_steps is not None:
            forced |= set(range(min(self.config.warmup_steps, num_steps)))
        return forced

    def _describe_plan(self, index: int, steps: tuple[int, ...]) -> str:
        assert self.alpha is not None and self.alpha.plans is not None
        plans = self.alpha.plans
        count = plans.counts()[index]
        mapped = f", mapped to {len(steps)} of {self.num_steps} steps" if self.num_steps != plans.num_steps else ""
        # The order the plan was chosen with, and the one it runs with where they differ (the option
        # predictor_order, or a table or layout without the second difference).
        order, runs, forced = plans.order(index), self._plan_runs_with(index), self.config.predictor_order
        overridden = ""
        if order is not None and runs != order:
            overridden = f", run with {'one difference' if runs == 1 else 'two differences'}"
            overridden += f" (predictor_order={forced})" if forced is not None else ""
        return (
            f"the α table's end-to-end plan of {count} full of {plans.num_steps} steps ({plans.source(index)}; "
            f"calibrated error {float(plans.error[index]):.1f} dB{overridden}){mapped}"
        )

    def _planned_default(self, predictor: Predictor) -> tuple[int, ...] | None:
        """The stored plan with the largest speed-up within the dynamic rule's calibrated error, mapped
        to this generation (``None``: the dynamic rule runs, and the report says why)."""
        plans = self.alpha.plans if self.alpha is not None else None
        if plans is None:
            if self.config.schedule is Schedule.PLANNED:
                raise ValueError(
                    "schedule='planned' needs an α table with stored end-to-end plans, but "
                    + ("this model runs with α = 1" if self.alpha is None else "the table has none")
                    + ": calibrate with sc_compile.calibrate(..., plan_samples=2) or drop schedule"
                )
            return None
        if self.num_steps is None:
            raise ValueError(
                "the planned schedule places the generation's full steps in advance and needs its step count: set "
                "options={'num_inference_steps': N}, use sc_compile.enable(pipe) or wrap the pipeline call in "
                "`with sc_compile.generation(transformer, num_inference_steps=N):`"
            )
        index = plans.default_index()
        if index is None:
            self._schedule = (
                f"dynamic rule ε > δ: no stored plan's calibrated error (best {float(plans.error.min()):.1f} dB) "
                f"is within the dynamic rule's ({plans.reference_error:.1f} dB)"
            )
            return None
        steps = self._stored_plan(predictor, index, None)
        why = (
            f"largest speed-up within the dynamic rule's calibrated error {plans.reference_error:.1f} dB "
            f"at {plans.reference_full_steps:.1f} full"
        )
        if self.config.schedule is None:
            why += f"; the default above the table's calibrated {plans.num_steps} steps"
        if steps is not None:
            self._schedule = f"planned default: {self._describe_plan(index, steps)}; {why}"
            return steps
        budget = max(2, min(self.num_steps, round(plans.counts()[index] * self.num_steps / plans.num_steps)))
        try:
            steps = self._planner(predictor, budget)
        except BudgetError as error:
            # The user's warm-up / final steps (or gaps the table does not serve) leave the plan's count no
            # schedule: said with the planner's own reason.
            what = (
                f"the table's planned default ({plans.counts()[index]} full of {plans.num_steps} steps, {budget} of "
                f"{self.num_steps} here) cannot be placed around the {len(self._forced_steps())} full steps the "
                f"warm-up and final steps force (the budget planner: {error})"
            )
            if self.config.schedule is None:
                self._schedule = f"dynamic rule ε > δ: {what}"
                return None
            raise BudgetError(
                f"schedule='planned': {what}; lower warmup_steps / final_full_steps or drop schedule"
            ) from None
        self._schedule = (
            f"planned default: {len(steps)} full steps ({why}), placed by the budget planner: the stored plan "
            f"does not fit this {self.num_steps}-step generation (a gap its table does not serve, or a forced step)"
        )
        return steps

    def _cache_off_reason(self) -> str | None:
        """Why this generation caches no step, with one warning saying so (``None``: it may cache).

        A table that cannot serve the step count is used for what it serves (nothing) rather than
        refused in the middle of a pipeline call; a short schedule under the default rule is run
        in full unless the table was calibrated at its step count (SHORT_SCHEDULE_STEPS)."""
        why = unservable_step_count(self.alpha, self.num_steps) if self.uses_fitted_coefficients else None
        if why is not None:
            self._warn(
                "unservable",
                "ScalingCache: %s: every step of this generation runs in full. Calibrate at %d steps "
                "(sc_compile.calibrate) or pass options={'alpha': 'ones'}.",
                why,
                self.num_steps,
            )
            return "α table serves no gap"
        config = self.config
        calibrated_here = self.alpha is not None and self.alpha.num_steps == self.num_steps
        if (
            self.num_steps is not None
            and self.num_steps <= SHORT_SCHEDULE_STEPS
            and not config.budgeted
            and config.static_interval is None
            and config.schedule is not Schedule.PLANNED
            and not calibrated_here
        ):
            self._warn(
                "short-schedule",
                "ScalingCache: a %d-step generation runs every step in full: the default schedule caches "
                "nothing at %d steps or fewer unless the α table was calibrated at that step count (a cached step "
                "of a short schedule moves the sample far). To cache anyway, pass options={'full_steps': B} or "
                "{'static_interval': k}, or calibrate at %d steps.",
                self.num_steps,
                SHORT_SCHEDULE_STEPS,
                self.num_steps,
            )
            return "short schedule"
        return None

    def _plan(self, predictor: Predictor) -> tuple[int, ...]:
        if self.num_steps is None:
            raise ValueError(
                "full_steps / speedup plan the generation's full steps in advance and need its step count: set "
                "options={'num_inference_steps': N}, use sc_compile.enable(pipe) or wrap the pipeline call in "
                "`with sc_compile.generation(transformer, num_inference_steps=N):`"
            )
        num_steps = self.num_steps
        budget = self.config.budget_for(num_steps)
        config = self.config
        asked = f"full_steps={budget}" if config.full_steps is not None else f"speedup={config.speedup} ({budget} full)"
        plans = self.alpha.plans if self.alpha is not None else None
        why = ""
        if plans is not None and config.propagation == 0:
            index = plans.index_for_budget(budget, num_steps)
            steps = None if index is None else self._stored_plan(predictor, index, budget)
            if index is not None and steps is not None:
                self._schedule = f"{asked}: {self._describe_plan(index, steps)}"
                return steps
            why = (
                "; the table stores no plan for this budget"
                if index is None
                else "; the stored plan does not fit this generation"
            )
        steps = self._planner(predictor, budget)
        if self.alpha is None:
            self._schedule = f"{asked}: spread evenly after the warm-up (α = 1 has no error model)"
        else:
            self._schedule = f"{asked}: planned from the α table's one-step errors (ρ = {config.propagation:g}){why}"
        return steps

    def _planner(self, predictor: Predictor, budget: int) -> tuple[int, ...]:
        """Today's budget planner (:mod:`sc_compile.decision.budget`) for ``budget`` full steps."""
        assert self.num_steps is not None
        num_steps = self.num_steps
        final = set(range(max(0, num_steps - self.config.final_full_steps), num_steps))
        weights = step_weights(self.alpha, num_steps) if self.alpha is not None else None
        # The default warm-up (as the dynamic rule's) is shortened when the budget cannot be met
        # after it; a warm-up the user set is kept, and an unmeetable budget is an error.
        warmups = [self.warmup_steps] if self.config.warmup_steps is not None else range(self.warmup_steps, 1, -1)
        error: BudgetError | None = None
        for warmup in warmups:
            forced = set(range(min(warmup, num_steps))) | final
            try:
                planned = plan_full_steps(
                    num_steps,
                    budget,
                    predictor.segment_cost,
                    predictor.allows_gap,
                    forced=forced,
                    weights=weights,
                    propagation=self.config.propagation,
                )
            except BudgetError as failure:
                error = failure
                continue
            self.warmup_steps = warmup
            log.info("ScalingCache: planned full steps %s of %d (warm-up %d)", list(planned), num_steps, warmup)
            return planned
        assert error is not None
        raise error

    def _unit(self, key: int, step: int, step_info: Callable[[int], StepInfo]) -> DecisionUnit:
        unit = self.units.get(key)
        if unit is None:
            predictor = self.predictor(step_info)
            unit = DecisionUnit(
                num_points=self.num_points,
                warmup_steps=self.warmup_steps,
                predictor=predictor,
                planned_full_steps=self.planned_full_steps,
                final_full_steps=self.config.final_full_steps,
                num_steps=self.num_steps,
                static_interval=self.config.static_interval,
                change_points=self.change_points,
                cache_off=self.cache_off,
                second_order=isinstance(predictor, FittedPredictor) and predictor.second is not None,
            )
            self.units[key] = unit
            self._first_step[key] = step
            self._observed_through[key] = step - 1
        return unit

    def _decision_at(self, key: int, step: int) -> StepDecision | None:
        unit = self.units[key]
        index = step - self._first_step[key]
        return unit.decisions[index] if 0 <= index < len(unit.decisions) else None

    def _observe(self, key: int, upto_step: int, collective: bool = True, has_group: bool = False) -> None:
        """Fold the changes of the unit's steps before ``upto_step`` into it (at most one read)."""
        unit = self.units[key]
        step = self._observed_through[key] + 1
        while step < upto_step:
            decision = self._decision_at(key, step)
            if decision is None:
                break
            if decision.full and not collective and has_group:
                break
            if decision.full:
                # The unit's first step measures no change (nothing before it), and the next step
                # is full too (no history yet), whose statistics replace its norms: not read.
                streams = self._synced.get(key, []) if step > self._first_step[key] else []
                # A planned or static schedule does not depend on the changes: nothing is read.
                stats = self._read_stats(streams) if streams and unit.needs_statistics else []
                change = unit.observe_full(step, stats)
            else:
                change = unit.observe_cached(step)
            if change is not None and not math.isfinite(change):
                self._warn(
                    "nonfinite",
                    "ScalingCache: the change at step %d is %s (non-finite hidden states); the next step "
                    "runs in full, and the report lists the step in nonfinite_steps.",
                    step,
                    change,
                )
            self._observed_through[key] = step
            step += 1

    def decide(
        self,
        stream: int,
        info: StepInfo,
        step_info: Callable[[int], StepInfo],
        follow: Callable[[int], StepDecision | None] | None = None,
    ) -> StepDecision:
        """The decision of ``info.step`` for ``stream``'s unit (made once per unit and step).

        ``follow``: the decision of another layout's unit at a step (``None`` where it has none),
        which this unit takes (see :meth:`DecisionUnit.decide`): the graphs of a split model
        share one verdict per step."""
        key = self.unit_key(stream)
        unit = self._unit(key, info.step, step_info)
        existing = self._decision_at(key, info.step)
        if existing is not None:
            return existing
        next_step = self._first_step[key] + len(unit.decisions)
        if info.step < next_step:
            raise RuntimeError(f"ScalingCache: step {info.step} was decided out of order; this is a bug in sc_compile")
        decision: StepDecision | None = None
        for step in range(next_step, info.step + 1):
            self._observe(key, step)
            decision = unit.decide(step, follow(step) if follow is not None else None)
            if decision.full:
                self._synced[key] = []
        assert decision is not None
        return decision

    def decision_of(self, stream: int, step: int) -> StepDecision | None:
        """The decision ``stream``'s unit took at ``step``, if it has decided it."""
        key = self.unit_key(stream)
        return self._decision_at(key, step) if key in self.units else None

    def unit_last_full(self, stream: int, before: int) -> int | None:
        """The unit's last full step before step ``before``."""
        key = self.unit_key(stream)
        if key not in self.units:
            return None
        for step in range(before - 1, self._first_step[key] - 1, -1):
            decision = self._decision_at(key, step)
            if decision is not None and decision.full:
                return step
        return None

    def synced_full(self, stream: int) -> None:
        """``stream`` ran the unit's full step with the unit's coefficients: its stats count."""
        self._synced.setdefault(self.unit_key(stream), []).append(stream)

    def coefficients(self, stream: int, decision: StepDecision, device) -> StepCoefficients:
        """The decision's coefficient buffers, written once per unit and step."""
        key = self.unit_key(stream)
        buffers = self._coefficients.get(key)
        if buffers is None:
            buffers = self._coefficients[key] = StepCoefficients(self.num_points, device, self.second_order)
        buffers.write(decision.coef, decision.refresh, decision, decision.coef2)
        return buffers

    def finish(self, collective: bool = True, has_group: bool = False) -> None:
        """Fold in every decided step (for a report)."""
        for key, unit in self.units.items():
            self._observe(key, self._first_step[key] + len(unit.decisions), collective, has_group)

    # -- what the report reads -----------------------------------------------------------------
    def stream_changes(self, stream: int, steps: int) -> list[float | None]:
        key = self.unit_key(stream)
        unit = self.units.get(key)
        position = stream if self.config.share_decision_across_streams else 0
        changes: list[float | None] = []
        for step in range(steps):
            per_stream = unit.stream_changes.get(step) if unit is not None else None
            changes.append(per_stream[position] if per_stream and position < len(per_stream) else None)
        return changes

    def stream_rule(self, stream: int, steps: int) -> list[tuple[float, float] | None]:
        """Per step, the (ε, δ) the rule ε > δ compared for ``stream``'s unit (``None``: the step
        was decided otherwise)."""
        unit = self.units.get(self.unit_key(stream))
        return [unit.rule.get(step) if unit is not None else None for step in range(steps)]

    def second_difference_steps(self, stream: int) -> tuple[int, ...]:
        """The cached steps of ``stream``'s unit whose prediction read the difference before last."""
        unit = self.units.get(self.unit_key(stream))
        if unit is None:
            return ()
        return tuple(d.step for d in unit.decisions if not d.full and d.uses_second_difference)

    @property
    def nonfinite_steps(self) -> tuple[int, ...]:
        return tuple(sorted({s for u in self.units.values() for s in u.nonfinite_steps}))
