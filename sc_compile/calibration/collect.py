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

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from sc_compile.calibration.fitting import (
    BandedGram,
    fit_gap_coefficients,
    fit_second_order,
    gram_width,
    one_step_alpha,
)
from sc_compile.calibration.table import AlphaTable, FinerGridCheck, SchedulePlans
from sc_compile.config import (
    ALL_FULL_WARMUP,
    Granularity,
    InnerCompiler,
    Prediction,
    ScalingCacheConfig,
    Schedule,
    is_int_at_least,
)
from sc_compile.contract import Statistic

log = logging.getLogger(__name__)

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
    plan_samples: int | None = None,
    plan_budgets: Sequence[int] | None = None,
    plan_refine: int = 0,
    finer_steps: int | None = None,
) -> AlphaTable:
    """Calibrate an α table by running ``samples`` generations with every step full.

    ``max_gap``: the longest gap K (in steps) the fitted coefficients may serve; each step's own
    limit K_τ ≤ K comes from the data (:mod:`sc_compile.calibration.fitting`). Keeps 2K + 2 values of every
    cache point while calibrating. ``statistic``: what the points no cached step reads keep (the
    compile option of that name): their coefficients are fitted on what the runtime measures ē on.
    ``second_order``: also fit the two-difference coefficients (a format-3 table, about 2(K + 1)
    times the first-order tensors), which a generation at the calibrated step count predicts with
    (the compile option ``predictor_order``). With ``plan_samples``, every budget's schedule is then
    chosen twice, with two differences (on graphs compiled with the third buffer) and with one, and
    the table keeps the better one with its order (``SchedulePlans.orders``): about twice the time.

    ``plan_samples``: choose schedules end to end (:mod:`sc_compile.decision.plans`): on the first
    ``plan_samples`` samples, run the dynamic rule and, per budget of ``plan_budgets`` (default N/2,
    N/3, N/4, N/5 and the dynamic rule's count), a few candidate schedules closed loop, and store
    per budget the one whose output is nearest the uncached output (about ``plan_samples`` × 70
    more generations, most of their steps cached); ``plan_refine``: sweeps of local search after
    (each moves every full step by one step either way, about ``2B`` rollouts per budget B per sweep).
    ``None``: 2 where the samples return their output
    (a pipeline does; a callable must return the output tensor), else none. ``0``: none.

    ``finer_steps``: with schedules chosen end to end and a pipeline, check the fitted coefficients at
    that many steps (more than the samples run): the planned default's schedule runs on the rollout
    samples with the coefficients mapped to that step count and with α = 1, then the dynamic rule with
    the coefficients chosen. Where α = 1 is better on every sample, generations of more steps than
    calibrated predict with α = 1; where the planned default's error there exceeds the dynamic rule's,
    their default is the dynamic rule (:class:`~sc_compile.calibration.table.FinerGridCheck`; about
    4 × ``plan_samples`` generations at that step count). ``None``: twice the calibrated step count
    (at least 9) where possible (not with callable samples, samples with their own timesteps /
    sigmas, a table without a planned default, or a pipeline that refuses the step count: each said
    in the log); ``0``: no check.

    ``target`` is a diffusers pipeline (anything with a ``.transformer``) and ``samples`` a list of
    keyword-argument dicts for ``target(**kwargs)`` (a ``"seed"`` key becomes a CPU generator); or
    ``target`` is the transformer and ``samples`` a list of callables, each running one generation
    with the compiled transformer it is given. Every generation must have the same step count.
    The returned table carries the model's layout fingerprint; save it with ``table.save(path)``.
    """
    from tqdm.auto import tqdm

    from sc_compile.backends.scalingcache import scalingcache
    from sc_compile.decision.coefficients import second_order_in_use
    from sc_compile.runtime.dispatch import ScalingCacheRuntime
    from sc_compile.runtime.state import StreamState

    pipeline = pipeline_of(target)
    transformer = pipeline.transformer if pipeline is not None else target
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"target must be a pipeline with a .transformer or an nn.Module, got {type(target).__name__}")
    if not samples:
        raise ValueError("calibration needs at least one sample")
    if not is_int_at_least(max_gap, 1):
        raise ValueError(f"max_gap must be a positive int, but got {max_gap!r}")
    if plan_samples is not None and not is_int_at_least(plan_samples, 0):
        raise ValueError(f"plan_samples must be an int >= 0 or None, but got {plan_samples!r}")
    if not is_int_at_least(plan_refine, 0):
        raise ValueError(f"plan_refine must be an int >= 0, but got {plan_refine!r}")
    if finer_steps is not None and not is_int_at_least(finer_steps, 0):
        raise ValueError(f"finer_steps must be an int >= 0 or None, but got {finer_steps!r}")
    if finer_steps and (pipeline is None or not all(isinstance(s, Mapping) for s in samples)):
        raise ValueError(
            f"finer_steps={finer_steps} runs the samples at another step count, which needs a pipeline and "
            "keyword-argument samples (their num_inference_steps is set); pass finer_steps=0"
        )
    if finer_steps and any(own_schedule(s) for s in samples):
        raise ValueError(
            f"finer_steps={finer_steps} runs the samples at another step count, but they give their own "
            f"{' / '.join(OWN_SCHEDULE_KEYS)}: pass finer_steps=0"
        )
    if finer_steps and plan_samples == 0:
        raise ValueError(
            f"finer_steps={finer_steps} runs the planned default at more steps, but plan_samples=0 stores no plans: "
            "pass plan_samples >= 1 or finer_steps=0"
        )
    if plan_samples is not None and plan_samples > len(samples):
        raise ValueError(f"plan_samples={plan_samples} is more than the {len(samples)} calibration samples")
    rollout_count = DEFAULT_PLAN_SAMPLES if plan_samples is None else plan_samples
    rollout_count = min(rollout_count, len(samples))
    outputs: list[torch.Tensor | None] = []
    config = ScalingCacheConfig(
        warmup_steps=ALL_FULL_WARMUP,
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
    if isinstance(declared[0], int):  # before anything runs
        check_finer_steps(finer_steps, declared[0])
        if finer_steps and declared[0] < MIN_PLAN_STEPS:
            raise ValueError(
                f"finer_steps={finer_steps} checks the stored plans, but no plans are chosen at {declared[0]} steps "
                f"(fewer than {MIN_PLAN_STEPS}): pass finer_steps=0"
            )
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

    def run_sample(sample: Any, model: Any = compiled) -> Any:
        """Run one generation with ``model`` (the compiled model); what it returned."""
        with torch.no_grad():
            if pipeline is not None:
                if not isinstance(sample, Mapping):
                    raise ValueError("with a pipeline, samples must be keyword-argument dicts")
                kwargs = dict(sample)
                if "seed" in kwargs:
                    kwargs["generator"] = torch.Generator().manual_seed(int(kwargs.pop("seed")))
                original = pipeline.transformer
                pipeline.transformer = model
                try:
                    return pipeline(**kwargs)
                finally:
                    pipeline.transformer = original
            if not callable(sample):
                raise ValueError("with a transformer, samples must be callables taking the compiled model")
            return sample(model)

    num_steps: int | None = None
    timesteps: list[float] = []
    scheduler_name = type(pipeline.scheduler).__name__ if pipeline is not None else ""
    sigmas: list[float] = []

    @contextlib.contextmanager
    def quiet_pipeline() -> Iterator[None]:
        """The pipeline's own progress bars off while calibration's shows (then as they were)."""
        if pipeline is None or not progress or not hasattr(pipeline, "set_progress_bar_config"):
            yield
            return
        missing = object()
        bar_config = vars(pipeline).get("_progress_bar_config", missing)
        pipeline.set_progress_bar_config(**{**(bar_config if isinstance(bar_config, dict) else {}), "disable": True})
        try:
            yield
        finally:
            if bar_config is missing:
                vars(pipeline).pop("_progress_bar_config", None)
            else:
                pipeline._progress_bar_config = bar_config

    quiet = contextlib.ExitStack()
    quiet.enter_context(quiet_pipeline())
    try:
        for index, sample in enumerate(samples):
            bar.set_postfix_str(f"generation {index + 1}/{len(samples)}")
            result = run_sample(sample)
            if index < rollout_count:
                outputs.append(output_tensor(result))
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
                check_finer_steps(finer_steps, num_steps)  # before the other samples run
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
        quiet.close()
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
    table = AlphaTable(
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
    references = [o for o in outputs if o is not None]
    if rollout_count and len(references) < rollout_count:
        if plan_samples is not None:
            raise ValueError(
                f"plan_samples={plan_samples} compares each schedule's output with the uncached one, but the samples "
                "returned no tensor (a callable sample must return its generation's output, a pipeline an output with "
                "images, frames or a tensor): return it, or pass plan_samples=0"
            )
        log.info("calibration: the samples return no output tensor, so no schedules are chosen end to end")
        rollout_count = 0
    if rollout_count and num_steps >= MIN_PLAN_STEPS:
        started = time.perf_counter()
        base = dataclasses.replace(config, warmup_steps=None, num_inference_steps=num_steps, alpha=table)
        running: list[tuple[ScalingCacheConfig, AlphaTable]] = []  # what the rollout in progress runs
        # The calibration's graphs keep y_full and dy per point. A cached step that reads the
        # difference before last needs a third buffer: such rollouts run on graphs compiled for it
        # (or every schedule would be judged with one difference and run with two).
        second_runners: list[ScalingCacheRuntime] = []

        def run_with(runtime: ScalingCacheRuntime, run_config: ScalingCacheConfig, run_table: AlphaTable) -> None:
            runtime.alpha = run_table
            runtime.calibration_hook = None
            runtime.session.config = run_config

        def second_order_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            runtime = scalingcache(gm, example_inputs, config=base)
            if not isinstance(runtime, ScalingCacheRuntime):
                raise RuntimeError("calibration needs a model ScalingCache can cache")
            run_with(runtime, *running[-1])
            second_runners.append(runtime)
            return runtime

        second_order_model = torch.compile(transformer, backend=second_order_backend)

        def run_all(
            run_config: ScalingCacheConfig, run_table: AlphaTable, on: Sequence[Any]
        ) -> tuple[list[torch.Tensor | None], list[tuple[int, ...]]]:
            """Each of ``on`` run with ``run_config`` and ``run_table``: its output and full steps."""
            second = second_order_in_use(run_table, run_config)
            model, runners = (second_order_model, second_runners) if second else (compiled, ours)
            running[:] = [(run_config, run_table)]
            for runtime in runners:
                run_with(runtime, run_config, run_table)
            produced, schedules = [], []
            for sample in on:
                result = run_sample(sample, model)
                if not runners:
                    raise RuntimeError("a rollout ran no call of the compiled transformer")
                runtime = max(runners, key=lambda r: r.num_calls)
                runtime.end_generation()
                schedules.append(runtime.report().full_steps)
                produced.append(output_tensor(result))
            return produced, schedules

        def rollout(
            run_config: ScalingCacheConfig,
            run_table: AlphaTable,
            on: Sequence[Any] | None = None,
            against: Sequence[torch.Tensor] | None = None,
        ) -> tuple[list[float], list[tuple[int, ...]]]:
            """Each rollout sample's output error (dB) against its uncached output, and its full steps
            (``on``/``against``: other samples and their uncached outputs)."""
            produced, schedules = run_all(run_config, run_table, samples[:rollout_count] if on is None else on)
            targets = references if against is None else against
            errors = []
            for output, reference in zip(produced, targets, strict=True):
                if output is None or output.shape != reference.shape:
                    raise RuntimeError("a schedule's rollout returned no output of the uncached output's shape")
                errors.append(error_db([relative_error(output, reference)]))
            return errors, schedules

        def choose(run_base: ScalingCacheConfig, budgets: Sequence[int] | None) -> SchedulePlans:
            with quiet_pipeline():
                return choose_plans(
                    table,
                    rollout,
                    base=run_base,
                    feeds_output=collected.feeds_output,
                    budgets=budgets,
                    samples=rollout_count,
                    progress=progress,
                    refine=plan_refine,
                )

        plans = choose(base, plan_budgets)
        if second_order_in_use(table, base):
            # Two differences are not better everywhere (held out on the Wan demo they lost 1-2 dB at
            # N/2 and gained 2-5 dB at N/4): each budget keeps the order whose rollouts were better.
            first = choose(dataclasses.replace(base, predictor_order=1), plans.counts())
            plans = merge_plan_orders(plans, first)
        seconds = time.perf_counter() - started
        table = dataclasses.replace(table, plans=plans, extra={**table.extra, "plan_seconds": f"{seconds:.1f}"})
        message = (
            f"calibration: chose {plans.full.shape[0]} schedules end to end on {rollout_count} samples in "
            f"{seconds:.0f} s (the dynamic rule: {plans.reference_error:.1f} dB at "
            f"{plans.reference_full_steps:.1f} full)"
        )
        if progress:
            tqdm.write(message)
        log.info(message)
        finer_at = default_finer_steps(num_steps) if finer_steps is None else finer_steps
        keyword_samples = [s for s in samples[:rollout_count] if isinstance(s, Mapping) and not own_schedule(s)]
        if finer_at and plans.default_index() is None:
            # The default above the calibrated count is then the dynamic rule, whose full steps depend on
            # the coefficients: no single schedule to measure both on.
            log.info(
                "calibration: no stored plan is within the dynamic rule's calibrated error, so the coefficients "
                "are not checked at more steps; generations of more steps than calibrated map the table's coefficients"
            )
        elif finer_at and pipeline is not None and len(keyword_samples) == rollout_count:
            started = time.perf_counter()
            at_steps = [{**sample, "num_inference_steps": finer_at} for sample in keyword_samples]
            with quiet_pipeline():
                # Every step full (the calibration's warm-up), with a table that plans nothing.
                bare = dataclasses.replace(table, fitted=None, plans=None)
                try:
                    uncached, _ = run_all(dataclasses.replace(config, num_inference_steps=finer_at), bare, at_steps)
                except Exception as error:
                    if finer_steps is not None:
                        raise ValueError(
                            f"finer_steps={finer_steps}: the pipeline did not run the samples at {finer_at} steps "
                            f"({error!r}); pass another finer_steps, or 0 for no check"
                        ) from error
                    # The default check: the calibration is kept, without it (said, with the error).
                    log.warning(
                        "calibration: the pipeline did not run the samples at %d steps (%r), so the coefficients are "
                        "not checked at more steps; generations of more steps than calibrated map the table's "
                        "coefficients. Pass finer_steps=N (a step count the pipeline runs) or 0 to silence this.",
                        finer_at,
                        error,
                    )
                    uncached = []
                finer = check_finer_grid(table, finer_at, rollout, base, at_steps, uncached) if uncached else None
            if finer is not None:
                table = dataclasses.replace(table, finer=finer)
                message = f"calibration: {finer.describe()} ({time.perf_counter() - started:.0f} s)"
                if progress:
                    tqdm.write(message)
                log.info(message)
        elif finer_at:
            log.info(
                "calibration: the samples are callables or give their own timesteps / sigmas, so the coefficients "
                "are not checked at more steps; generations of more steps than calibrated map the table's coefficients"
            )
    return table


# Pipeline arguments that fix a generation's schedule themselves: such samples cannot be run at
# another step count by setting num_inference_steps.
OWN_SCHEDULE_KEYS = ("timesteps", "sigmas")


def own_schedule(sample: Any) -> bool:
    """Whether a keyword-argument sample gives its own timesteps or sigmas."""
    return isinstance(sample, Mapping) and any(sample.get(key) is not None for key in OWN_SCHEDULE_KEYS)


def default_finer_steps(num_steps: int) -> int:
    """The step count calibration checks its coefficients at by default: twice the calibrated one, and
    more than a short schedule's (which the default runs without caching)."""
    from sc_compile.decision.coefficients import SHORT_SCHEDULE_STEPS

    return max(2 * num_steps, SHORT_SCHEDULE_STEPS + 1)


def check_finer_steps(finer_steps: int | None, num_steps: int) -> None:
    """Refuse an explicit ``finer_steps`` that is not more than the calibrated step count."""
    if finer_steps and finer_steps <= num_steps:
        raise ValueError(
            f"finer_steps={finer_steps} must be more than the {num_steps} steps the samples run (or 0: no check)"
        )


def pipeline_of(target: Any) -> Any:
    """The pipeline calibration runs (``None``: ``target`` is the transformer itself)."""
    return target if hasattr(target, "transformer") else None


Rollout = Callable[..., tuple[list[float], list[tuple[int, ...]]]]


def check_finer_grid(
    table: AlphaTable,
    num_steps: int,
    rollout: Rollout,
    base: ScalingCacheConfig,
    samples: Sequence[Any],
    uncached: Sequence[torch.Tensor | None],
) -> FinerGridCheck:
    """The table's planned default at ``num_steps`` (more than calibrated: what a generation there runs
    by default) run on ``samples`` (the rollout samples at that step count, ``uncached`` their outputs
    with every step full) with the table's coefficients mapped there and with α = 1, on the same full
    steps; then the dynamic rule there with the coefficients those two runs chose (whether the planned
    default stays within its error above the calibrated count). The table must have a planned default
    (a stored plan within the dynamic rule's error)."""
    plans = table.plans
    assert plans is not None
    references = [u for u in uncached if u is not None]
    if len(references) != len(samples):
        raise RuntimeError("a sample returned no output at the finer step count")
    if plans.default_index() is None:
        raise ValueError("the finer-grid check measures the planned default, but no stored plan is one")
    run_config = dataclasses.replace(base, num_inference_steps=num_steps, predictor_order=1, schedule=Schedule.PLANNED)
    assert table.fitted is not None
    # The two runs differ only in what a cached step multiplies (the same plan, the same table).
    as_table = dataclasses.replace(table, finer=FinerGridCheck.assuming(num_steps, ones_better=False))
    as_ones = dataclasses.replace(table, finer=FinerGridCheck.assuming(num_steps, ones_better=True))
    table_errors, table_steps = rollout(run_config, as_table, samples, references)
    ones_errors, ones_steps = rollout(run_config, as_ones, samples, references)
    if table_steps != ones_steps or len(set(table_steps)) != 1:
        raise RuntimeError(
            f"the finer-grid check ran different full steps with the table and with α = 1 ({table_steps} against "
            f"{ones_steps}); this is a bug in sc_compile"
        )
    check = FinerGridCheck(num_steps, tuple(table_steps[0]), tuple(table_errors), tuple(ones_errors))
    # The planned default met the dynamic rule's error at the calibrated count; whether its mapped plan
    # still does at num_steps is measured too (with the coefficients just chosen).
    verdict = dataclasses.replace(table, finer=FinerGridCheck.assuming(num_steps, ones_better=check.ones_better))
    dynamic_errors, dynamic_steps = rollout(
        dataclasses.replace(run_config, schedule=Schedule.DYNAMIC), verdict, samples, references
    )
    return dataclasses.replace(
        check,
        dynamic_errors=tuple(dynamic_errors),
        dynamic_full_steps=sum(len(s) for s in dynamic_steps) / len(dynamic_steps),
    )


def merge_plan_orders(second: SchedulePlans, first: SchedulePlans) -> SchedulePlans:
    """Per budget, the plan of lower calibrated error of ``second`` (chosen with two differences) and
    ``first`` (with one), with the order each is to run with; ``second``'s dynamic rule (the
    table's default predictor) stays the reference."""
    by_count = {count: index for index, count in enumerate(first.counts())}
    rows, errors, sources, orders = [], [], [], []
    for index, count in enumerate(second.counts()):
        other = by_count.get(count)
        plans, at, order = second, index, 2
        if other is not None and float(first.error[other]) < float(second.error[index]):
            plans, at, order = first, other, 1
        rows.append(plans.full[at])
        errors.append(float(plans.error[at]))
        sources.append(f"{plans.source(at)}, {'one difference' if order == 1 else 'two differences'}")
        orders.append(order)
    return dataclasses.replace(
        second,
        full=torch.stack(rows),
        error=torch.tensor(errors, dtype=torch.float32),
        sources=tuple(sources),
        orders=tuple(orders),
    )


def output_tensor(result: Any) -> torch.Tensor | None:
    """The output of a generation as a float CPU tensor: a tensor, a pipeline output's ``frames`` or
    ``images`` (tensors or arrays), or the first element of a tuple (``None``: none of these)."""
    import numpy as np

    for name in ("frames", "images"):
        value = getattr(result, name, None)
        if value is not None:
            result = value
            break
    if isinstance(result, tuple | list) and result and not isinstance(result[0], str):
        if isinstance(result, tuple):
            result = result[0]
        elif all(isinstance(r, np.ndarray) for r in result):
            result = np.stack(result)
    if isinstance(result, np.ndarray):
        result = torch.from_numpy(result.astype(np.float32))
    if isinstance(result, torch.Tensor) and result.is_floating_point():
        return result.detach().to("cpu", torch.float32).clone()
    return None


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖output − reference‖² / ‖reference‖²`` (in float64; a tiny floor where both are equal)."""
    num = float((output.double() - reference.double()).pow(2).sum())
    den = float(reference.double().pow(2).sum())
    return max(num / den if den > 0 else num, 1e-30)


def error_db(errors: Sequence[float]) -> float:
    """The whole-output error of a schedule over samples: the mean of ``10·log10`` of each (about minus
    the mean PSNR, up to each sample's range)."""
    return sum(10.0 * math.log10(e) for e in errors) / len(errors)


# Rollout samples of the end-to-end schedule choice by default, and its candidates.
DEFAULT_PLAN_SAMPLES = 2
# Schedules are chosen end to end from this many steps on.
MIN_PLAN_STEPS = 4
PLAN_PROPAGATIONS = (0.0, 1.0, 3.0)
# The candidate a budget ran before the end-to-end choice: another replaces it only where it is
# better on every rollout sample.
PLANNER_CANDIDATE = "budget planner ρ=0"
PLAN_UNIFORM = tuple((warmup, final) for warmup in (2, 4, 6) for final in (0, 1))
# Spacings even in the sampler's step sizes (the table's sigmas) instead of in steps.
PLAN_WEIGHTED = ((2, 1), (4, 1))


def default_budgets(num_steps: int, dynamic_full_steps: float) -> list[int]:
    """N/2, N/3, N/4, N/5 and the dynamic rule's count, each at least 3 and below N."""
    grid = [num_steps // k for k in (2, 3, 4, 5)] + [round(dynamic_full_steps)]
    return sorted({b for b in grid if 3 <= b < num_steps}, reverse=True)


def served_gaps(table: AlphaTable, num_steps: int) -> Callable[[int, int], bool]:
    """``allows_gap(τ, k)`` of ``table``'s predictor at ``num_steps`` steps: whether a cached step k
    steps after the full step τ is a gap the table serves."""
    from sc_compile.decision.coefficients import make_predictor

    return make_predictor(
        table,
        num_points=table.num_points,
        num_steps=num_steps,
        timestep_of=lambda step: None,
        fitted=table.fitted is not None,
    ).allows_gap


def candidate_schedules(
    table: AlphaTable,
    num_steps: int,
    budget: int,
    feeds_output: Sequence[bool],
    extra: Sequence[tuple[str, tuple[int, ...]]] = (),
) -> list[tuple[str, tuple[int, ...]]]:
    """The candidates for ``budget`` full steps: the budget planner at :data:`PLAN_PROPAGATIONS`, uniform
    spacings (:data:`PLAN_UNIFORM` warm-ups and final full steps; :data:`PLAN_WEIGHTED` even in the
    sampler's step sizes), fixed intervals (:func:`~sc_compile.decision.plans.interval_schedules`)
    and ``extra``; each at most once, each
    with exactly ``budget`` full steps and only gaps the table serves."""
    from sc_compile.decision.coefficients import step_weights
    from sc_compile.decision.decisions import Decisions, StepInfo
    from sc_compile.decision.plans import feasible, interval_schedules, uniform_schedule
    from sc_compile.errors import BudgetError

    bare = dataclasses.replace(table, plans=None)
    found: list[tuple[str, tuple[int, ...]]] = []
    # The gaps the table serves, whether or not the planner meets the budget within them.
    allows_gap = served_gaps(bare, num_steps)
    for rho in PLAN_PROPAGATIONS:
        options = ScalingCacheConfig(alpha=bare, full_steps=budget, propagation=rho, num_inference_steps=num_steps)
        decisions = Decisions(
            config=options,
            num_points=bare.num_points,
            feeds_output=feeds_output,
            alpha=bare,
            num_steps=num_steps,
            read_stats=lambda streams: [],
            warn=lambda *args: None,
        )
        try:
            decisions.predictor(lambda step: StepInfo(step, num_steps, lambda: None))
        except BudgetError:
            continue  # no schedule of the budget within the served gaps: the others are filtered below
        if decisions.planned_full_steps is not None and decisions.cache_off is None:
            found.append((f"budget planner ρ={rho:g}", tuple(decisions.planned_full_steps)))
    for warmup, final in PLAN_UNIFORM:
        steps = uniform_schedule(num_steps, budget, warmup, final)
        if steps is not None:
            found.append((f"uniform, warm-up {warmup}, final {final}", steps))
    weights = step_weights(bare, num_steps)
    for warmup, final in PLAN_WEIGHTED if weights is not None else ():
        steps = uniform_schedule(num_steps, budget, warmup, final, weights)
        if steps is not None:
            found.append((f"uniform in σ, warm-up {warmup}, final {final}", steps))
    found.extend(interval_schedules(num_steps, budget))
    found.extend(extra)
    unique: dict[tuple[int, ...], str] = {}
    for name, steps in found:
        if len(steps) == budget and steps[:2] == (0, 1) and steps not in unique:
            if feasible(steps, num_steps, allows_gap):
                unique[steps] = name
    return [(name, steps) for steps, name in unique.items()]


def choose_plans(
    table: AlphaTable,
    rollout: Callable[[ScalingCacheConfig, AlphaTable], tuple[list[float], list[tuple[int, ...]]]],
    *,
    base: ScalingCacheConfig,
    feeds_output: Sequence[bool],
    budgets: Sequence[int] | None = None,
    samples: int = 0,
    progress: bool = False,
    refine: int = 0,
) -> SchedulePlans:
    """Per budget, the candidate schedule of least whole-output error (:func:`candidate_schedules`),
    then ``refine`` sweeps of local search: each full step after step 1 moved by one step either way,
    kept where the closed loop says it is better.

    ``rollout(config, table)``: the error (:func:`error_db`) of running ``config`` with ``table`` on each
    rollout sample, and the full steps each sample ran. The budget planner's own schedule (ρ = 0, what
    the budget ran before) is kept unless another candidate is better on every rollout sample: a lead
    in the mean of two samples can be one sample's noise (held out on the Wan demo, such choices lost
    up to 3.6 dB). ``base``: the config the candidates run
    with (a budget is added; the table's own plans are replaced by the candidate's)."""
    from tqdm.auto import tqdm

    num_steps = table.num_steps
    bare = dataclasses.replace(table, plans=None)
    reference_errors, dynamic_runs = rollout(dataclasses.replace(base, alpha=bare, schedule=Schedule.DYNAMIC), bare)
    reference_error = sum(reference_errors) / len(reference_errors)
    reference_full = sum(len(r) for r in dynamic_runs) / len(dynamic_runs)
    chosen = budgets if budgets is not None else default_budgets(num_steps, reference_full)
    if any(not is_int_at_least(b, 2) or b > num_steps for b in chosen):
        raise ValueError(f"plan_budgets must be ints in [2, {num_steps}], but got {list(chosen)}")
    dynamic = tuple(dynamic_runs[0])
    work = [
        (budget, candidate_schedules(table, num_steps, budget, feeds_output, [("the dynamic rule's", dynamic)]))
        for budget in chosen
    ]
    bar = tqdm(total=sum(len(c) for _, c in work), unit="schedule", disable=not progress, desc="choosing schedules")
    from sc_compile.decision.plans import feasible

    allows_gap = served_gaps(bare, num_steps)

    def score(budget: int, steps: tuple[int, ...]) -> list[float]:
        mask = torch.zeros(1, num_steps, dtype=torch.bool)
        mask[0, list(steps)] = True
        one = SchedulePlans(mask, torch.zeros(1), reference_error, reference_full)
        error, ran = rollout(dataclasses.replace(base, full_steps=budget), dataclasses.replace(table, plans=one))
        if any(tuple(r) != steps for r in ran):
            raise RuntimeError(f"the rollout of {list(steps)} ran the full steps {ran}; a bug in sc_compile")
        bar.update(1)
        return error

    rows: list[torch.Tensor] = []
    errors: list[float] = []
    sources: list[str] = []
    try:
        for budget, candidates in work:
            scored = []
            for name, steps in candidates:
                each = score(budget, steps)
                error = sum(each) / len(each)
                log.info("calibration: %d full steps, %s: %.2f dB %s", budget, name, error, each)
                scored.append((error, name, steps, each))
            if not scored:
                continue
            # The budget planner's own schedule stays unless another is better on every rollout sample.
            incumbent = next((c for c in scored if c[1] == PLANNER_CANDIDATE), None)
            if incumbent is None:
                winner = min(scored, key=lambda c: c[0])
            else:
                planner_each = incumbent[3]
                dominating = [c for c in scored if all(a < b for a, b in zip(c[3], planner_each, strict=True))]
                winner = min(dominating, key=lambda c: c[0]) if dominating else incumbent
            best = winner[:3]
            for _ in range(refine):
                moved = False
                for position in range(2, budget):
                    for shift in (-1, 1):
                        moved_steps = list(best[2])
                        moved_steps[position] += shift
                        candidate = tuple(moved_steps)
                        if len(set(candidate)) < budget or candidate != tuple(sorted(candidate)):
                            continue
                        if candidate[-1] >= num_steps or not feasible(candidate, num_steps, allows_gap):
                            continue
                        bar.total += 1
                        each = score(budget, candidate)
                        error = sum(each) / len(each)
                        if error < best[0]:
                            best = (error, best[1].split(", refined")[0] + ", refined", candidate)
                            moved = True
                if not moved:
                    break
            mask = torch.zeros(num_steps, dtype=torch.bool)
            mask[list(best[2])] = True
            rows.append(mask)
            errors.append(best[0])
            sources.append(best[1])
    finally:
        bar.close()
    if not rows:
        raise ValueError(f"no candidate schedule fits the budgets {list(chosen)} of a {num_steps}-step generation")
    return SchedulePlans(
        full=torch.stack(rows),
        error=torch.tensor(errors, dtype=torch.float32),
        reference_error=reference_error,
        reference_full_steps=reference_full,
        sources=tuple(sources),
        samples=samples,
    )
