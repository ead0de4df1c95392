"""The full steps of a generation for a budget of B, chosen from the calibrated errors.

Dynamic programming over segments (as LeMiCa and BudCache search offline): a generation is a
sequence of full steps, each followed by a run of cached steps. The search returns the set of
exactly B full steps that minimises the error model of the whole generation, among schedules whose
every cached run the predictor allows. Steps 0 and 1 are always full (the first difference needs
two), as are any forced steps.

**The error model.** A cached step ``τ + k`` after the full step ``τ`` (itself ``g`` after the one
before) injects ``w_{τ+k} · (e(τ, g, k) + ρ · m(τ, g, k) · I_prev)`` into the result: its own
calibrated relative error ``e`` times the weight of that step's output (the sampler's step size,
when known), plus the error it inherits. The full steps τ − g and τ were computed on a latent that
the cached steps between them had already perturbed by ``I_prev`` (what that segment injected); a
prediction extrapolates ``D_g = y_τ − y_{τ−g}`` with the multiplier ``m`` (``k / g`` for α = 1),
so it amplifies that perturbation, with the gain ``ρ`` (``propagation``: how much a latent error
moves the model output, relative). A segment's injected error ``I`` is the sum over its cached
steps, and feeds the next segment: a long gap after a long gap costs more than the two apart,
which a sum of one-step errors (``ρ = 0``, the model before) cannot see. The total is the sum over
segments. The search is exact for this model: a label per (last full step, its gap, budget used)
keeps the Pareto set of (cost so far, ``I`` of the last segment), since the cost still to come
only grows with ``I`` (at most :data:`MAX_LABELS` per state; beyond that the lowest-cost ones).
:func:`schedule_error` evaluates the same model for a given schedule, step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

from sc_compile.errors import BudgetError

# Pareto labels kept per (last full step, gap, budget): more than small problems ever reach.
MAX_LABELS = 64

Cost = Callable[[int, int, int], float | None]
Amplification = Callable[[int, int, int], float]


def _alpha_one_amplification(tau: int, g: int, k: int) -> float:
    return k / g


def _checked_forced(num_steps: int, budget: int, forced: Collection[int]) -> set[int]:
    forced_set = {0, 1, *forced}
    if any(not 0 <= s < num_steps for s in forced_set):
        raise BudgetError(f"forced full steps {sorted(forced_set)} are outside a {num_steps}-step generation")
    if not len(forced_set) <= budget <= num_steps:
        raise BudgetError(
            f"full_steps={budget} cannot be met in a {num_steps}-step generation: it needs at least "
            f"{len(forced_set)} (steps {sorted(forced_set)} are always full) and at most {num_steps}"
        )
    return forced_set


def _step_cost(cost: Cost, weights: Sequence[float], tau: int, g: int, k: int) -> float:
    """``w_{τ+k} · e(τ, g, k)`` (no error model: the k-th cached step of a run costs k times its
    weight, which spreads the full steps evenly)."""
    value = cost(tau, g, k)
    if value is None:
        return weights[tau + k] * k
    return weights[tau + k] * value if math.isfinite(value) else math.inf


def schedule_error(
    num_steps: int,
    full_steps: Collection[int],
    cost: Cost,
    *,
    weights: Sequence[float] | None = None,
    propagation: float = 0.0,
    amplification: Amplification | None = None,
) -> float:
    """The error model of the module docstring for one schedule, evaluated step by step."""
    w = list(weights) if weights is not None else [1.0] * num_steps
    m = amplification or _alpha_one_amplification
    full = sorted(set(full_steps))
    if full[:2] != [0, 1]:
        raise BudgetError(f"steps 0 and 1 must be full, but the schedule is {full}")
    total, previous_injected = 0.0, 0.0
    last, gap, injected = 1, 1, 0.0
    for step in range(2, num_steps):
        if step in full:
            previous_injected, injected = injected, 0.0
            last, gap = step, step - last
            continue
        k = step - last
        inherited = propagation * m(last, gap, k) * previous_injected if propagation else 0.0
        step_error = _step_cost(cost, w, last, gap, k) + w[step] * inherited
        injected += step_error
        total += step_error
    return total


def plan_full_steps(
    num_steps: int,
    budget: int,
    cost: Cost,
    allows_gap: Callable[[int, int], bool],
    *,
    forced: Collection[int] = (),
    weights: Sequence[float] | None = None,
    propagation: float = 0.0,
    amplification: Amplification | None = None,
) -> tuple[int, ...]:
    """The B full steps of least modelled error (see the module docstring).

    ``cost(τ, g, k)``: error of the cached step τ + k (``None``: no error model); ``allows_gap(τ, k)``:
    whether τ + k may be cached; ``weights[t]``: the weight of step t's output (default 1);
    ``propagation``: the gain ρ of inherited errors (0: a sum of one-step errors);
    ``amplification(τ, g, k)``: the multiplier m of ``D_g`` (default ``k / g``).
    """
    forced_set = _checked_forced(num_steps, budget, forced)
    w = list(weights) if weights is not None else [1.0] * num_steps
    m = amplification or _alpha_one_amplification
    inf = math.inf

    def run(tau: int, g: int, limit: int) -> tuple[list[float], list[float]]:
        """Cumulative own cost and cumulative ``w · m`` of caching τ+1 … τ+j, j = 0 … (allowed)."""
        own, gain = [0.0], [0.0]
        for k in range(1, limit + 1):
            step = tau + k
            if step in forced_set or not allows_gap(tau, k):
                break
            own.append(own[-1] + _step_cost(cost, w, tau, g, k))
            gain.append(gain[-1] + (w[step] * m(tau, g, k) if propagation else 0.0))
        return own, gain

    # A label: (cost so far, I of the last segment, parent label, its full step, its gap).
    Label = tuple[float, float, object, int, int]
    # labels[(τ, g)][b]: the Pareto labels with b full steps, the last at τ after a gap g.
    labels: dict[tuple[int, int], list[list[Label]]] = {}
    root: Label = (0.0, 0.0, None, 1, 1)
    start: list[list[Label]] = [[] for _ in range(budget + 1)]
    start[2] = [root]
    labels[(1, 1)] = start
    finals: list[Label] = []

    def insert(front: list[Label], label: Label) -> None:
        cost_, injected = label[0], label[1]
        for other in front:
            if other[0] <= cost_ and other[1] <= injected:
                return
        front[:] = [o for o in front if not (cost_ <= o[0] and injected <= o[1])]
        front.append(label)
        if len(front) > MAX_LABELS:
            front.sort(key=lambda o: o[0])
            del front[MAX_LABELS:]

    for tau in range(1, num_steps):
        for g in range(1, tau + 1):
            fronts = labels.pop((tau, g), None)
            if fronts is None:
                continue
            own, gain = run(tau, g, num_steps - 1 - tau)
            closes = len(own) == num_steps - tau  # every step after τ may be cached
            for b in range(2, budget + 1):
                for label in fronts[b]:
                    cost_so_far, previous = label[0], label[1]
                    if closes and b == budget:
                        segment = own[-1] + propagation * gain[-1] * previous
                        finals.append((cost_so_far + segment, segment, label, num_steps, 0))
                    if b == budget:
                        continue
                    for j in range(1, len(own) + 1):
                        nxt = tau + j
                        if nxt >= num_steps:
                            break
                        segment = own[j - 1] + propagation * gain[j - 1] * previous
                        total = cost_so_far + segment
                        if not math.isfinite(total):
                            continue
                        target = labels.setdefault((nxt, j), [[] for _ in range(budget + 1)])
                        insert(target[b + 1], (total, segment if propagation else 0.0, label, nxt, j))
    feasible = [f for f in finals if f[0] < inf]
    if not feasible:
        raise BudgetError(
            f"full_steps={budget} cannot be met in a {num_steps}-step generation within the gaps the α table "
            "serves (the longest runs of cached steps it allows): raise the budget, or use the dynamic schedule"
        )
    best: object = min(feasible, key=lambda f: f[0])[2]
    steps = [0]
    while best is not None:
        assert isinstance(best, tuple)
        steps.append(best[3])
        best = best[2]
    result = tuple(sorted(set(steps)))
    assert len(result) == budget and forced_set <= set(result), (result, budget, forced_set)
    return result
