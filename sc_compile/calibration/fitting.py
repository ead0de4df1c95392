"""Fit the coefficients the runtime multiplies, from full-step calibration trajectories.

The runtime predicts a cached step ``τ + k`` after the last full step ``τ`` (whose full step before
it was ``τ − g``) as ``y_full + c · dy`` with ``y_full = y_τ`` and ``dy = r · (y_τ − y_{τ−g})``
(SPEC §1). The paper fits one-step α's and chains them; when the residuals are not geometric the
chain misses a k-step gap (SPEC §1, "Where we depart"). Here every coefficient is fitted for the
gaps the runtime takes, per last full step τ, previous gap g ≤ K + 1 (a full step after K cached
ones), gap k ≤ K and cache point p:

* ``r[τ, g, p]``: the least-squares map of ``D_g = y_τ − y_{τ−g}`` onto the one-step difference
  ``D_1`` (so ``dy`` estimates the latest one-step difference, the paper's meaning of Δ);
* ``a[τ, g, k, p]``: the least-squares coefficient of ``D_g`` that predicts ``y_{τ+k} − y_τ``;
  the runtime's coefficient is ``c = a / r``, so ``c · dy = a · D_g`` exactly.

Every inner product these need is a combination of the trajectory's Gram entries
``⟨y_i, y_j⟩`` with ``|i − j| ≤ 2K + 1``, so calibration keeps a banded Gram per (sample, stream,
point) — ``[N, P, 2K + 2]`` numbers — instead of trajectories.

Samples are pooled as one least-squares problem (the ratio of summed inner products: the estimator
that minimises the total squared error over the calibration set). Each coefficient is then shrunk
toward the α = 1 coefficient ``k / g`` by the factor, among {0, ¼, ½, ¾, 1}, with the lowest
leave-one-sample-out error: where samples disagree the fit is not trusted further than it
generalises to a sample it did not see (a one-step held-out error: not the end-to-end error of a
generation, which this does not model). ``shrink_rule="worst"`` instead takes the factor best for the
worst left-out sample, each sample's error as a ratio to its error under α = 1 (the summed error is
dominated by the samples of largest norm). On the Flux demo it saved one held-out sample 7 dB on a
fixed schedule, but the schedules chosen end to end with it were worse held out on Flux and Wan
(``benchmarks/schedule_ablation.py --plans --shrink-rule worst``), so the sum stays the default.
A refresh below a small fraction of ``1 / g`` falls back
to ``1 / g``. ``K_τ``, the longest gap the table serves after τ, is the
largest k for which every gap up to k predicts the output points better than reusing ``y_τ``.
Gaps past the calibrated grid's last step (reached only by a finer grid's last steps) have no data:
they carry the last calibrated gap's error and do not limit K_τ.

**Two differences** (:func:`fit_second_order`). Where a trajectory curves, the difference before
last carries what one difference cannot: ``y_{τ+k} ≈ y_τ + a₁ · D_g + a₂ · D'_h`` with
``D'_h = y_{τ−g} − y_{τ−g−h}`` (``h`` the gap before ``g``). At run time ``D'_h`` is the ``dy`` the
full step τ − g wrote (``r[τ − g, h] · D'_h``), kept in a third buffer, so the multipliers are
``c₁ = a₁ / r[τ, g]`` and ``c₂ = a₂ / r[τ − g, h]``. The pair is fitted per (τ, g, h, k, p) by the
same pooled least squares (a 2 × 2 system from the same banded Gram: lags up to ``k + g + h``) and
shrunk toward the first-order coefficient ``(a, 0)`` by the factor with the lowest
leave-one-sample-out error, ties to first order: where the second difference does not predict a
sample it did not see, the second coefficient is exactly 0 and the first is the first-order one.
Where the band lacks a lag, the system is singular or there is no earlier full step, first order
is the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

# Shrinkage factors toward α = 1 tried per coefficient (0: α = 1, 1: the pooled fit).
SHRINKAGE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# How the factor is chosen from the left-out samples' errors (:func:`fit_gap_coefficients`).
SHRINK_RULES = ("worst", "sum")

# A refresh below this fraction of 1 / g falls back to 1 / g (the fit's floor on r).
REFRESH_FLOOR = 1e-3

# What a table may hold (checked when it is made or loaded: a table past them is refused). The fit
# floors r at REFRESH_FLOOR / g, so the α = 1 coefficient (k / g) / r of a gap k is at most
# k / REFRESH_FLOOR = 1e3·k; a fitted a = ⟨Δ_k, D_g⟩ / ‖D_g‖² is bounded by ‖Δ_k‖ / ‖D_g‖ (Cauchy–Schwarz), which
# exceeds 1e3 times the α = 1 value k / g only for a trajectory whose k-step change is a thousand
# times its difference per step: no diffusion trajectory the runtime could extrapolate. Hence
# |c| ≤ COEF_LIMIT · k with COEF_LIMIT = 1e3 / REFRESH_FLOOR. The same reasoning bounds a one-step
# α (eq. 5, ‖D_t‖ / ‖D_{t−1}‖ at most) and a refresh r (‖D_1‖ / ‖D_g‖ at most) by 1e3. A coefficient
# past these would multiply a difference into values that overflow the cache dtype (NaN outputs).
COEF_LIMIT = 1e3 / REFRESH_FLOOR
ALPHA_LIMIT = 1e3
REFRESH_LIMIT = 1e3


def gram_width(max_gap: int) -> int:
    """Gram band needed for gaps up to ``max_gap`` (previous gaps up to ``max_gap + 1``)."""
    return 2 * max_gap + 2


class BandedGram:
    """⟨y_i, y_j⟩ for |i − j| < width of one trajectory, per cache point: ``gram[i, p, i − j]``."""

    def __init__(self, num_steps: int, num_points: int, width: int):
        self.gram = torch.full((num_steps, num_points, width), math.nan, dtype=torch.float64)

    @property
    def num_steps(self) -> int:
        return self.gram.shape[0]

    @property
    def width(self) -> int:
        return self.gram.shape[2]

    def set_row(self, step: int, row: torch.Tensor) -> None:
        """``row[p, d] = ⟨y_step, y_{step − d}⟩`` (entries with step − d < 0 are ignored)."""
        usable = min(self.width, step + 1)
        self.gram[step, :, :usable] = row[:, :usable].to(torch.float64)

    def entry(self, i: int, j: int) -> torch.Tensor:
        """``⟨y_i, y_j⟩`` per point: [P]."""
        hi, lo = max(i, j), min(i, j)
        return self.gram[hi, :, hi - lo]


@dataclasses.dataclass(frozen=True)
class FittedCoefficients:
    """The per-gap coefficients of one calibration, indexed [τ, g − 1, k − 1, (p)]."""

    coef: torch.Tensor  # [N, K + 1, K, P] c = a / r, the runtime's multiplier of dy
    refresh: torch.Tensor  # [N, K + 1, P] r, the runtime's refresh of dy at a full step after gap g
    error: torch.Tensor  # [N, K + 1, K] relative squared error of the output points' prediction
    max_gap: torch.Tensor  # [N] int64, K_τ: the longest gap served after a full step τ
    # Format 3: the two-difference coefficients fitted beside these (None: first order only).
    second: SecondOrderCoefficients | None = None

    def __post_init__(self) -> None:
        n, g, k, p = self.coef.shape
        if self.second is not None and tuple(self.second.coef.shape) != (n, g, g, k, p, 2):
            raise ValueError(
                f"second-order coef {tuple(self.second.coef.shape)} does not match the first-order coef "
                f"{tuple(self.coef.shape)} (expected {(n, g, g, k, p, 2)})"
            )
        if g != k + 1 or self.refresh.shape != (n, g, p) or self.error.shape != (n, g, k) or self.max_gap.shape != (n,):
            raise ValueError(
                f"inconsistent fitted coefficient shapes: coef {tuple(self.coef.shape)}, refresh "
                f"{tuple(self.refresh.shape)}, error {tuple(self.error.shape)}, max_gap {tuple(self.max_gap.shape)}"
            )
        for name in ("coef", "refresh"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"fitted {name} has non-finite values")
        if not (self.refresh > 0).all():
            raise ValueError("fitted refresh must be positive")
        gap = torch.arange(1, k + 1, dtype=self.coef.dtype).view(1, 1, k, 1)
        over = self.coef.abs() > COEF_LIMIT * gap
        if over.any():
            first = over.nonzero()[0].tolist()
            raise ValueError(
                f"fitted coef {self.coef[tuple(first)].item():.3g} at [step, previous gap - 1, gap - 1, point] {first} "
                f"is past what a fit can produce (|coef| <= {COEF_LIMIT:.0e} x gap; see sc_compile.calibration.fitting)"
            )
        if (self.refresh > REFRESH_LIMIT).any():
            raise ValueError(
                f"fitted refresh {self.refresh.max().item():.3g} is past what a fit can produce (<= "
                f"{REFRESH_LIMIT:.0e})"
            )
        if self.error.isnan().any() or (self.error < 0).any():
            raise ValueError("fitted error must be >= 0 (or inf), without NaN")
        if self.max_gap.dtype != torch.int64 or (self.max_gap < 0).any() or (self.max_gap > k).any():
            raise ValueError(
                f"max_gap must be int64 values in [0, {k}], but got {self.max_gap.dtype} {self.max_gap.tolist()}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.coef.shape[0])

    @property
    def max_gap_limit(self) -> int:
        return int(self.coef.shape[2])

    @functools.cached_property
    def lookups(self) -> FittedLookups:
        """The views the runtime reads, derived once per table (not per generation)."""
        return FittedLookups.of(self)

    @property
    def num_points(self) -> int:
        return int(self.coef.shape[3])


@dataclasses.dataclass(frozen=True)
class FittedLookups:
    """Derived views of a :class:`FittedCoefficients` for the predictor.

    On the calibrated grid every lookup is a plain index into host lists, so deciding a step does
    no tensor work; another grid interpolates ``ratio`` and ``error`` over (τ, g, k).
    """

    coef_rows: list[list[list[list[float]]]]
    refresh_rows: list[list[list[float]]]
    error_rows: list[list[list[float]]]
    max_gaps: list[int]
    # a = c · r as a ratio to the α = 1 coefficient k / g, [N, K + 1, K + 1, P] with k from 0: as a
    # gap shrinks to 0 every smooth trajectory's prediction tends to the linear one (ratio 1).
    ratio: torch.Tensor
    # The relative squared error, [N, K + 1, K + 1] with k from 0 (no gap, no error).
    error: torch.Tensor

    @classmethod
    def of(cls, fitted: FittedCoefficients) -> FittedLookups:
        coef = fitted.coef.double()
        n, g_dim, k_dim, _ = coef.shape
        gaps_g = torch.arange(1, g_dim + 1, dtype=torch.float64)[None, :, None, None]
        gaps_k = torch.arange(1, k_dim + 1, dtype=torch.float64)[None, None, :, None]
        ratio = coef * fitted.refresh.double()[:, :, None, :] / (gaps_k / gaps_g)
        error = fitted.error.double()
        return cls(
            coef_rows=fitted.coef.tolist(),
            refresh_rows=fitted.refresh.tolist(),
            error_rows=fitted.error.tolist(),
            max_gaps=fitted.max_gap.tolist(),
            ratio=torch.cat([torch.ones_like(ratio[:, :, :1]), ratio], dim=2),
            error=torch.cat([torch.zeros(n, g_dim, 1, dtype=torch.float64), error], dim=2),
        )


def _inner_products(stacked: torch.Tensor, tau: int, g: int, k: int) -> tuple[torch.Tensor, ...]:
    """Per (sample, point) [S, P]: ⟨Δ_k, D_g⟩, ⟨D_g, D_g⟩, ⟨D_g, D_1⟩, ⟨Δ_k, Δ_k⟩, ⟨y_{τ+k}, y_{τ+k}⟩.

    ``stacked``: the samples' banded Grams, [S, N, P, W].
    """

    def e(i: int, j: int) -> torch.Tensor:
        hi, lo = max(i, j), min(i, j)
        return stacked[:, hi, :, hi - lo]

    cross = e(tau + k, tau) - e(tau + k, tau - g) - e(tau, tau) + e(tau, tau - g)
    dd = e(tau, tau) - 2 * e(tau, tau - g) + e(tau - g, tau - g)
    d1 = e(tau, tau) - e(tau, tau - 1) - e(tau - g, tau) + e(tau - g, tau - 1)
    xx = e(tau + k, tau + k) - 2 * e(tau + k, tau) + e(tau, tau)
    yy = e(tau + k, tau + k)
    return cross, dd, d1, xx, yy


def _squared_error(a: torch.Tensor, cross: torch.Tensor, dd: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``‖Δ_k − a · D_g‖²`` from inner products (clamped: rounding can make it slightly negative)."""
    return (xx - 2 * a * cross + a * a * dd).clamp_min(0.0)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    ok = (denominator > 0) & torch.isfinite(numerator) & torch.isfinite(denominator)
    return torch.where(ok, numerator / torch.where(ok, denominator, torch.ones_like(denominator)), fallback)


