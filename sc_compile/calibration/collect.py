"""Calibration: run generations with every step full and fit the coefficients cached steps use.

The model is compiled with the backend in calibration mode: every step runs in full, and after
each step the value of every cache point (its ``y_full`` buffer, which the full step has just
written) is folded into a banded Gram ``⟨y_t, y_{t−d}⟩``, d ≤ 2K + 1, per (sample, stream): a
window of 2K + 2 values per point is kept, never the trajectory. From the Grams:

* the per-gap least-squares coefficients the runtime multiplies (:mod:`sc_compile.calibration.fitting`, the
  default, table format 2), with the calibrated error of every gap for the schedule search;
* the paper's one-step α (eq. 5), ``<y_t − y_{t−1}, y_{t−1} − y_{t−2}> / |y_{t−1} − y_{t−2}|²``,
  folded over samples with an exponential moving average, β = 0.97 as in the paper (the first
  observation initialises it; steps t < 2 and vanished differences hold α = 1).

Points the output head does not read at a cached step enter their Gram through what their buffers
hold: by default the runtime's own subsample of the point (``statistic="subsample"``,
:mod:`sc_compile.contract`); with full buffers, a fixed strided subsample of at most
:data:`GRAM_SAMPLE_ELEMENTS` elements. Their coefficients only scale the predicted change ē, and
the subsample bounds the window's memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sc_compile.calibration.fitting import (
    BandedGram,
    fit_gap_coefficients,
    fit_second_order,
    gram_width,
    one_step_alpha,
)
from sc_compile.calibration.table import AlphaTable
from sc_compile.config import Granularity, InnerCompiler, Prediction, ScalingCacheConfig, is_int_at_least
from sc_compile.contract import Statistic

log = logging.getLogger(__name__)

# Warm-up long enough that no step of any generation is cached.
_ALL_FULL = 1 << 30
# Longest gap (in steps) the fitted coefficients serve by default.
DEFAULT_MAX_GAP = 8
# Elements of a non-output cache point that enter its Gram (a fixed strided subsample).
GRAM_SAMPLE_ELEMENTS = 1 << 16


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``⟨a, b⟩`` accumulated in float64, in chunks: the fits subtract Gram entries of nearly equal
    states, so float32 sums would lose the differences the coefficients are made of."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        total += torch.dot(a[start : start + chunk].double(), b[start : start + chunk].double())
    return total


class TrajectoryGrams:
    """Banded Grams of the running trajectories, one per (sample, stream)."""

    def __init__(self, width: int, feeds_output: list[bool]):
        self.width = width
        self.feeds_output = feeds_output
        self.rows: dict[tuple[int, int], list[torch.Tensor]] = {}  # (sample, stream) -> [P, W] per step
        self.windows: dict[tuple[int, int], list[list[torch.Tensor]]] = {}  # per point, newest last

    def _flat(self, value: torch.Tensor, point: int) -> torch.Tensor:
        # Kept in the point's own dtype: the values are exact there, and the window is 2K + 2 of them.
        flat = value.detach().reshape(-1)
        if not self.feeds_output[point] and flat.numel() > GRAM_SAMPLE_ELEMENTS:
            stride = -(-flat.numel() // GRAM_SAMPLE_ELEMENTS)
            flat = flat[::stride]
        return flat.clone()

    def observe(
        self, sample: int, stream: int, step: int, values: list[torch.Tensor], process_group: Any = None
    ) -> None:
        """Fold in the values of one step. Under context parallelism each rank holds a sequence
        shard of every value: the dot products are summed over the group (one all-reduce)."""
        key = (sample, stream)
        rows = self.rows.setdefault(key, [])
        if step != len(rows):
            raise RuntimeError(f"calibration saw step {step} of stream {stream} after {len(rows)} steps")
        windows = self.windows.setdefault(key, [[] for _ in values])
        usable = min(self.width, step + 1)
        local = torch.zeros(len(values), usable, dtype=torch.float64, device=values[0].device)
        for point, value in enumerate(values):
            current = self._flat(value, point)
            window = windows[point]
            window.append(current)
            del window[: max(0, len(window) - self.width)]
            local[point] = torch.stack([_dot64(current, past) for past in reversed(window)])  # d = 0, 1, ...
        if process_group is not None:
            torch.distributed.all_reduce(local, group=process_group)
        row = torch.full((len(values), self.width), float("nan"), dtype=torch.float64)
        row[:, :usable] = local.cpu()
        rows.append(row)

    def finish_sample(self, sample: int) -> None:
        for key in [k for k in self.windows if k[0] == sample]:
            del self.windows[key]

    def grams(self, num_steps: int) -> list[BandedGram]:
        result = []
        for key in sorted(self.rows):
            rows = self.rows[key]
            if len(rows) != num_steps:
                raise RuntimeError(f"sample {key[0]} stream {key[1]} ran {len(rows)} steps, expected {num_steps}")
            gram = BandedGram(num_steps, rows[0].shape[0], self.width)
            for step, row in enumerate(rows):
                gram.set_row(step, row)
            result.append(gram)
        return result


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
    max_gap: int = DEFAULT_MAX_GAP,
    statistic: str = "subsample",
    second_order: bool = False,
) -> AlphaTable:
    """Calibrate an α table by running ``samples`` generations with every step full.

    ``max_gap``: the longest gap K (in steps) the fitted coefficients may serve; each step's own
    limit K_τ ≤ K comes from the data (:mod:`sc_compile.calibration.fitting`). Keeps 2K + 2 values of every
    cache point while calibrating. ``statistic``: what the points no cached step reads keep (the
    compile option of that name): their coefficients are fitted on what the runtime measures ē on.
    ``second_order``: also fit the two-difference coefficients (a format-3 table, about 2(K + 1)
    times the first-order tensors), which a generation at the calibrated step count predicts with
    (the compile option ``predictor_order``).

    ``target`` is a diffusers pipeline (anything with a ``.transformer``) and ``samples`` a list of
    keyword-argument dicts for ``target(**kwargs)`` (a ``"seed"`` key becomes a CPU generator); or
    ``target`` is the transformer and ``samples`` a list of callables, each running one generation
    with the compiled transformer it is given. Every generation must have the same step count.
    The returned table carries the model's layout fingerprint; save it with ``table.save(path)``.
    """
    from tqdm.auto import tqdm

    from sc_compile.backends.scalingcache import scalingcache
    from sc_compile.runtime.dispatch import ScalingCacheRuntime
    from sc_compile.runtime.state import StreamState

    pipeline = target if hasattr(target, "transformer") else None
    transformer = pipeline.transformer if pipeline is not None else target
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"target must be a pipeline with a .transformer or an nn.Module, got {type(target).__name__}")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    if not is_int_at_least(max_gap, 1):
        raise ValueError(f"max_gap must be a positive int, but got {max_gap!r}")
    config = ScalingCacheConfig(
        warmup_steps=_ALL_FULL,
        alpha="ones",
        granularity=Granularity(granularity),
        prediction=Prediction(prediction),
        compiler=InnerCompiler(compiler),
        statistic=Statistic(statistic),
    )
    grams: dict[str, TrajectoryGrams] = {}
    sample_index = 0
    # One progress bar over the steps of all generations (the pipeline's own bars are off while it
    # shows); its total is known up front where every sample declares its step count. It also says
    # how many CPU threads torch runs on (calibration never sets them).
    declared = [s.get("num_inference_steps") if isinstance(s, Mapping) else None for s in samples]
    total = sum(n for n in declared if isinstance(n, int)) if all(isinstance(n, int) for n in declared) else None
    bar = tqdm(
        total=total, unit="step", disable=not progress, desc=f"calibrating (torch threads: {torch.get_num_threads()})"
    )
    counted: set[tuple[int, int]] = set()

    def hook(runtime: ScalingCacheRuntime, step: int, stream: int, state: StreamState) -> None:
        key = runtime.fingerprint
        if key not in grams:
            grams[key] = TrajectoryGrams(gram_width(max_gap), list(runtime.layout.feeds_output))
        values = [state.y_full(p) for p in range(runtime.num_points)]  # the values this full step wrote
        grams[key].observe(sample_index, stream, step, values, runtime.process_group)
        if (sample_index, step) not in counted:  # a step once, however many streams it runs
            counted.add((sample_index, step))
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
    missing = object()
    bar_config = vars(pipeline).get("_progress_bar_config", missing) if pipeline is not None else missing
    if pipeline is not None and progress and hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(**{**(bar_config if isinstance(bar_config, dict) else {}), "disable": True})
    try:
        for index, sample in enumerate(samples):
            bar.set_postfix_str(f"generation {index + 1}/{len(samples)}")
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
            for collected in grams.values():
                collected.finish_sample(sample_index)
            sample_index += 1
            report = runtime.report()
            if num_steps is None:
                num_steps, timesteps = report.num_steps, runtime.timesteps
                if bar.total is None:
                    bar.total = num_steps * len(samples)
                    bar.refresh()
                if pipeline is not None and getattr(pipeline.scheduler, "sigmas", None) is not None:
                    sigmas = [float(s) for s in pipeline.scheduler.sigmas.flatten().tolist()]
            elif report.num_steps != num_steps:
                raise ValueError(
                    f"sample {index} ran {report.num_steps} steps, the first ran {num_steps}: calibrate one "
                    "step count at a time (other counts are resampled at run time)"
                )
    finally:
        bar.close()
        if pipeline is not None and progress and hasattr(pipeline, "set_progress_bar_config"):
            if bar_config is missing:
                vars(pipeline).pop("_progress_bar_config", None)
            else:
                pipeline._progress_bar_config = bar_config
    if len(grams) != 1:
        raise RuntimeError(f"expected one traced graph layout, got {len(grams)} (did the shapes change?)")
    ((fingerprint, collected),) = grams.items()
    runtime = max(ours, key=lambda r: r.num_calls)
    assert num_steps is not None
    trajectories = collected.grams(num_steps)
    accumulator = AlphaAccumulator(runtime.num_points, beta)
    for gram in trajectories:
        for step, row in enumerate(one_step_alpha(gram).tolist()):
            accumulator.observe(step, row)
    limit = min(max_gap, max(1, num_steps - 2))
    fitted = fit_gap_coefficients(trajectories, limit, collected.feeds_output) if num_steps >= 3 else None
    if fitted is not None and second_order:
        second = fit_second_order(trajectories, fitted, collected.feeds_output)
        fitted = dataclasses.replace(fitted, second=second)
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
        fitted=fitted,
        config=config.to_dict(),
    )
