"""The coefficients a generation's cached and full steps use, from an α table or α = 1.

A :class:`Predictor` answers, for the running generation, what the runtime multiplies:

* ``cached_coef(τ, g, k)``: the per-point ``c`` of a cached step ``τ + k`` after the last full
  step ``τ``, whose full step before it was ``τ − g`` (prediction ``y_full + c · dy``);
* ``refresh(t, g)``: the per-point refresh of ``dy ← (y_t − y_full) · r`` at a full step ``t`` that
  follows the last full step by ``g``;
* ``allows_gap(τ, k)``: whether step ``τ + k`` may be cached after the last full step ``τ`` (a
  longer gap is a full step, so no run of cached steps grows without bound);
* ``segment_cost(τ, g, k)``: the calibrated error of that cached step, for the schedule search.

:class:`ChainedPredictor` is the paper's closed form ``c = Σ_j Π_i α`` over one-step α's (an α file
of format 1, or α = 1). :class:`FittedPredictor` reads the per-gap least-squares coefficients of a
format-2 table (:mod:`sc_compile.calibration.fitting`); for a second-order layout
(:func:`second_order_in_use`) also a format-3 table's two-difference coefficients
(:meth:`FittedPredictor.cached_coefs`): ``c₁``, ``c₂`` of a cached step ``τ + k`` whose last full
step τ followed a gap g and the full step τ − g a gap h (prediction ``y_full + c₁·dy + c₂·dy_prev``).
The second term is read on the calibrated grid only (another step count predicts with one
difference) and never where the difference before last is not known (h = 0: c₂ = 0).

**Other step counts.** A generation of N' steps with a table calibrated at N maps every step to
its *position* on the calibrated grid, in calibrated steps (``t · N / N'`` for the
"spacing-then-transform" schedules diffusers' flow-matching and DDIM-style schedulers build, or
through the timesteps when the step count is not known). A gap keeps its meaning in that normalised
time: a fitted coefficient is looked up at the gap's length in calibrated steps, as a ratio to the
α = 1 coefficient (trilinear over (τ, g, k); a gap shorter than one calibrated step interpolates
the ratio toward 1, its limit for a vanishing gap); a chained α is raised to the power of the step's
length in calibrated steps (four quarter steps compound to one calibrated step's α), so products
of α < 1 no longer shrink to zero at more steps. Where the calibration checked the mapped
coefficients at more steps than calibrated and found α = 1 better on every rollout sample
(:class:`~sc_compile.calibration.table.FinerGridCheck`), a generation of more steps than calibrated
predicts with α = 1 (ratio 1) at every gap the table serves. A table that cannot serve the generation (no time
grid for another step count, or a step longer than its longest gap) is refused with what to do.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from sc_compile.calibration.fitting import FittedCoefficients
from sc_compile.calibration.table import AlphaTable
from sc_compile.config import Coefficients, ScalingCacheConfig
from sc_compile.errors import AlphaTableError

# Without a fitted table, no run of cached steps is longer than this fraction of the generation
# (at least MIN_SAFEGUARD_GAP steps): the dynamic rule's accumulated change can stall when the
# predicted change shrinks (α < 1 products), and a stalled run would otherwise never end.
SAFEGUARD_GAP_FRACTION = 0.2
MIN_SAFEGUARD_GAP = 3
SAFEGUARD_GAP_UNKNOWN_STEPS = 8
# A generation of at most this many steps caches nothing under the default (dynamic) schedule
# unless its α table was calibrated at exactly its step count (whose fitted gaps then say what is
# safe). Measured under the pipeline clock (issue 21): 4 / 5 / 6-step Flux demo generations cached
# by the dynamic rule differ from uncached ones by rel. 0.034 / 0.054 / 0.021 against 0.0036 at 28
# steps, and Wan at 4 steps by 0.15 (α = 1: 0.25): at a few steps every step moves the sample far.
# A static interval or a budget (full_steps / speedup) still caches: the user chose it.
SHORT_SCHEDULE_STEPS = 8


class Predictor(Protocol):
    """What a generation's cached and full steps multiply (see the module docstring)."""

    num_points: int

    def cached_coef(self, last_full: int, previous_gap: int, gap: int) -> tuple[float, ...]: ...

    def refresh(self, step: int, gap: int) -> tuple[float, ...]: ...

    def allows_gap(self, last_full: int, gap: int) -> bool: ...

    def segment_cost(self, last_full: int, previous_gap: int, gap: int) -> float | None: ...


