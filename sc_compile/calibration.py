"""α calibration (paper eq. 5): run generations with every step full and fit α per step and point.

The model is compiled with the backend in calibration mode: every step runs in full and its
statistics row holds ``<y_t - y_{t-1}, y_{t-1} - y_{t-2}>`` and ``|y_{t-1} - y_{t-2}|^2`` per
cache point (the full-step graph computes them from the two buffers it already keeps, so at most
three hidden states per point are alive: y_full, dy and the current value). The least-squares
solution of ``min_α |y_{t-1} + α (y_{t-1} - y_{t-2}) - y_t|^2`` is their ratio; the α of each
(sample, stream) is folded into an exponential moving average over samples, β = 0.97 as in the
paper (the first observation initialises it). Steps t < 2, and points whose difference vanished,
hold α = 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sc_compile.alpha import AlphaTable
from sc_compile.config import Granularity, InnerCompiler, Prediction, ScalingCacheConfig
from sc_compile.schedule import CHANGE_DOT_DY, DY_DOT_DY

log = logging.getLogger(__name__)

# Warm-up long enough that no step of any generation is cached.
_ALL_FULL = 1 << 30


def least_squares_alpha(change_dot_dy: float, dy_dot_dy: float) -> float:
    """Paper eq. 5: ``<y_t - y_{t-1}, Δ> / <Δ, Δ>``; 1 where Δ vanished."""
    if dy_dot_dy <= 0.0 or not math.isfinite(dy_dot_dy) or not math.isfinite(change_dot_dy):
        return 1.0
    return change_dot_dy / dy_dot_dy


class AlphaAccumulator:
    """EMA over samples of per-step, per-point α."""

    def __init__(self, num_points: int, beta: float = 0.97):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), but got {beta}")
        self.num_points = num_points
        self.beta = beta
        self.rows: dict[int, list[float]] = {}
        self.counts: dict[int, int] = {}

    def observe(self, step: int, alpha_row: Sequence[float]) -> None:
        if len(alpha_row) != self.num_points:
            raise ValueError(f"expected {self.num_points} values, got {len(alpha_row)}")
        current = self.rows.get(step)
        if current is None:
            self.rows[step] = list(alpha_row)
        else:
            self.rows[step] = [self.beta * c + (1 - self.beta) * a for c, a in zip(current, alpha_row, strict=True)]
        self.counts[step] = self.counts.get(step, 0) + 1

    def observe_stats(self, step: int, stats: Sequence[Sequence[float]]) -> None:
        """Fold in the statistics table a full ``step`` wrote (steps < 2 hold α = 1)."""
        if step < 2:
            self.observe(step, [1.0] * self.num_points)
            return
        self.observe(step, [least_squares_alpha(row[CHANGE_DOT_DY], row[DY_DOT_DY]) for row in stats])

    def table(self, num_steps: int) -> torch.Tensor:
        missing = [t for t in range(num_steps) if t not in self.rows]
        if missing:
            raise RuntimeError(f"no calibration data for steps {missing[:10]}")
        return torch.tensor([self.rows[t] for t in range(num_steps)], dtype=torch.float32)


def calibrate(
    target: Any,
    samples: Sequence[Mapping[str, Any]] | Sequence[Callable[[torch.nn.Module], Any]],
    *,
    beta: float = 0.97,
    granularity: str = "block",
    prediction: str = "hidden",
    compiler: str = "eager",
    command: str = "",
    progress: bool = True,
) -> AlphaTable:
    """Calibrate an α table by running ``samples`` generations with every step full.

    ``target`` is a diffusers pipeline (anything with a ``.transformer``) and ``samples`` a list of
    keyword-argument dicts for ``target(**kwargs)`` (a ``"seed"`` key becomes a CPU generator); or
    ``target`` is the transformer and ``samples`` a list of callables, each running one generation
    with the compiled transformer it is given. Every generation must have the same step count.
    The returned table carries the model's layout fingerprint; save it with ``table.save(path)``.
    """
    from tqdm.auto import tqdm

    from sc_compile.backends.scalingcache import scalingcache
    from sc_compile.runtime import ScalingCacheRuntime

    pipeline = target if hasattr(target, "transformer") else None
    transformer = pipeline.transformer if pipeline is not None else target
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"target must be a pipeline with a .transformer or an nn.Module, got {type(target).__name__}")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    config = ScalingCacheConfig(
        warmup_steps=_ALL_FULL,
        alpha="ones",
        granularity=Granularity(granularity),
        prediction=Prediction(prediction),
        compiler=InnerCompiler(compiler),
    )
    accumulators: dict[str, AlphaAccumulator] = {}
    bar = tqdm(total=None, unit="step", disable=not progress, desc="calibrating α")

    def hook(runtime: ScalingCacheRuntime, step: int, stream: int, stats: torch.Tensor) -> None:
        key = runtime.fingerprint
        if key not in accumulators:
            accumulators[key] = AlphaAccumulator(runtime.num_points, beta)
        accumulators[key].observe_stats(step, stats.tolist())
        bar.update(1)

    # The runtimes of this calibration: the model's session may also hold runtimes of earlier
    # compilations (another granularity, an earlier calibration), which must not be read here.
    ours: list[ScalingCacheRuntime] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        runtime = scalingcache(gm, example_inputs, config=config)
        if not isinstance(runtime, ScalingCacheRuntime):
            raise RuntimeError("calibration needs a model ScalingCache can cache")
        runtime.calibration_hook = hook
        ours.append(runtime)
        return runtime

    compiled = torch.compile(transformer, backend=backend)
    num_steps: int | None = None
    timesteps: list[float] = []
    scheduler_name = type(pipeline.scheduler).__name__ if pipeline is not None else ""
    sigmas: list[float] = []
    try:
        for index, sample in enumerate(tqdm(samples, desc="samples", disable=not progress)):
            with torch.no_grad():
                if pipeline is not None:
                    if not isinstance(sample, Mapping):
                        raise ValueError("with a pipeline, samples must be keyword-argument dicts")
                    kwargs = dict(sample)
                    if "seed" in kwargs:
                        kwargs["generator"] = torch.Generator().manual_seed(int(kwargs.pop("seed")))
                    original = pipeline.transformer
                    pipeline.transformer = compiled
                    try:
                        pipeline(**kwargs)
                    finally:
                        pipeline.transformer = original
                else:
                    if not callable(sample):
                        raise ValueError("with a transformer, samples must be callables taking the compiled model")
                    sample(compiled)
            if not ours:
                raise RuntimeError("the sample ran no call of the compiled transformer")
            runtime = max(ours, key=lambda r: r.num_calls)
            runtime.end_generation()
            report = runtime.report()
            if num_steps is None:
                num_steps, timesteps = report.num_steps, runtime.timesteps
                if pipeline is not None and getattr(pipeline.scheduler, "sigmas", None) is not None:
                    sigmas = [float(s) for s in pipeline.scheduler.sigmas.flatten().tolist()]
            elif report.num_steps != num_steps:
                raise ValueError(
                    f"sample {index} ran {report.num_steps} steps, the first ran {num_steps}: calibrate one "
                    "step count at a time (other counts are resampled at run time)"
                )
    finally:
        bar.close()
    if len(accumulators) != 1:
        raise RuntimeError(f"expected one traced graph layout, got {len(accumulators)} (did the shapes change?)")
    ((fingerprint, accumulator),) = accumulators.items()
    runtime = max(ours, key=lambda r: r.num_calls)
    assert num_steps is not None
    return AlphaTable(
        alpha=accumulator.table(num_steps),
        model_class=runtime.model_class,
        fingerprint=fingerprint,
        granularity=runtime.granularity,
        timesteps=tuple(timesteps),
        scheduler=scheduler_name,
        sigmas=tuple(sigmas),
        beta=beta,
        num_samples=len(samples),
        command=command,
    )
