"""Host-side ScalingCache decisions: warm-up, the schedule and the coefficients c_t.

Pure Python over scalars; no tensor is touched here. One :class:`DecisionUnit` serves the streams
that decide together (all streams of a step by default, each stream alone otherwise). Per step t:

1. the change ē_{t-1} of the previous step is folded in: measured on the device at a full step
   (``|y - prev|_1 / |prev|_1`` averaged over points and streams), predicted on the host at a cached
   step (``|c_{t-1} - c_{t-2}| * |dy|_1 / |y_full|_1``, SPEC §1): ε ← ē at a full step (and ē joins
   E), ε ← ε + ē at a cached step;
2. step t is full if t < S_f, if it is one of the forced final steps, if a measured or predicted
   change was not finite, if the gap since the last full step τ is longer than the predictor serves
   (:mod:`sc_compile.decision.coefficients`), or by the schedule: a planned set of full steps (a budget,
   :mod:`sc_compile.decision.budget`), every k-th step (static interval), or the paper's dynamic rule ε > δ =
   mean(E);
3. the coefficients come from the generation's predictor: at a cached step ``c`` for the gap
   ``t − τ`` (the prediction is y_full + c·dy); at a full step the previous step's coefficient (to
   measure the change against what the previous step output) and the refresh of dy for the gap.
   A second-order unit (``second_order``) also gives a cached step the coefficient ``c₂`` of the
   difference before last (``+ c₂·dy_prev``) from the gap h before the last full step's gap: 0
   until two gaps between full steps exist (the difference before last is not known before).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence

from sc_compile.contract import CHANGE_L1, NEXT_CHANGE_L1, PREV_L1, VALUE_L1
from sc_compile.decision.coefficients import Predictor


@dataclasses.dataclass(frozen=True)
class StepDecision:
    """What one step does and the scalars its graph takes."""

    step: int
    full: bool
    # Full step: c_{t-1} per point (0 after a full step). Cached step: c_t per point.
    coef: tuple[float, ...]
    # Full step: the eq. 6 refresh factor per point (0 at the first step). Cached step: unused.
    refresh: tuple[float, ...]
    reason: str
    # The coefficient of the difference before last (a second-order unit), as ``coef``: c₂ of
    # the previous step at a full step, of this step at a cached one. ``None``: none (first order).
    coef2: tuple[float, ...] | None = None

    @property
    def uses_second_difference(self) -> bool:
        """Whether the step's graph reads the difference before last (a nonzero c₂)."""
        return self.coef2 is not None and any(c != 0.0 for c in self.coef2)


def _mean(values: Sequence[float], indices: Sequence[int] | None) -> float:
    chosen = values if indices is None else [values[i] for i in indices]
    return sum(chosen) / len(chosen)