def safeguard_gap(num_steps: int | None) -> int:
    if num_steps is None:
        return SAFEGUARD_GAP_UNKNOWN_STEPS
    return max(MIN_SAFEGUARD_GAP, math.ceil(SAFEGUARD_GAP_FRACTION * num_steps))


def linear_positions(num_steps: int, calibrated_steps: int) -> Callable[[int], float]:
    """Step ``t`` of an ``num_steps``-step generation at ``t · N / N'`` calibrated steps."""
    scale = calibrated_steps / num_steps
    return lambda step: step * scale


def sigma_positions(table: AlphaTable, sigmas: Sequence[float]) -> list[float] | None:
    """Each step's position on the table's grid, found by its sigma on the table's sigma grid
    (``None`` when either side has no usable sigmas). Unit-free, unlike timesteps, which some
    pipelines rescale before the transformer (Flux passes ``t / 1000``)."""
    grid = [float(s) for s in table.sigmas]
    if len(grid) < 2 or len(sigmas) < 2 or any(b >= a for a, b in zip(grid, grid[1:], strict=False)):
        return None  # the table's sigmas must decrease strictly, as a sampler's do
    ascending = grid[::-1]
    positions = []
    for sigma in sigmas:
        s = min(max(float(sigma), ascending[0]), ascending[-1])
        upper = min(max(bisect.bisect_left(ascending, s), 1), len(ascending) - 1)
        lower = upper - 1
        span = ascending[upper] - ascending[lower]
        index = lower + (0.0 if span == 0 else (s - ascending[lower]) / span)
        positions.append(len(ascending) - 1 - index)
    return positions


def timestep_positions(table: AlphaTable, timestep_of: Callable[[int], float | None]) -> Callable[[int], float]:
    """Positions through the timesteps: the calibrated step whose timestep equals the step's."""
    if not table.timesteps:
        raise AlphaTableError(
            "this α table records no timesteps, and the generation's step count is not known: "
            "declare it (options={'num_inference_steps': N} or sc_compile.generation(model, num_inference_steps=N))"
        )
    times = [float(t) for t in table.timesteps]
    descending = times[0] > times[-1]
    ordered = times[::-1] if descending else times
    n = len(times)

    def position(step: int) -> float:
        timestep = timestep_of(step)
        if timestep is None:
            raise AlphaTableError(f"the timestep of step {step} is not known: declare the generation's step count")
        t = min(max(timestep, ordered[0]), ordered[-1])
        upper = min(max(bisect.bisect_left(ordered, t), 1), n - 1)
        lower = upper - 1
        span = ordered[upper] - ordered[lower]
        fraction = 0.0 if span == 0 else (t - ordered[lower]) / span
        index = lower + fraction
        return (n - 1 - index) if descending else index

    return position