def fit_gap_coefficients(
    grams: list[BandedGram],
    max_gap: int,
    feeds_output: list[bool],
    shrink: bool = True,
    held_out_error: bool = False,
    shrink_rule: str = "sum",
) -> FittedCoefficients:
    """Fit ``r``, ``c`` and the error table from the banded Grams of S trajectories (S ≥ 1).

    ``held_out_error``: the error table holds each sample's error under the coefficient fitted
    without it (leave one sample out, same shrinkage factor), instead of the in-sample error: the
    schedule search then ranks gaps by what generalises, not by where the fit was luckiest.
    """
    if not grams:
        raise ValueError("fitting needs at least one trajectory")
    if shrink_rule not in SHRINK_RULES:
        raise ValueError(f"shrink_rule must be one of {SHRINK_RULES}, but got {shrink_rule!r}")
    num_steps, num_points = grams[0].num_steps, grams[0].gram.shape[1]
    if any(g.gram.shape != grams[0].gram.shape for g in grams):
        raise ValueError("all trajectories must have the same steps and points")
    if max_gap < 1:
        raise ValueError(f"max_gap must be at least 1, but got {max_gap}")
    if grams[0].width < gram_width(max_gap):
        raise ValueError(
            f"the Gram band {grams[0].width} is too narrow for gaps up to {max_gap} (needs {gram_width(max_gap)})"
        )
    if len(feeds_output) != num_points or not any(feeds_output):
        raise ValueError("feeds_output must mark the cache points the output reads")
    out = torch.tensor(feeds_output)
    big_k = max_gap
    coef = torch.zeros(num_steps, big_k + 1, big_k, num_points, dtype=torch.float64)
    refresh = torch.zeros(num_steps, big_k + 1, num_points, dtype=torch.float64)
    error = torch.full((num_steps, big_k + 1, big_k), math.inf, dtype=torch.float64)
    reuse_error = torch.full((num_steps, big_k), math.inf, dtype=torch.float64)
    num_samples = len(grams)
    stacked = torch.stack([g.gram for g in grams])  # [S, N, P, W]
    for tau in range(num_steps):
        for g in range(1, big_k + 2):
            fallback_r = torch.full((num_points,), 1.0 / g, dtype=torch.float64)
            if tau - g < 0:
                refresh[tau, g - 1] = fallback_r
                coef[tau, g - 1] = torch.arange(1, big_k + 1, dtype=torch.float64)[:, None].expand(big_k, num_points)
                continue
            _, dd, d1, _, _ = _inner_products(stacked, tau, g, 0)
            r = _ratio(d1.sum(0), dd.sum(0), fallback_r)
            # D_1 nearly orthogonal to D_g makes r tiny and c = a / r huge: below a relative floor
            # the plain per-step average 1 / g is the refresh (c absorbs the scale either way).
            r = torch.where(r > REFRESH_FLOOR / g, r, fallback_r)
            refresh[tau, g - 1] = r
            for k in range(1, big_k + 1):
                ones_a = torch.full((num_points,), k / g, dtype=torch.float64)
                if tau + k > num_steps - 1:
                    coef[tau, g - 1, k - 1] = ones_a / r
                    continue
                cross, dd, _, xx, yy = _inner_products(stacked, tau, g, k)
                pooled = _ratio(cross.sum(0), dd.sum(0), ones_a)
                chosen = pooled
                held_out_chosen: torch.Tensor | None = None
                if shrink and num_samples >= 2:
                    # Leave-one-sample-out error of each shrinkage factor, per point.
                    held_out = torch.stack(
                        [_ratio(cross.sum(0) - cross[s], dd.sum(0) - dd[s], ones_a) for s in range(num_samples)]
                    )  # [S, P]
                    best_error: torch.Tensor | None = None
                    # "worst": the largest ratio over left-out samples to α = 1's error; "sum": the total
                    # squared error (dominated by the samples of largest norm).
                    worst = shrink_rule == "worst"
                    base = _squared_error(ones_a.expand_as(cross), cross, dd, xx).clamp_min(1e-300) if worst else None
                    for lam in SHRINKAGE_GRID:
                        each = _squared_error(ones_a + lam * (held_out - ones_a), cross, dd, xx)  # [S, P]
                        err = (each / base).max(0).values if base is not None else each.sum(0)
                        candidate = ones_a + lam * (pooled - ones_a)
                        held_candidate = ones_a + lam * (held_out - ones_a)  # [S, P]
                        if best_error is None or held_out_chosen is None:
                            best_error, chosen, held_out_chosen = err, candidate, held_candidate
                        else:
                            better = err < best_error
                            best_error = torch.where(better, err, best_error)
                            chosen = torch.where(better, candidate, chosen)
                            held_out_chosen = torch.where(better[None], held_candidate, held_out_chosen)
                coef[tau, g - 1, k - 1] = chosen / r
                measured = held_out_chosen if held_out_error and held_out_chosen is not None else chosen
                err = _squared_error(measured.expand_as(cross), cross, dd, xx)  # [S, P]
                norm = yy[:, out].sum()
                error[tau, g - 1, k - 1] = err[:, out].sum() / norm if norm > 0 else math.inf
                if g == 1:
                    reuse_error[tau, k - 1] = xx[:, out].sum() / norm if norm > 0 else math.inf
    # Gaps past the last calibrated step have no data: they are never taken on the calibrated
    # grid, and on a finer grid (whose last steps lie past it) they carry the last gap's error.
    for tau in range(num_steps):
        last = num_steps - 1 - tau  # the longest gap with data after τ
        for g in range(1, big_k + 2):
            if last >= 1 and last < big_k:
                error[tau, g - 1, last:] = error[tau, g - 1, last - 1]
            elif last < 1 and tau >= 1:
                error[tau, g - 1] = error[tau - 1, g - 1]
    # τ = 0 has no difference to extrapolate: it borrows τ = 1's errors, for positions between the
    # two on another grid (on this one it never precedes a cached step).
    if num_steps > 1:
        error[0] = error[1]
        reuse_error[0] = reuse_error[1]
    # K_τ: every gap up to it predicts better than reusing y_τ (for some previous gap); a gap
    # with no data is no objection.
    best_over_g = error.min(dim=1).values  # [N, K]
    serves = best_over_g < reuse_error
    max_gaps = torch.zeros(num_steps, dtype=torch.int64)
    for tau in range(num_steps):
        k = 0
        while k < big_k and (tau + k + 1 > num_steps - 1 or bool(serves[tau, k])):
            k += 1
        max_gaps[tau] = k
    return FittedCoefficients(coef=coef.float(), refresh=refresh.float(), error=error.float(), max_gap=max_gaps)


