"""The full steps of a generation for a budget of B, chosen from the calibrated errors.

Dynamic programming over segments (as LeMiCa and BudCache search offline): a generation is a
sequence of full steps, each followed by a run of cached steps; a cached step ``τ + k`` after the
full step ``τ`` (itself ``g`` after the one before) costs ``w_{τ+k} · e(τ, g, k)``, the
calibrated relative error of the prediction times the weight of that step's output in the
result (the sampler's step size, when known). The search returns the set of exactly B full steps
that minimises the summed cost, among schedules whose every cached run the predictor allows.
Steps 0 and 1 are always full (the first difference needs two), as are any forced steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import torch

from sc_compile.errors import BudgetError


def plan_full_steps(
    num_steps: int,
    budget: int,
    cost: Callable[[int, int, int], float | None],
    allows_gap: Callable[[int, int], bool],
    *,
    forced: Collection[int] = (),
    weights: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """The B full steps of least total cost (see the module docstring).

    ``cost(τ, g, k)``: error of the cached step τ + k (``None``: no error model; an extrapolation's
    error grows with its gap, so the k-th cached step of a run costs k times its weight, which
    spreads the full steps evenly); ``allows_gap(τ, k)``: whether τ + k may be cached;
    ``weights[t]``: the weight of step t's output (default 1).
    """
    forced_set = {0, 1, *forced}
    if any(not 0 <= s < num_steps for s in forced_set):
        raise BudgetError(f"forced full steps {sorted(forced_set)} are outside a {num_steps}-step generation")
    if not len(forced_set) <= budget <= num_steps:
        raise BudgetError(
            f"full_steps={budget} cannot be met in a {num_steps}-step generation: it needs at least "
            f"{len(forced_set)} (steps {sorted(forced_set)} are always full) and at most {num_steps}"
        )
    w = list(weights) if weights is not None else [1.0] * num_steps
    inf = math.inf
    # best[τ][g]: [budget + 1] least cost with b full steps, the last at τ after a gap g.
    best: dict[int, dict[int, torch.Tensor]] = {t: {} for t in range(num_steps)}
    parent: dict[tuple[int, int], torch.Tensor] = {}
    start = torch.full((budget + 1,), inf, dtype=torch.float64)
    start[2] = 0.0
    best[1][1] = start

    def step_cost(tau: int, g: int, k: int) -> float:
        value = cost(tau, g, k)
        if value is None:
            return w[tau + k] * k
        return w[tau + k] * value if math.isfinite(value) else inf

    def run_costs(tau: int, g: int, limit: int) -> list[float]:
        """Cumulative cost of caching τ+1 … τ+j, for j = 0 … limit (inf past an allowed gap)."""
        totals, total = [0.0], 0.0
        for k in range(1, limit + 1):
            step = tau + k
            if step in forced_set or not allows_gap(tau, k):
                break
            total += step_cost(tau, g, k)
            totals.append(total)
        return totals

    finals: list[tuple[float, int, int]] = []
    for tau in range(1, num_steps):
        for g, costs in list(best[tau].items()):
            if not torch.isfinite(costs).any():
                continue
            runs = run_costs(tau, g, num_steps - 1 - tau)
            # Close the generation here: every step after τ cached.
            if len(runs) == num_steps - tau:
                finals.append((float(costs[budget]) + runs[-1], tau, g))
            for j in range(1, len(runs) + 1):
                nxt = tau + j
                if nxt >= num_steps:
                    break
                candidate = torch.full_like(costs, inf)
                candidate[1:] = costs[:-1] + runs[j - 1]
                current = best[nxt].get(j)
                if current is None:
                    best[nxt][j] = candidate
                    parent[(nxt, j)] = torch.full((budget + 1,), g, dtype=torch.int64)
                else:
                    better = candidate < current
                    best[nxt][j] = torch.where(better, candidate, current)
                    parent[(nxt, j)] = torch.where(better, torch.full_like(parent[(nxt, j)], g), parent[(nxt, j)])
    feasible = [f for f in finals if math.isfinite(f[0])]
    if not feasible:
        raise BudgetError(
            f"full_steps={budget} cannot be met in a {num_steps}-step generation within the gaps the α table "
            "serves (the longest runs of cached steps it allows): raise the budget, or use the dynamic schedule"
        )
    _, tau, g = min(feasible)
    steps = [tau]
    b = budget
    while tau > 1:
        previous_g = int(parent[(tau, g)][b])
        tau, g, b = tau - g, previous_g, b - 1
        steps.append(tau)
    steps.append(0)
    result = tuple(sorted(steps))
    assert len(result) == budget and forced_set <= set(result), (result, budget, forced_set)
    return result