class ChainedPredictor:
    """The paper's chained one-step α's (format-1 tables), or α = 1 (``table=None``)."""

    def __init__(self, num_points: int, alpha_of_step: Callable[[int], Sequence[float]] | None, max_gap: int):
        self.num_points = num_points
        self._alpha_of_step = alpha_of_step
        self._rows: dict[int, tuple[float, ...]] = {}
        self._max_gap = max_gap

    def alpha(self, step: int) -> tuple[float, ...]:
        row = self._rows.get(step)
        if row is None:
            row = (1.0,) * self.num_points if self._alpha_of_step is None else tuple(self._alpha_of_step(step))
            if len(row) != self.num_points:
                raise ValueError(f"α row has {len(row)} values for {self.num_points} cache points")
            self._rows[step] = row
        return row

    def _sums(self, start: int, gap: int) -> tuple[list[float], list[float]]:
        """``Π_{i=1..gap} α_{start+i}`` and ``Σ_{j=1..gap} Π_{i=1..j} α_{start+i}`` per point."""
        product = [1.0] * self.num_points
        total = [0.0] * self.num_points
        for i in range(1, gap + 1):
            product = [p * a for p, a in zip(product, self.alpha(start + i), strict=True)]
            total = [s + p for s, p in zip(total, product, strict=True)]
        return product, total

    def cached_coef(self, last_full: int, previous_gap: int, gap: int) -> tuple[float, ...]:
        return tuple(self._sums(last_full, gap)[1])

    def refresh(self, step: int, gap: int) -> tuple[float, ...]:
        product, total = self._sums(step - gap, gap)
        return tuple(p / s if s != 0.0 else 1.0 / gap for p, s in zip(product, total, strict=True))

    def allows_gap(self, last_full: int, gap: int) -> bool:
        return gap <= self._max_gap

    def segment_cost(self, last_full: int, previous_gap: int, gap: int) -> float | None:
        return None


def chained_alpha_of_step(
    table: AlphaTable, position: Callable[[int], float], same_grid: bool
) -> Callable[[int], list[float]]:
    """α per step of the generation: the table's row on its own grid; elsewhere the product of the
    calibrated α's of the calibrated steps the step covers, each to the power of the fraction
    covered (calibrated step i spans positions (i − 1, i]; a step inside it has α_i^(its length),
    a step over several has their product; positions before calibrated step 2, where α is undefined,
    take α_2). Exact for geometric residuals on any grid."""
    rows: list[list[float]] = table.alpha.double().tolist()  # host lists: no tensor work per step
    n = table.num_steps

    def of_step(step: int) -> list[float]:
        if same_grid and step < n:
            return rows[step]
        end = position(step)
        start = position(step - 1) if step > 0 else end - 1.0
        row = [1.0] * len(rows[0])
        i = max(int(math.floor(start)) + 1, 1)
        while i - 1 < end - 1e-12:
            covered = min(end, float(i)) - max(start, float(i - 1))
            if covered > 0:
                # α_0, α_1 are undefined (held at 1): positions before step 2 borrow α_2.
                factor = rows[min(max(i, 2 if n > 2 else i), n - 1)]
                # Signed power: a negative α keeps its sign (a reversal stays a reversal).
                row = [r * math.copysign(abs(a) ** covered, a) for r, a in zip(row, factor, strict=True)]
            i += 1
        return row

    return of_step


def _interpolate(values: torch.Tensor, coordinates: Sequence[float], upper: Sequence[float]) -> torch.Tensor:
    """Multilinear interpolation of ``values`` [D0, D1, ..., rest] at fractional leading indices,
    each clamped to [0, upper]."""
    result = values
    for coordinate, top in zip(coordinates, upper, strict=True):
        c = min(max(coordinate, 0.0), top)
        lower = min(int(math.floor(c)), max(int(top) - 1, 0))
        fraction = c - lower
        upper_index = min(lower + 1, int(top))
        if fraction <= 0.0 or upper_index == lower:
            result = result[lower]  # also keeps an infinite neighbour from turning 0 · inf into NaN
        elif fraction >= 1.0:
            result = result[upper_index]
        else:
            result = result[lower] * (1 - fraction) + result[upper_index] * fraction
    return result