@dataclasses.dataclass(frozen=True)
class SecondOrderCoefficients:
    """Two-difference coefficients of one calibration, indexed [τ, g − 1, h − 1, k − 1, (p, term)].

    ``coef[..., 0]`` multiplies ``dy`` (written at τ), ``coef[..., 1]`` the ``dy`` written at the full
    step τ − g before it; where second order does not pay, ``coef[..., 1] == 0`` and ``coef[..., 0]``
    is the first-order coefficient.
    """

    coef: torch.Tensor  # [N, K + 1, K + 1, K, P, 2]
    error: torch.Tensor  # [N, K + 1, K + 1, K] relative squared error of the output points' prediction

    def __post_init__(self) -> None:
        if self.coef.ndim != 6 or self.coef.shape[-1] != 2 or self.coef.shape[1] != self.coef.shape[3] + 1:
            raise ValueError(f"second-order coef must be [N, K + 1, K + 1, K, P, 2], but got {tuple(self.coef.shape)}")
        if self.coef.shape[1] != self.coef.shape[2] or self.error.shape != self.coef.shape[:4]:
            raise ValueError(
                f"inconsistent second-order shapes: coef {tuple(self.coef.shape)}, error {tuple(self.error.shape)}"
            )
        if not torch.isfinite(self.coef).all():
            raise ValueError("second-order coef has non-finite values")
        if self.error.isnan().any() or (self.error < 0).any():
            raise ValueError("second-order error must be >= 0 (or inf), without NaN")

    def uses_second_difference(self) -> torch.Tensor:
        """Where the second coefficient is used, [N, K + 1, K + 1, K, P] bool."""
        return self.coef[..., 1] != 0


