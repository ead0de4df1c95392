"""Host-side ScalingCache decisions: warm-up, the dynamic interval and the coefficients c_t.

Pure Python over scalars; no tensor is touched here. One :class:`DecisionUnit` serves the streams
that decide together (all streams of a step by default, each stream alone otherwise). Per step t:

1. the change ē_{t-1} of the previous step is folded in: measured on the device at a full step
   (``|y - prev|_1 / |prev|_1`` averaged over points and streams), predicted on the host at a cached
   step (``|c_{t-1} - c_{t-2}| * |dy|_1 / |y_full|_1``, SPEC §1): ε ← ē at a full step (and ē joins
   E), ε ← ε + ē at a cached step;
2. step t is full if t < S_f, if it is one of the forced final steps, if ε > δ = mean(E), or if a
   measured or predicted change was not finite;
3. the coefficients are formed: at a cached step ``c_t = Σ_{k=τ+1..t} Π_{i=τ+1..k} α_i`` (the
   prediction is y_full + c_t·dy); at a full step the previous step's coefficient (to measure the
   change against what the previous step output) and the eq. 6 refresh factor
   ``Π_{i=τ+1..t} α_i / Σ_{k=τ+1..t} Π_{i=τ+1..k} α_i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Column indices of a stats row (see sc_compile.passes.insert_cache_conds.STAT_COLUMNS).
CHANGE_L1, PREV_L1, NEXT_CHANGE_L1, VALUE_L1, CHANGE_DOT_DY, DY_DOT_DY = range(6)


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


def _mean(values: Sequence[float], indices: Sequence[int] | None) -> float:
    chosen = values if indices is None else [values[i] for i in indices]
    return sum(chosen) / len(chosen)


def _relative(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


@dataclasses.dataclass
class DecisionUnit:
    """ε, E, τ and the running coefficient sums of the streams that decide together."""

    num_points: int
    warmup_steps: int
    final_full_steps: int = 0
    num_steps: int | None = None
    # Ablation: full every ``static_interval`` steps after the warm-up instead of the ε > δ rule.
    static_interval: int | None = None
    # Points ē averages over (``None``: all).
    change_points: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.accumulated = 0.0  # ε
        self.full_changes: list[float] = []  # E
        self.last_full: int | None = None  # τ
        self.product = [1.0] * self.num_points  # Π_{i=τ+1..t} α_i
        self.coef = [0.0] * self.num_points  # c_t
        self.previous_coef = [0.0] * self.num_points  # c_{t-1}
        self.norms: list[tuple[list[float], list[float]]] = []  # per stream: |dy|_1, |y_full|_1
        self.decisions: list[StepDecision] = []
        self.changes: list[float | None] = []  # ē per step (None where undefined)
        self.stream_changes: dict[int, list[float]] = {}  # step -> ē of each stream
        self.nonfinite_steps: list[int] = []
        self._force_full = False

    # -- step t-1 ------------------------------------------------------------------------------
    def observe_full(self, step: int, stats_per_stream: Sequence[Sequence[Sequence[float]]]) -> float | None:
        """Fold in the stats a full ``step`` wrote (one [P, 6] table per stream)."""
        self.norms = [
            ([row[NEXT_CHANGE_L1] for row in table], [row[VALUE_L1] for row in table]) for table in stats_per_stream
        ]
        if step == 0 or not stats_per_stream:
            self._record(step, None)
            return None
        per_stream = [
            _mean([_relative(row[CHANGE_L1], row[PREV_L1]) for row in table], self.change_points)
            for table in stats_per_stream
        ]
        change = sum(per_stream) / len(per_stream)
        self.stream_changes[step] = per_stream
        self._record(step, change)
        if math.isfinite(change):
            self.accumulated = change
            self.full_changes.append(change)
        return change

    def observe_cached(self, step: int) -> float:
        """Predict the change a cached ``step`` made, from the last full step's norms."""
        delta = [abs(c - p) for c, p in zip(self.coef, self.previous_coef, strict=True)]
        per_stream = [
            _mean([_relative(d * dy, y) for d, dy, y in zip(delta, dy_l1, y_l1, strict=True)], self.change_points)
            for dy_l1, y_l1 in self.norms
        ]
        change = sum(per_stream) / len(per_stream) if per_stream else 0.0
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

    def decide(self, step: int, alpha_row: Sequence[float]) -> StepDecision:
        if len(alpha_row) != self.num_points:
            raise ValueError(f"α row has {len(alpha_row)} values for {self.num_points} cache points")
        reason = ""
        if step < self.warmup_steps:
            reason = "warm-up"
        elif self.num_steps is not None and step >= self.num_steps - self.final_full_steps:
            reason = "final"
        elif self._force_full:
            reason = "non-finite change"
        elif self.last_full is None or self.threshold is None:
            reason = "no history"
        elif self.static_interval is not None:
            reason = "interval" if (step - self.warmup_steps) % self.static_interval == 0 else ""
        elif self.accumulated > self.threshold:
            reason = "threshold"
        self._force_full = False
        product = [p * a for p, a in zip(self.product, alpha_row, strict=True)]
        coef = [c + p for c, p in zip(self.coef, product, strict=True)]
        if reason:
            if self.last_full is None:
                refresh = [0.0] * self.num_points
            else:
                gap = step - self.last_full
                refresh = [p / c if c != 0.0 else 1.0 / gap for p, c in zip(product, coef, strict=True)]
            decision = StepDecision(step, True, tuple(self.coef), tuple(refresh), reason)
            self.last_full = step
            self.product = [1.0] * self.num_points
            self.previous_coef = [0.0] * self.num_points
            self.coef = [0.0] * self.num_points
        else:
            decision = StepDecision(step, False, tuple(coef), (0.0,) * self.num_points, "cached")
            self.previous_coef = self.coef
            self.product = product
            self.coef = coef
        self.decisions.append(decision)
        return decision