def relative_change(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, the relative change of SPEC §1 (0 for 0/0, ∞ for x/0)."""
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


@dataclasses.dataclass
class DecisionUnit:
    """ε, E, τ and the coefficients of the streams that decide together."""

    num_points: int
    warmup_steps: int
    predictor: Predictor
    final_full_steps: int = 0
    num_steps: int | None = None
    # Full every ``static_interval`` steps after the warm-up instead of the ε > δ rule.
    static_interval: int | None = None
    # The planned full steps of a budgeted schedule (``None``: decide as the generation goes).
    planned_full_steps: Collection[int] | None = None
    # Points ē averages over (``None``: all).
    change_points: Sequence[int] | None = None
    # Why no step after the warm-up is cached (a short schedule, a table that serves no gap), if so.
    cache_off: str | None = None
    # The predictor gives two-difference coefficients (``cached_coefs``; a second-order layout).
    second_order: bool = False

    def __post_init__(self) -> None:
        self.accumulated = 0.0  # ε
        self.full_changes: list[float] = []  # E
        self.last_full: int | None = None  # τ
        self.previous_gap = 0  # τ minus the full step before it (0: none yet)
        # The gap before previous_gap (0: the full step τ − g had no difference, so dy_prev is unknown).
        self.gap_before = 0
        self.coef = [0.0] * self.num_points  # c_t
        self.previous_coef = [0.0] * self.num_points  # c_{t-1}
        self.coef2 = [0.0] * self.num_points  # c₂_t (second order)
        self.previous_coef2 = [0.0] * self.num_points  # c₂_{t-1}
        self.norms: list[tuple[list[float], list[float]]] = []  # per stream: |dy|_1, |y_full|_1
        self.previous_dy_norms: list[list[float]] = []  # per stream: |dy_prev|_1 (the last full step's |dy| before)
        self.decisions: list[StepDecision] = []
        self.changes: list[float | None] = []  # ē per step (None where undefined)
        self.stream_changes: dict[int, list[float]] = {}  # step -> ē of each stream
        self.nonfinite_steps: list[int] = []
        # Per step decided by the rule ε > δ: (ε, δ) as compared (what the report shows).
        self.rule: dict[int, tuple[float, float]] = {}
        self._force_full = False
        self._planned = None if self.planned_full_steps is None else frozenset(self.planned_full_steps)
        # Whether another unit decides this one's steps (a piece of a split model).
        self.following = False

    @property
    def needs_statistics(self) -> bool:
        """Whether decisions read the full steps' statistics (a planned or static schedule does
        not: its steps do not depend on the changes)."""
        return self._planned is None and self.static_interval is None and not self.following

    # -- step t-1 ------------------------------------------------------------------------------
    def observe_full(self, step: int, stats_per_stream: Sequence[Sequence[Sequence[float]]]) -> float | None:
        """Fold in the stats a full ``step`` wrote (one [P, len(STAT_COLUMNS)] table per stream)."""
        self.previous_dy_norms = [dy_l1 for dy_l1, _ in self.norms]
        self.norms = [
            ([row[NEXT_CHANGE_L1] for row in table], [row[VALUE_L1] for row in table]) for table in stats_per_stream
        ]
        if step == 0 or not stats_per_stream:
            self._record(step, None)
            return None
        per_stream = [
            _mean([relative_change(row[CHANGE_L1], row[PREV_L1]) for row in table], self.change_points)
            for table in stats_per_stream
        ]
        change = sum(per_stream) / len(per_stream)
        self.stream_changes[step] = per_stream
        self._record(step, change)
        if math.isfinite(change):
            self.accumulated = change
            self.full_changes.append(change)
        return change

    def observe_cached(self, step: int) -> float | None:
        """Predict the change a cached ``step`` made, from the last full step's norms (``None``:
        none were read)."""
        delta = [abs(c - p) for c, p in zip(self.coef, self.previous_coef, strict=True)]
        delta2 = [abs(c - p) for c, p in zip(self.coef2, self.previous_coef2, strict=True)]
        previous = self.previous_dy_norms if len(self.previous_dy_norms) == len(self.norms) else []
        per_stream = []
        for s, (dy_l1, y_l1) in enumerate(self.norms):
            # The second term's change is bounded by |Δc₂|·|dy_prev|₁ (triangle inequality).
            moved = [d * dy for d, dy in zip(delta, dy_l1, strict=True)]
            if previous and any(delta2):
                moved = [m + d2 * p for m, d2, p in zip(moved, delta2, previous[s], strict=True)]
            per_stream.append(
                _mean([relative_change(m, y) for m, y in zip(moved, y_l1, strict=True)], self.change_points)
            )
        if not per_stream:
            self._record(step, None)
            return None
        change = sum(per_stream) / len(per_stream)
        self.stream_changes[step] = per_stream
        self._record(step, change)
        if math.isfinite(change):
            self.accumulated += change
        return change

    def _record(self, step: int, change: float | None) -> None:
        while len(self.changes) <= step:
            self.changes.append(None)
        self.changes[step] = change
        if change is not None and not math.isfinite(change):
            self.nonfinite_steps.append(step)
            self._force_full = True

    # -- step t --------------------------------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """δ = mean(E)."""
        return sum(self.full_changes) / len(self.full_changes) if self.full_changes else None

    def _exceeds_threshold(self, step: int) -> bool:
        """The paper's rule at ``step``: ε > δ (recorded for the report)."""
        threshold = self.threshold
        assert threshold is not None
        self.rule[step] = (self.accumulated, threshold)
        return self.accumulated > threshold

    def decide(self, step: int, follow: StepDecision | None = None) -> StepDecision:
        """Decide ``step``. ``follow``: the verdict of the unit that decides the step for a model
        split into several graphs (the graph that feeds the output). A following unit is full when
        it is, and otherwise cached unless its own history requires a full step (warm-up, final
        steps, no history, a gap its predictor does not serve); it reads no statistics."""
        reason = ""
        gap = 0 if self.last_full is None else step - self.last_full
        if follow is not None:
            self.following = True
        if step < self.warmup_steps:
            reason = "warm-up"
        elif self.num_steps is not None and step >= self.num_steps - self.final_full_steps:
            reason = "final"
        elif self.cache_off is not None:
            reason = self.cache_off
        elif self._force_full:
            reason = "non-finite change"
        elif self.last_full is None or self.previous_gap == 0:
            reason = "no history"
        elif follow is not None:
            reason = (
                follow.reason
                if follow.full
                else ("longest gap" if not self.predictor.allows_gap(self.last_full, gap) else "")
            )
        elif self._planned is not None and step in self._planned:
            reason = "planned"
        elif not self.predictor.allows_gap(self.last_full, gap):
            # Also under a plan: a full step it did not place (a unit that started late) starts
            # a gap the plan never checked.
            reason = "longest gap"
        elif self._planned is not None:
            reason = ""
        elif self.static_interval is not None:
            reason = "interval" if (step - self.warmup_steps) % self.static_interval == 0 else ""
        elif self.threshold is None:
            reason = "no history"
        elif self._exceeds_threshold(step):
            reason = "threshold"
        self._force_full = False
        if reason:
            if self.last_full is None:
                refresh = (0.0,) * self.num_points
            else:
                refresh = self.predictor.refresh(step, gap)
            coef2 = tuple(self.coef2) if self.second_order else None
            decision = StepDecision(step, True, tuple(self.coef), refresh, reason, coef2)
            self.gap_before = self.previous_gap
            self.previous_gap = gap
            self.last_full = step
            self.previous_coef = [0.0] * self.num_points
            self.coef = [0.0] * self.num_points
            self.previous_coef2 = [0.0] * self.num_points
            self.coef2 = [0.0] * self.num_points
        else:
            assert self.last_full is not None
            second: tuple[float, ...] | None = None
            if self.second_order:
                first, second = self.predictor.cached_coefs(  # type: ignore[attr-defined]
                    self.last_full, self.previous_gap, self.gap_before, gap
                )
                coef = list(first)
            else:
                coef = list(self.predictor.cached_coef(self.last_full, self.previous_gap, gap))
            if len(coef) != self.num_points or (second is not None and len(second) != self.num_points):
                raise ValueError(f"the predictor gave {len(coef)} coefficients for {self.num_points} cache points")
            coef2 = (0.0,) * self.num_points if self.second_order and second is None else second
            decision = StepDecision(step, False, tuple(coef), (0.0,) * self.num_points, "cached", coef2)
            self.previous_coef = self.coef
            self.coef = coef
            self.previous_coef2 = self.coef2
            self.coef2 = list(coef2) if coef2 is not None else [0.0] * self.num_points
        self.decisions.append(decision)
        return decision
