"""Schedules chosen end to end at calibration time, and how a run uses them.

At calibration (:func:`sc_compile.calibrate` with ``plan_samples``), each budget of a small grid
gets candidate sets of full steps (the budget planner of :mod:`sc_compile.decision.budget` at
several error-propagation gains, uniform spacings with different warm-ups and final full steps,
TaylorSeer's fixed intervals, the dynamic rule's own schedule), each candidate is run closed loop
on calibration samples, and
the one whose *whole output* is nearest the uncached output is kept: a sum of one-step errors
cannot see how the errors of a generation propagate, a rollout does. The table stores the kept
schedules (:class:`~sc_compile.calibration.table.SchedulePlans`) with their calibrated errors and the dynamic rule's.
A table with two-difference coefficients has every budget chosen with two differences and with one;
each stored schedule keeps the order its rollouts were better with, and a run of it predicts with
that order (``Decisions``; the compile option ``predictor_order`` overrides).

A stored schedule is a set of full steps of the calibrated ``N``-step grid; a run of ``M`` steps
takes it by position in normalised time (:func:`map_plan`): the same fraction of full steps,
placed where the calibrated schedule places them (its quantiles), deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from sc_compile.calibration.table import mapped_budget


def map_plan(plan: Sequence[int], calibrated_steps: int, num_steps: int, budget: int | None = None) -> tuple[int, ...]:
    """The full steps of a ``num_steps``-step run for a plan of the ``calibrated_steps``-step grid.

    The plan's i-th full step sits at the quantile ``i / B`` of its full steps and the position
    ``plan[i] / N`` in normalised time; the run's j-th full step of ``B'`` (``budget``, default the
    same fraction) goes to the position of the quantile ``j / B'`` (linear between the plan's full
    steps and the end), rounded to a step, then moved to keep steps 0 and 1 full and all distinct.
    A plan whose last step is full keeps the run's last step full."""
    full = sorted(set(plan))
    n, m = calibrated_steps, num_steps
    if not full or full[:2] != [0, 1] or full[-1] >= n:
        raise ValueError(f"a plan runs steps 0 and 1 of its {n} steps in full, but got {full}")
    count = len(full)
    target = mapped_budget(count, n, m) if budget is None else budget
    if not 2 <= target <= m:
        raise ValueError(f"{target} full steps cannot be placed in a {m}-step generation")
    if m == n and target == count:
        return tuple(full)
    knots = [s / n for s in full] + [1.0]

    def position(q: float) -> float:
        x = q * count
        i = min(int(math.floor(x)), count - 1)
        return knots[i] + (x - i) * (knots[i + 1] - knots[i])

    steps = [round(position(j / target) * m) for j in range(target)]
    if full[-1] == n - 1:
        steps[-1] = m - 1
    steps[0], steps[1] = 0, 1
    for j in range(2, target):
        steps[j] = max(steps[j], steps[j - 1] + 1)
    for j in range(target - 1, 1, -1):
        steps[j] = min(steps[j], m - target + j, steps[j + 1] - 1 if j + 1 < target else m - 1)
    result = tuple(steps)
    assert len(set(result)) == target and result[:2] == (0, 1) and result[-1] < m, result
    return result


def uniform_schedule(
    num_steps: int, budget: int, warmup: int, final: int, weights: Sequence[float] | None = None
) -> tuple[int, ...] | None:
    """``budget`` full steps: the first ``warmup``, the last ``final``, the rest evenly spaced
    between (``weights``: evenly in the cumulative weight of the steps, e.g. the sampler's step sizes,
    instead of in steps; ``None``: they do not fit)."""
    n = num_steps
    inner = budget - warmup - final
    if warmup < 2 or inner < 0 or warmup + final > n or budget > n:
        return None
    full = set(range(warmup)) | set(range(n - final, n))
    first, end = (warmup - 1, n - final) if final else (warmup, n)
    slots = inner + 1 if final else inner
    offset = 1 if final else 0
    if weights is None:
        steps = [first + round((j + offset) * (end - first) / slots) for j in range(inner)] if inner else []
    else:
        # Cumulative weight at each step boundary from ``first``; the j-th step where it crosses j / slots.
        cumulative = [0.0]
        for t in range(first, end):
            cumulative.append(cumulative[-1] + max(float(weights[t]), 0.0))
        total = cumulative[-1]
        if total <= 0:
            return None
        steps = []
        for j in range(inner):
            goal = (j + offset) * total / slots
            distances = [abs(c - goal) for c in cumulative]
            steps.append(first + distances.index(min(distances)))
    full |= set(steps)
    return tuple(sorted(full)) if len(full) == budget else None


def interval_schedules(
    num_steps: int, budget: int, warmups: Sequence[int] = (2, 3, 4, 5, 6)
) -> list[tuple[str, tuple[int, ...]]]:
    """TaylorSeer's fixed-interval spacing with exactly ``budget`` full steps: the first ``w`` steps,
    one cached step, then every ``I``-th step from step ``w + 1`` (the first difference after the
    warm-up spans two steps); per warm-up ``w`` of ``warmups``, the shortest interval that gives exactly
    ``budget`` (if one does). (Even spacing straight after the warm-up is :func:`uniform_schedule`'s.)"""
    found: list[tuple[str, tuple[int, ...]]] = []
    for warmup in warmups:
        start = warmup + 1
        if warmup < 2 or start >= num_steps:
            continue
        for interval in range(2, num_steps - start + 1):
            steps = tuple(range(warmup)) + tuple(range(start, num_steps, interval))
            if len(steps) <= budget:
                if len(steps) == budget:
                    found.append((f"every {interval} steps from step {start}, warm-up {warmup}", steps))
                break
    return found


def feasible(schedule: Sequence[int], num_steps: int, allows_gap: Callable[[int, int], bool]) -> bool:
    """Whether every cached step of ``schedule`` is a gap the predictor serves."""
    full = set(schedule)
    last = 0
    for step in range(num_steps):
        if step in full:
            last = step
        elif not allows_gap(last, step - last):
            return False
    return True


def leading_full(schedule: Sequence[int]) -> int:
    """The number of full steps from step 0 on without a cached step between (its warm-up)."""
    full = set(schedule)
    count = 0
    while count in full:
        count += 1
    return count