class FittedPredictor:
    """Per-gap least-squares coefficients (format-2 tables), on their grid or mapped to another.

    ``second_order``: the runtime keeps the difference before last, and :meth:`cached_coefs` reads
    the table's two-difference coefficients (on the calibrated grid). ``ones_mapped``: on another
    grid, predict with α = 1 (ratio 1) instead of the mapped coefficients (the table's finer-grid
    check found them worse there); which gaps are served and their errors are still the table's."""

    def __init__(
        self,
        fitted: FittedCoefficients,
        position: Callable[[int], float] | None,
        second_order: bool = False,
        ones_mapped: bool = False,
    ):
        self.fitted = fitted
        self.num_points = fitted.num_points
        self._position = position  # None: the calibrated grid itself
        self.ones_mapped = ones_mapped and position is not None
        # The two-difference coefficients this generation reads (None: first order only).
        self.second = fitted.second if second_order and position is None else None
        self._pairs: dict[tuple[int, int, int, int], tuple[tuple[float, ...], tuple[float, ...]]] = {}
        lookups = fitted.lookups
        self._ratio, self._error = lookups.ratio, lookups.error
        self._coef_rows, self._refresh_rows = lookups.coef_rows, lookups.refresh_rows
        self._error_rows, self._max_gaps = lookups.error_rows, lookups.max_gaps

    def _u(self, step: int) -> float:
        return float(step) if self._position is None else self._position(step)

    def _direct(self) -> bool:
        return self._position is None

    def cached_coef(self, last_full: int, previous_gap: int, gap: int) -> tuple[float, ...]:
        f = self.fitted
        if self._direct():
            self._check_on_grid(last_full + gap)
            if previous_gap > f.max_gap_limit + 1 or gap > f.max_gap_limit:
                raise ValueError(f"gap {gap} after a gap {previous_gap} is outside the table (K = {f.max_gap_limit})")
            return tuple(self._coef_rows[last_full][previous_gap - 1][gap - 1])
        u = self._u(last_full)
        span_g = u - self._u(last_full - previous_gap)
        span_k = self._u(last_full + gap) - u
        if span_g <= 1e-9:
            # Both full steps sit at one position (timesteps beyond the calibrated range): the
            # table has no slope there; extrapolate with α = 1 (dy = D_g / g, c = gap).
            return (float(gap),) * self.num_points
        if self.ones_mapped:
            return ((span_k / span_g) * previous_gap,) * self.num_points
        ratio = _interpolate(self._ratio, (u, span_g - 1, span_k), (f.num_steps - 1, f.max_gap_limit, f.max_gap_limit))
        a = ratio * (span_k / span_g)
        # dy = (y_t − y_full) / g (refresh below): c = a · g.
        return tuple((a * previous_gap).tolist())

    def cached_coefs(
        self, last_full: int, previous_gap: int, gap_before: int, gap: int
    ) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """``(c₁, c₂)`` of a cached step ``last_full + gap`` (``c₂ = None``: one difference). The
        full step ``last_full − previous_gap`` followed a gap ``gap_before`` (0: it had no
        difference, so ``dy_prev`` holds none and the second term is not read). Per point where
        the fit chose first order (``c₂ = 0``), ``c₁`` is exactly :meth:`cached_coef`'s."""
        first = self.cached_coef(last_full, previous_gap, gap)
        big_k = self.fitted.max_gap_limit
        if self.second is None or gap_before < 1 or gap_before > big_k + 1 or last_full - previous_gap - gap_before < 0:
            return first, None
        key = (last_full, previous_gap, gap_before, gap)
        pair = self._pairs.get(key)
        if pair is None:
            rows = self.second.coef[last_full, previous_gap - 1, gap_before - 1, gap - 1].double().tolist()  # [P, 2]
            c2 = tuple(row[1] for row in rows)
            c1 = tuple(f if c == 0.0 else row[0] for f, c, row in zip(first, c2, rows, strict=True))
            pair = self._pairs[key] = (c1, c2)
        return pair

    def refresh(self, step: int, gap: int) -> tuple[float, ...]:
        f = self.fitted
        if self._direct():
            self._check_on_grid(step)
            if gap > f.max_gap_limit + 1:
                raise ValueError(f"gap {gap} is outside the table (K = {f.max_gap_limit})")
            return tuple(self._refresh_rows[step][gap - 1])
        return (1.0 / gap,) * self.num_points

    def _check_on_grid(self, step: int) -> None:
        if step >= self.fitted.num_steps:
            raise AlphaTableError(
                f"the generation reached step {step}, past the {self.fitted.num_steps} steps of the α table, and its "
                "step count was not declared (the table records no timesteps to map it by): declare it with "
                "options={'num_inference_steps': N}, sc_compile.enable(pipe) or sc_compile.generation(...)"
            )

    def allows_gap(self, last_full: int, gap: int) -> bool:
        f = self.fitted
        if self._direct():
            return last_full < f.num_steps and gap <= self._max_gaps[last_full]
        u = self._u(last_full)
        lower = min(max(int(math.floor(u)), 0), f.num_steps - 1)
        upper = min(lower + 1, f.num_steps - 1)
        limit = min(self._max_gaps[lower], self._max_gaps[upper])
        return self._u(last_full + gap) - u <= limit + 1e-6

    def segment_cost(self, last_full: int, previous_gap: int, gap: int) -> float | None:
        """Relative L2 error of the cached step ``last_full + gap`` (the schedule search weighs it)."""
        f = self.fitted
        if self._direct():
            squared = self._error_rows[last_full][previous_gap - 1][gap - 1]
        else:
            u = self._u(last_full)
            span_g = u - self._u(last_full - previous_gap)
            span_k = self._u(last_full + gap) - u
            squared = float(
                _interpolate(self._error, (u, span_g - 1, span_k), (f.num_steps - 1, f.max_gap_limit, f.max_gap_limit))
            )
        return math.sqrt(squared) if math.isfinite(squared) else math.inf


