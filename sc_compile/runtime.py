"""The ScalingCache runtime: the host side of a compiled model.

Dynamo calls the runtime with the traced graph's inputs. Per call it reads the timestep (the one
scalar it needs to place the call in a generation), detects step and generation boundaries, takes
the step's decision, and runs the compiled full-step or cached-step graph with the state of the
call's stream. The full-step graph updates the state in place; the cached-step graph only reads
the buffers of the cache points the output head needs. The only device→host read besides the
timestep is the statistics row table written by a full step, read once when the next step decides.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from sc_compile.alpha import AlphaTable
from sc_compile.budget import BudgetError, plan_full_steps
from sc_compile.coefficients import Predictor, make_predictor, step_weights
from sc_compile.config import ChangePoints, Coefficients, ScalingCacheConfig
from sc_compile.reporting import GenerationReport, StreamReport
from sc_compile.schedule import DecisionUnit, StepDecision

log = logging.getLogger(__name__)

NUM_STAT_COLUMNS = 6


@dataclasses.dataclass
class CompiledStep:
    """One specialised graph, compiled, and the cond-graph inputs it takes."""

    fn: Callable[..., Any]
    input_indices: list[int]
    num_compute_nodes: int
    compile_seconds: float


@dataclasses.dataclass
class PointLayout:
    """The part of the cache layout the runtime needs."""

    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    device: torch.device
    feeds_output: list[bool]


class StreamState:
    """Preallocated state of one stream: two buffers per cache point and the statistics table."""

    def __init__(self, layout: PointLayout, cache_dtype: torch.dtype | None):
        self.buffers: list[torch.Tensor] = []
        for shape, dtype in zip(layout.shapes, layout.dtypes, strict=True):
            for _ in range(2):  # y_full, dy
                self.buffers.append(torch.zeros(shape, dtype=cache_dtype or dtype, device=layout.device))
        self.stats = torch.zeros(len(layout.shapes), NUM_STAT_COLUMNS, dtype=torch.float32, device=layout.device)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers) + self.stats.numel() * 4

    def zero_(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()
        self.stats.zero_()


class ModuleSession:
    """Per original module: its runtimes (one per compiled graph) and explicit generation info."""

    def __init__(self) -> None:
        self.runtimes: list[weakref.ReferenceType[ScalingCacheRuntime]] = []
        self.generation_epoch = 0
        self.num_inference_steps: int | None = None
        self.last_active: weakref.ReferenceType[ScalingCacheRuntime] | None = None


_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, ModuleSession] = weakref.WeakKeyDictionary()
_SESSIONS_LOCK = threading.Lock()


def session_for(module: torch.nn.Module, create: bool = True) -> ModuleSession | None:
    module = getattr(module, "_orig_mod", module)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(module)
        if session is None and create:
            session = ModuleSession()
            _SESSIONS[module] = session
        return session


class ScalingCacheRuntime:
    """Dispatches each call of one compiled graph to its full-step or cached-step graph."""

    def __init__(
        self,
        *,
        model_class: str,
        layout: PointLayout,
        full_step: CompiledStep,
        cached_step: CompiledStep,
        config: ScalingCacheConfig,
        alpha: AlphaTable | None,
        alpha_source: str,
        timestep_index: int,
        session: ModuleSession,
        fingerprint: str = "",
        granularity: str = "block",
        process_group: Any = None,
        calibration_hook: Callable[[ScalingCacheRuntime, int, int, torch.Tensor], None] | None = None,
    ):
        self.model_class = model_class
        self.fingerprint = fingerprint
        self.granularity = granularity
        # Context parallelism: the group whose ranks each hold a sequence shard of every hidden
        # state. The statistics are sums over elements, so one all-reduce (sum) of the table per
        # full step gives every rank the global values, hence the same decisions.
        self.process_group = process_group
        self.world_size = 1 if process_group is None else torch.distributed.get_world_size(process_group)
        self.num_allreduces = 0
        self.layout = layout
        self.full_step = full_step
        self.cached_step = cached_step
        self.config = config
        self.alpha = alpha
        self.alpha_source = alpha_source
        self.timestep_index = timestep_index
        self.session = session
        session.runtimes.append(weakref.ref(self))
        self.num_points = len(layout.shapes)
        self.streams: list[StreamState] = [StreamState(layout, config.cache_dtype)]
        self.is_full_flag = torch.ones((), dtype=torch.bool, device=layout.device)
        # Set by sc_compile.calibrate: every step full, the stats handed over after each step.
        self.calibration_hook = calibration_hook
        self.num_calls = 0
        self.num_full_calls = 0
        self.num_cached_calls = 0
        self._last_report: GenerationReport | None = None
        self._warned: set[str] = set()
        self._reset_generation(started=False)

    # -- generations ---------------------------------------------------------------------------
    def _reset_generation(self, started: bool = True) -> None:
        self._generation_started = started
        self._epoch = self.session.generation_epoch
        self._last_timestep: float | None = None
        self._step = -1
        self._stream = 0
        self._num_steps = self.session.num_inference_steps or self.config.num_inference_steps
        self._warmup = self.config.warmup_for(self._num_steps)
        self._units: dict[int, DecisionUnit] = {}
        self._streams_per_step: list[int] = []
        self._pending_full: dict[int, list[int]] = {}  # unit key -> streams of its last full step
        self._observed_through: dict[int, int] = {}
        self._predictor: Predictor | None = None
        self._planned_full_steps: tuple[int, ...] | None = None
        self._timesteps: list[float] = []
        # (decision, [2, P] tensor of its coef and refresh rows) of the step in flight.
        self._step_tensor_cache: tuple[StepDecision | None, torch.Tensor | None] = (None, None)

    def _start_generation(self) -> None:
        if self._generation_started:
            self._last_report = self._build_report(finished=True)
        self._reset_generation()
        if self.config.final_full_steps and self._num_steps is None:
            raise ValueError(
                f"final_full_steps={self.config.final_full_steps} needs the generation's step count: set "
                "options={'num_inference_steps': N} or wrap the pipeline call in "
                "`with sc_compile.generation(transformer, num_inference_steps=N):`"
            )
        if self._num_steps is not None and self._warmup >= self._num_steps:
            self._warn_once(
                "warmup",
                "ScalingCache: warm-up of %d steps covers the whole %d-step generation; nothing will be cached.",
                self._warmup,
                self._num_steps,
            )
        for stream in self.streams:
            stream.zero_()

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _unit_key(self, stream: int) -> int:
        return 0 if self.config.share_decision_across_streams else stream

    @property
    def uses_fitted_coefficients(self) -> bool:
        if self.config.coefficients is not None:
            return self.config.coefficients is Coefficients.FITTED
        return self.alpha is not None and self.alpha.fitted is not None

    def _generation_predictor(self) -> Predictor:
        """The coefficients of this generation (built at its first decision, then kept)."""
        if self._predictor is None:
            if self.alpha is None and self.config.coefficients is Coefficients.FITTED:
                raise ValueError(
                    "coefficients='fitted' needs a calibrated α table (format 2), but this model runs with "
                    "α = 1: pass options={'alpha': 'alpha.safetensors'} or drop coefficients."
                )
            self._predictor = make_predictor(
                self.alpha,
                num_points=self.num_points,
                num_steps=self._num_steps,
                timestep_of=lambda step: self._timesteps[step] if step < len(self._timesteps) else None,
                fitted=self.uses_fitted_coefficients,
            )
            if self.alpha is not None and self._num_steps is not None and self._num_steps != self.alpha.num_steps:
                log.info(
                    "ScalingCache: the α table was calibrated at %d steps; this generation (%s steps) maps its "
                    "coefficients over normalised time",
                    self.alpha.num_steps,
                    self._num_steps if self._num_steps is not None else "unknown",
                )
            if self.config.budgeted:
                self._planned_full_steps = self._plan(self._predictor)
        return self._predictor

    def _plan(self, predictor: Predictor) -> tuple[int, ...]:
        if self._num_steps is None:
            raise ValueError(
                "full_steps / speedup plan the generation's full steps in advance and need its step count: set "
                "options={'num_inference_steps': N} or wrap the pipeline call in "
                "`with sc_compile.generation(transformer, num_inference_steps=N):`"
            )
        num_steps = self._num_steps
        budget = self.config.budget_for(num_steps)
        final = set(range(max(0, num_steps - self.config.final_full_steps), num_steps))
        weights = step_weights(self.alpha, num_steps) if self.alpha is not None else None
        # The default warm-up (as the dynamic rule's) is shortened when the budget cannot be met
        # after it; a warm-up the user set is kept, and an unmeetable budget is an error.
        warmups = [self._warmup] if self.config.warmup_steps is not None else range(self._warmup, 1, -1)
        error: BudgetError | None = None
        for warmup in warmups:
            forced = set(range(min(warmup, num_steps))) | final
            try:
                planned = plan_full_steps(
                    num_steps, budget, predictor.segment_cost, predictor.allows_gap, forced=forced, weights=weights
                )
            except BudgetError as failure:
                error = failure
                continue
            self._warmup = warmup
            log.info("ScalingCache: planned full steps %s of %d (warm-up %d)", list(planned), num_steps, warmup)
            return planned
        assert error is not None
        raise error

    def _unit(self, key: int) -> DecisionUnit:
        unit = self._units.get(key)
        if unit is None:
            predictor = self._generation_predictor()
            unit = DecisionUnit(
                num_points=self.num_points,
                warmup_steps=self._warmup,
                predictor=predictor,
                planned_full_steps=self._planned_full_steps,
                final_full_steps=self.config.final_full_steps,
                num_steps=self._num_steps,
                static_interval=self.config.static_interval,
                change_points=(
                    None
                    if self.config.change_points is ChangePoints.ALL
                    else [i for i, feeds in enumerate(self.layout.feeds_output) if feeds]
                ),
            )
            self._units[key] = unit
        return unit

    def _stream_state(self, stream: int) -> StreamState:
        while len(self.streams) <= stream:
            self.streams.append(StreamState(self.layout, self.config.cache_dtype))
            self.streams[-1].zero_()
        return self.streams[stream]

    # -- the clock -----------------------------------------------------------------------------
    def _tick(self, timestep: float) -> None:
        """Place a call in the generation: a new generation, a new step, or the next stream."""
        forced = self.session.generation_epoch != self._epoch
        last = self._last_timestep
        if forced or last is None or timestep > last * (1 + 1e-6) + 1e-9:
            self._start_generation()
            self._step, self._stream = 0, 0
        elif math.isclose(timestep, last, rel_tol=1e-6, abs_tol=1e-9):
            self._stream += 1
        else:
            self._step += 1
            self._stream = 0
        self._last_timestep = timestep
        if self._stream == 0:
            self._streams_per_step.append(1)
            self._timesteps.append(timestep)
        else:
            self._streams_per_step[-1] = self._stream + 1

    def _observe(self, key: int, unit: DecisionUnit, upto_step: int, collective: bool = True) -> None:
        """Fold the changes of steps before ``upto_step`` into ``unit`` (at most one read).

        ``collective=False`` stops before a full step whose statistics would need an all-reduce:
        a report asked for on one rank must not start a collective the other ranks never join.
        """
        step = self._observed_through.get(key, -1) + 1
        while step < upto_step:
            decision = unit.decisions[step] if step < len(unit.decisions) else None
            if decision is None:
                break
            if decision.full and not collective and self.process_group is not None:
                break
            if decision.full:
                streams = self._pending_full.get(key, [])
                stats = self._global_stats(torch.stack([self.streams[s].stats for s in streams])).tolist() if streams else []
                change = unit.observe_full(step, stats)
            else:
                change = unit.observe_cached(step)
            if change is not None and not math.isfinite(change):
                self._warn_once(
                    "nonfinite",
                    "ScalingCache: the change at step %d is %s (non-finite hidden states); the next step "
                    "runs in full, and the report lists the step in nonfinite_steps.",
                    step,
                    change,
                )
            self._observed_through[key] = step
            step += 1

    def _global_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """The statistics summed over the context-parallel group (one all-reduce)."""
        if self.process_group is None:
            return stats
        stats = stats.clone()
        torch.distributed.all_reduce(stats, group=self.process_group)
        self.num_allreduces += 1
        return stats

    def _decision(self, step: int, stream: int, timestep: float) -> StepDecision:
        key = self._unit_key(stream)
        unit = self._unit(key)
        if len(unit.decisions) > step:
            return unit.decisions[step]
        self._observe(key, unit, step)
        decision = unit.decide(step)
        if self.calibration_hook is not None and not decision.full:
            raise AssertionError("calibration runs every step in full")
        if decision.full:
            self._pending_full[key] = []
        return decision

    def _step_tensors(self, decision: StepDecision, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's coefficient vectors on the device, made once per step for all its streams."""
        cached_decision, values = self._step_tensor_cache
        if cached_decision is not decision or values is None:
            values = torch.tensor([decision.coef, decision.refresh], dtype=torch.float32).to(device, non_blocking=True)
            self._step_tensor_cache = (decision, values)
        return values[0], values[1]

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        timestep_tensor = args[self.timestep_index]
        timestep = float(timestep_tensor.reshape(-1)[0])
        self._tick(timestep)
        step, stream = self._step, self._stream
        state = self._stream_state(stream)
        decision = self._decision(step, stream, timestep)
        self.num_calls += 1
        self.session.last_active = weakref.ref(self)
        device = self.layout.device
        coef, refresh = self._step_tensors(decision, device)
        inputs = [*args, self.is_full_flag, *state.buffers, coef, refresh, state.stats]
        compiled = self.full_step if decision.full else self.cached_step
        out = compiled.fn(*[inputs[i] for i in compiled.input_indices])
        if decision.full:
            self.num_full_calls += 1
            self._pending_full[self._unit_key(stream)].append(stream)
            if self.calibration_hook is not None:
                self.calibration_hook(self, step, stream, self._global_stats(state.stats))
        else:
            self.num_cached_calls += 1
        return out

    # -- reports -------------------------------------------------------------------------------
    def _build_report(self, finished: bool, collective: bool = True) -> GenerationReport:
        for key, unit in self._units.items():
            self._observe(key, unit, len(unit.decisions), collective)
        num_steps = self._step + 1
        streams = []
        max_streams = max(self._streams_per_step, default=0)
        for stream in range(max_streams):
            stream_unit = self._units.get(self._unit_key(stream))
            if stream_unit is None:
                continue
            unit = stream_unit
            decisions = unit.decisions[:num_steps]
            # A shared unit measures every stream; its own index among them is the stream's.
            position = stream if self.config.share_decision_across_streams else 0
            changes: list[float | None] = []
            for step in range(num_steps):
                per_stream = unit.stream_changes.get(step)
                changes.append(per_stream[position] if per_stream and position < len(per_stream) else None)
            streams.append(
                StreamReport(
                    stream=stream,
                    full_steps=tuple(d.step for d in decisions if d.full),
                    cached_steps=tuple(d.step for d in decisions if not d.full),
                    changes=tuple(changes),
                    reasons=tuple(d.reason for d in decisions),
                )
            )
        first = streams[0] if streams else None
        return GenerationReport(
            num_steps=num_steps,
            full_steps=first.full_steps if first else (),
            cached_steps=first.cached_steps if first else (),
            streams=tuple(streams),
            warmup_steps=self._warmup,
            num_points=self.num_points,
            alpha_source=self.alpha_source,
            shared_decisions=self.config.share_decision_across_streams,
            nonfinite_steps=tuple(sorted({s for u in self._units.values() for s in u.nonfinite_steps})),
            buffer_bytes=sum(s.nbytes for s in self.streams[:max(max_streams, 1)]),
            world_size=self.world_size,
            num_allreduces=self.num_allreduces,
            finished=finished,
        )

    def report(self) -> GenerationReport:
        """The current generation's record (or the last finished one if none has started)."""
        if not self._generation_started:
            if self._last_report is None:
                raise RuntimeError("no generation has run on this compiled model yet")
            return self._last_report
        # Under context parallelism the last full step's change is folded in by the next call
        # (on every rank), not here: the report may be asked for on one rank only.
        return self._build_report(finished=False, collective=False)

    @property
    def timesteps(self) -> list[float]:
        """The timesteps of the current (or last) generation's steps."""
        return list(self._timesteps)

    def end_generation(self) -> None:
        if self._generation_started:
            self._last_report = self._build_report(finished=True)
            self._generation_started = False
            self._last_timestep = None


def runtimes_of(model: torch.nn.Module) -> list[ScalingCacheRuntime]:
    session = session_for(model, create=False)
    if session is None:
        return []
    return [r for ref in session.runtimes if (r := ref()) is not None]


def latest_runtime(model: torch.nn.Module) -> ScalingCacheRuntime:
    session = session_for(model, create=False)
    runtime = session.last_active() if session is not None and session.last_active is not None else None
    if runtime is None:
        name = type(getattr(model, "_orig_mod", model)).__name__
        raise RuntimeError(
            f"{name} has not run under backend='scalingcache' yet: compile it with "
            "torch.compile(model, backend='scalingcache') and call it (run a generation) first."
        )
    return runtime