def fit_second_order(
    grams: list[BandedGram], first: FittedCoefficients, feeds_output: list[bool], shrink: bool = True
) -> SecondOrderCoefficients:
    """Fit the two-difference coefficients (module docstring) beside the first-order ``first``,
    fitted on the same trajectories. Per τ, vectorised over every (g, h, k)."""
    if not grams:
        raise ValueError("fitting needs at least one trajectory")
    stacked = torch.stack([g.gram for g in grams])  # [S, N, P, W]
    num_samples, num_steps, num_points, width = stacked.shape
    if num_steps != first.num_steps or num_points != first.num_points:
        raise ValueError("the first-order coefficients must come from the same trajectories")
    if len(feeds_output) != num_points or not any(feeds_output):
        raise ValueError("feeds_output must mark the cache points the output reads")
    big_k = first.max_gap_limit
    out = torch.tensor(feeds_output)
    refresh = first.refresh.double()  # [N, K + 1, P]
    first_coef = first.coef.double()
    first_error = first.error.double()
    shape = (big_k + 1, big_k + 1, big_k)
    coef = torch.zeros(num_steps, *shape, num_points, 2, dtype=torch.float64)
    error = torch.zeros(num_steps, *shape, dtype=torch.float64)
    g, h, k = torch.cartesian_prod(
        torch.arange(1, big_k + 2), torch.arange(1, big_k + 2), torch.arange(1, big_k + 1)
    ).unbind(1)  # [C] each, C = (K + 1)² K
    for tau in range(num_steps):
        # y₀ … y₃ = y_{τ+k}, y_τ, y_{τ−g}, y_{τ−g−h}: Δ = y₀ − y₁, D = y₁ − y₂, D' = y₂ − y₃.
        steps = (tau + k, torch.full_like(k, tau), tau - g, tau - g - h)
        valid = (steps[3] >= 0) & (steps[0] <= num_steps - 1) & (steps[0] - steps[3] <= width - 1)  # [C]
        at = [s.clamp(0, num_steps - 1) for s in steps]

        def e(i: int, j: int, at: list[torch.Tensor] = at) -> torch.Tensor:
            """⟨y_i, y_j⟩ per (sample, combination, point): [S, C, P]."""
            hi, lo = torch.maximum(at[i], at[j]), torch.minimum(at[i], at[j])
            return stacked[:, hi, :, (hi - lo).clamp_max(width - 1)].permute(1, 0, 2)

        def inner(a: int, b: int, c: int, d: int, valid: torch.Tensor = valid) -> torch.Tensor:
            """⟨y_a − y_b, y_c − y_d⟩, zero where the combination has no data."""
            value = e(a, c) - e(a, d) - e(b, c) + e(b, d)
            return torch.where(valid[None, :, None], value, torch.zeros_like(value))

        dg, dh = inner(0, 1, 1, 2), inner(0, 1, 2, 3)  # ⟨Δ, D⟩, ⟨Δ, D'⟩
        gg, gh, hh = inner(1, 2, 1, 2), inner(1, 2, 2, 3), inner(2, 3, 2, 3)
        xx = inner(0, 1, 0, 1)
        yy = torch.where(valid[None, :, None], e(0, 0), torch.zeros_like(xx))

        def squared_error(a1: torch.Tensor, a2: torch.Tensor, dg=dg, dh=dh, gg=gg, gh=gh, hh=hh, xx=xx) -> torch.Tensor:
            """``‖Δ − a₁ D − a₂ D'‖²`` per sample: [S, C, P]."""
            value = xx - 2 * a1 * dg - 2 * a2 * dh + a1 * a1 * gg + 2 * a1 * a2 * gh + a2 * a2 * hh
            return value.clamp_min(0.0)

        sums = [v.sum(0) for v in (dg, dh, gg, gh, hh)]  # [C, P]
        pooled1, pooled2, solvable = _solve_pair(*sums)
        r_now = refresh[tau, g - 1]  # [C, P]
        r_before = refresh[(tau - g).clamp_min(0), h - 1]
        first_a = first_coef[tau, g - 1, k - 1] * r_now  # the first-order a, [C, P]
        chosen1, chosen2 = pooled1, pooled2
        if shrink and num_samples >= 2:
            held1, held2, held_ok = _solve_pair(
                *(total[None] - v for total, v in zip(sums, (dg, dh, gg, gh, hh), strict=True))
            )  # [S, C, P]: fitted without sample s
            solvable = solvable & held_ok.all(0)
            held1, held2 = torch.where(held_ok, held1, first_a), torch.where(held_ok, held2, torch.zeros_like(held2))
            best = squared_error(first_a, torch.zeros_like(first_a)).sum(0)  # factor 0: first order
            chosen1, chosen2 = first_a.clone(), torch.zeros_like(first_a)
            for lam in SHRINKAGE_GRID[1:]:
                err = squared_error(first_a + lam * (held1 - first_a), lam * held2).sum(0)
                better = err < best
                best = torch.where(better, err, best)
                chosen1 = torch.where(better, first_a + lam * (pooled1 - first_a), chosen1)
                chosen2 = torch.where(better, lam * pooled2, chosen2)
        use = valid[:, None] & solvable & torch.isfinite(chosen1) & torch.isfinite(chosen2)
        chosen1 = torch.where(use, chosen1, first_a)
        chosen2 = torch.where(use, chosen2, torch.zeros_like(chosen2))
        coef[tau] = torch.stack([chosen1 / r_now, chosen2 / r_before], dim=-1).reshape(*shape, num_points, 2)
        norm = yy[:, :, out].sum((0, 2))  # [C]
        err = squared_error(chosen1, chosen2)[:, :, out].sum((0, 2))
        own = valid & (norm > 0)
        # No data (gaps past the grid, no full step before τ − g): first order's error, which
        # already carries its fill-ins for those gaps.
        error[tau] = torch.where(
            own, err / torch.where(own, norm, torch.ones_like(norm)), first_error[tau, g - 1, k - 1]
        ).reshape(shape)
    return SecondOrderCoefficients(coef=coef.float(), error=error.float())