def second_order_in_use(table: AlphaTable | None, config: ScalingCacheConfig) -> bool:
    """Whether a graph compiled with ``config`` and ``table`` predicts with two differences: the
    table has fitted two-difference coefficients (format 3) that use the second term somewhere, the
    fitted coefficients are in use and ``predictor_order`` is not 1. Raises
    :class:`AlphaTableError` for ``predictor_order=2`` without such coefficients."""
    if config.predictor_order == 1:
        return False
    fitted_in_use = config.coefficients is not Coefficients.CHAINED
    second = table.fitted.second if table is not None and table.fitted is not None and fitted_in_use else None
    if config.predictor_order == 2:
        if second is None:
            raise AlphaTableError(
                "predictor_order=2 needs an α table with fitted two-difference coefficients (format 3: "
                "sc_compile.calibrate(..., second_order=True)); "
                + ("this model runs with α = 1" if table is None else f"this one is {table!r}")
                + ". Recalibrate, or drop predictor_order."
            )
        return True
    return second is not None and bool(second.uses_second_difference().any())


def make_predictor(
    table: AlphaTable | None,
    *,
    num_points: int,
    num_steps: int | None,
    timestep_of: Callable[[int], float | None],
    fitted: bool,
    sigmas: Sequence[float] | None = None,
    second_order: bool = False,
) -> Predictor:
    """The predictor of one generation (``table=None``: α = 1).

    ``fitted``: use the table's per-gap coefficients (format 2); ``False``: its chained α's.
    ``sigmas``: the generation's sampler sigmas when the pipeline knows them (``num_steps`` values
    or one more): steps are then placed on the table's grid by sigma, so a schedule that differs
    from the calibrated one (another shift) is mapped even at the calibrated step count, instead of
    being read as the calibrated grid. ``second_order``: the layout keeps the difference before last
    (the fitted predictor reads the table's two-difference coefficients on its grid). Raises
    :class:`AlphaTableError` when the table cannot serve the generation.
    """
    if table is None:
        return ChainedPredictor(num_points, None, safeguard_gap(num_steps))
    same_grid = num_steps == table.num_steps
    position: Callable[[int], float] | None = None
    by_sigma = sigma_positions(table, sigmas) if sigmas is not None and num_steps is not None else None
    if by_sigma is not None and len(by_sigma) >= num_steps:  # type: ignore[operator]
        same_grid = same_grid and all(abs(u - t) < 1e-3 for t, u in enumerate(by_sigma[: table.num_steps]))
        last, step_length = by_sigma[-1], (by_sigma[-1] - by_sigma[0]) / max(len(by_sigma) - 1, 1)

        def sigma_position(step: int) -> float:
            return by_sigma[step] if step < len(by_sigma) else last + (step - len(by_sigma) + 1) * step_length

        position = None if same_grid else sigma_position
    elif num_steps is not None and not same_grid:
        position = linear_positions(num_steps, table.num_steps)
    elif num_steps is None and table.timesteps:
        position = timestep_positions(table, timestep_of)
    elif num_steps is None:
        # A table without timesteps (built by hand) and an undeclared step count: its own grid.
        same_grid = True
    if not fitted:
        alpha_of_step = chained_alpha_of_step(table, position or (lambda s: float(s)), same_grid)
        return ChainedPredictor(num_points, alpha_of_step, safeguard_gap(num_steps))
    if table.fitted is None:
        raise AlphaTableError(
            "coefficients='fitted' needs a format-2 α table (per-gap least squares); this one holds only the "
            "paper's chained α's. Recalibrate with sc_compile.calibrate(...) or use coefficients='chained'."
        )
    predictor = FittedPredictor(
        table.fitted,
        None if same_grid else position,
        second_order,
        ones_mapped=table.predicts_with_ones_at(num_steps),
    )
    why = unservable_step_count(table, num_steps)
    if why is not None:
        # A step longer than every gap the table serves would make every step full without a word.
        raise AlphaTableError(f"{why}. Calibrate at {num_steps} steps (sc_compile.calibrate) or use alpha='ones'.")
    return predictor


def unservable_step_count(table: AlphaTable | None, num_steps: int | None) -> str | None:
    """Why a fitted ``table`` can cache no step of a ``num_steps``-step generation (``None``: it can):
    one step of the generation spans more calibrated steps than the longest gap the table serves."""
    if table is None or table.fitted is None or num_steps is None or num_steps == table.num_steps:
        return None
    step_length = table.num_steps / num_steps
    longest = int(table.fitted.max_gap.max())
    if step_length <= longest + 1e-6:
        return None
    return (
        f"the α table was calibrated at {table.num_steps} steps and serves gaps up to {longest} of its steps; one "
        f"step of this {num_steps}-step generation spans {step_length:.2f} of them, so no step could be cached"
    )


class NoCachePredictor:
    """The predictor of a generation that caches no step (every step after the warm-up is full for
    the reason :class:`~sc_compile.decision.schedule.DecisionUnit` is given): full steps refresh
    ``dy`` with the plain difference, and no gap is served."""

    def __init__(self, num_points: int):
        self.num_points = num_points

    def cached_coef(self, last_full: int, previous_gap: int, gap: int) -> tuple[float, ...]:
        raise RuntimeError("ScalingCache: a generation that caches no step asked for a cached step; this is a bug")

    def refresh(self, step: int, gap: int) -> tuple[float, ...]:
        return (1.0 / gap,) * self.num_points

    def allows_gap(self, last_full: int, gap: int) -> bool:
        return False

    def segment_cost(self, last_full: int, previous_gap: int, gap: int) -> float | None:
        return None


def step_weights(table: AlphaTable, num_steps: int) -> list[float] | None:
    """How much each step's output moves the sample: the sampler's step size ``|σ_{t+1} − σ_t|``
    on the table's sigma grid mapped to ``num_steps`` steps (``None``: the table has no sigmas)."""
    sigmas = table.sigmas
    n = table.num_steps
    if len(sigmas) not in (n, n + 1) or n < 2:
        return None
    grid = list(sigmas) if len(sigmas) == n + 1 else [*sigmas, 2 * sigmas[-1] - sigmas[-2]]

    def sigma_at(u: float) -> float:
        u = min(max(u, 0.0), float(n))
        lower = min(int(math.floor(u)), n - 1)
        fraction = u - lower
        return grid[lower] * (1 - fraction) + grid[lower + 1] * fraction

    scale = n / num_steps
    weights = [abs(sigma_at((t + 1) * scale) - sigma_at(t * scale)) for t in range(num_steps)]
    total = sum(weights)
    return [w * num_steps / total for w in weights] if total > 0 else None