def _solve_pair(
    dg: torch.Tensor, dh: torch.Tensor, gg: torch.Tensor, gh: torch.Tensor, hh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares pair of the 2 × 2 normal equations, and where the system is well posed."""
    det = gg * hh - gh * gh
    ok = (gg > 0) & (hh > 0) & (det > 1e-9 * gg * hh)
    safe = torch.where(ok, det, torch.ones_like(det))
    a1 = torch.where(ok, (hh * dg - gh * dh) / safe, torch.zeros_like(det))
    a2 = torch.where(ok, (gg * dh - gh * dg) / safe, torch.zeros_like(det))
    return a1, a2, ok


def one_step_alpha(gram: BandedGram) -> torch.Tensor:
    """The paper's eq. 5 α per step and point for one trajectory: [N, P] (1 where undefined)."""
    num_steps, num_points = gram.num_steps, gram.gram.shape[1]
    alpha = torch.ones(num_steps, num_points, dtype=torch.float64)
    for t in range(2, num_steps):
        e = gram.entry
        cross = e(t, t - 1) - e(t, t - 2) - e(t - 1, t - 1) + e(t - 1, t - 2)
        dd = e(t - 1, t - 1) - 2 * e(t - 1, t - 2) + e(t - 2, t - 2)
        alpha[t] = _ratio(cross, dd, torch.ones(num_points, dtype=torch.float64))
    return alpha
