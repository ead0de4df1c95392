"""ScalingCache for a model whose blocks Dynamo compiles one by one (*per-block graphs*).

A graph break inside a block (or a hook on it: diffusers group offloading), or regional
compilation (``compile_repeated_blocks``), leaves the model's ``for block in blocks`` loop in
Python: Dynamo compiles each block call as its own frame, one graph per block class (reused for
every block of that class, the parameters are graph inputs), possibly split in two at a break
inside the block. These graphs see neither the timestep nor the model's module paths.

Each such graph gets a :class:`BlockGraphRuntime`. A call is tied to

* its **unit**: the block it runs, found from the graph's first parameter input (the block's
  first parameter, ``identity_index``), else from ``self`` of the frame that runs the graph (a
  module method whose parameters sit in submodules called in Python), else (the part of a block
  after a break inside it, a resume function without ``self``) the last unit that ran in this
  thread; together with the code
  the graph runs (a block's forward, or the part after its break), so the two graphs of a block
  split at a break are two units;
* its **model**: the module that holds the block and whose forward runs in Python above it;
* a **forward** of that model: the calls of the blocks between two calls of the same unit. A call
  of a unit that already ran in the current forward (or, under the pipeline clock, after a
  scheduler step or in another ``cache_context``) starts the next forward.

Forwards are placed by the generation's clock: under ``sc_compile.enable(pipe)`` at the pipeline's
step, one stream per forward in the step (named by the pipeline's ``cache_context``); inside
``sc_compile.generation(model, num_inference_steps=N)`` each forward is the next step (the step
count is required, so that guidance run as separate calls is refused rather than counted as
steps). Without either, the call is refused (:class:`ClockError`): nothing tells the steps apart.

All units of a generation share one decision per step (:class:`BlockGraphsState`, one
:class:`~sc_compile.decision.decisions.Decisions` with α = 1: no calibrated table describes these graphs).
At a full step every graph runs and each unit updates, for each of its outputs, ``y_full``, ``dy``
and a statistics row, as the whole-model full-step graph does (SPEC §1). At a cached step every
unit returns the prediction ``y_full + c·dy`` of exactly each of its own outputs without running
its graph: whatever consumes an output (the next block, the head, anything else in the model's
forward) gets a prediction of that very value, so the model needs no particular shape. Every
output therefore keeps full buffers. The change ē is the mean over all units' outputs of the
relative change, read once per full step (one device→host read of all units' statistics), so it is
the whole-model ē with ``statistic="full"``; with ``change_points="output"`` only the unit that ran
last in the forward counts. A unit is predicted only from buffers it wrote at the unit's last full
step; otherwise it runs in full.

The cache update runs eagerly after the compiled graph (a few element-wise kernels and four
reductions per output at full steps; one ``addcmul`` per output at cached steps), so graphs with
dynamic shapes need no specialisation. A full step's outputs are made contiguous, as the
predictions are, so the graph that consumes them sees one layout (no recompile for strides).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import torch

from sc_compile.clock.pipeline import scope_for_call
from sc_compile.clock.step_clock import ClockError
from sc_compile.config import ChangePoints, ScalingCacheConfig
from sc_compile.contract import (
    CHANGE_L1,
    NEXT_CHANGE_L1,
    PREV_L1,
    STAT_COLUMNS,
    VALUE_L1,
    CachePointSpec,
    PointLayout,
    stats_row,
)
from sc_compile.decision.decisions import Decisions, StepInfo
from sc_compile.decision.schedule import StepDecision
from sc_compile.memory import CacheMemoryError, new_stream_limit, refusal
from sc_compile.runtime.generations import (
    Generation,
    GenerationScope,
    is_uncached,
    module_key,
    session_for,
    stream_name,
)
from sc_compile.runtime.state import StatePool, StepCoefficients, StreamState

log = logging.getLogger("sc_compile.runtime")

__all__ = [
    "BLOCK_GRAPHS_TOKEN",
    "BlockGraphRuntime",
    "BlockGraphsState",
    "OutputPlan",
    "OutsideBlocksRuntime",
    "register_model",
]

# The session token of per-block graphs: every graph of one model's blocks shares one session
# (regional compilation compiles each block with its own ``torch.compile`` call).
BLOCK_GRAPHS_TOKEN = ("per-block graphs",)

ALPHA_SOURCE = "α = 1 (per-block graphs: no calibrated table applies to them)"


class _Thread(threading.local):
    def __init__(self) -> None:
        # The parameter that identified the last unit that ran in this thread.
        self.anchor: torch.Tensor | None = None


_THREAD = _Thread()

# id(parameter) -> (weak parameter, weak model): the model each block parameter belongs to.
_MODEL_OF_PARAMETER: dict[int, tuple[weakref.ReferenceType[Any], weakref.ReferenceType[Any]]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_model(model: torch.nn.Module) -> None:
    """Remember which model each of ``model``'s parameters belongs to (a call's anchor names it)."""
    model_ref = weakref.ref(model)
    with _REGISTRY_LOCK:
        for parameter in model.parameters():
            _MODEL_OF_PARAMETER[id(parameter)] = (weakref.ref(parameter), model_ref)


def _model_of(anchor: torch.Tensor) -> torch.nn.Module | None:
    entry = _MODEL_OF_PARAMETER.get(id(anchor))
    if entry is not None and entry[0]() is anchor:
        return entry[1]()
    # A model the graph was not compiled for (a copy of it): find it among the modules whose
    # forward runs in Python above this call.
    from sc_compile.backends.capture_check import running_models_holding

    for model in running_models_holding(anchor):
        register_model(model)
        return model
    return None


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """What a cached step returns in place of each output of the graph."""

    num_outputs: int
    # Output positions whose value is predicted (floating tensors the graph computes).
    predicted: tuple[int, ...]
    # Output position -> graph input index, for outputs that are inputs passed through.
    passthrough: tuple[tuple[int, int], ...]


@dataclasses.dataclass
class _Forward:
    """The forward of the model running now in this generation: its step, stream and units."""

    step: int
    stream: int
    name: str | None
    pipeline_step: int | None
    units: set[tuple[int, int]]


class _UnitState:
    """One unit's buffers in one stream (a :class:`StreamState` over the unit's outputs)."""

    def __init__(self, key: tuple[object, ...], layout: PointLayout, state: StreamState):
        self.key = key
        self.layout = layout
        self.state = state


class _CountedLayout:
    """What the report reads of a layout: the number of cache points (all units' outputs)."""

    def __init__(self, owner: BlockGraphsState):
        self._owner = owner

    @property
    def num_points(self) -> int:
        return sum(self._owner.unit_points.values())


class BlockGraphsState:
    """A generation's state for the per-block graphs of its model: the forward being run, each
    unit's buffers per stream, and the one decision per step that all units take.

    It stands in the generation's ``layouts`` (and is its ``leader``), so the report and the
    end of the generation treat it as any layout."""

    KEY: tuple[object, ...] = ("per-block graphs",)

    def __init__(self, generation: Generation, config: ScalingCacheConfig, where: str):
        if generation.source == "context" and generation.num_steps is None:
            raise ClockError(
                f"ScalingCache: the blocks of {generation.session.name} are compiled one by one ({where}) and see "
                "no timestep, so inside `sc_compile.generation` each forward of the blocks is one step and the "
                "step count must be declared: `with sc_compile.generation(transformer, num_inference_steps=N):` "
                "(or use `sc_compile.enable(pipe)`, which takes the steps from the pipeline's scheduler)."
            )
        session = generation.session
        self.generation = generation
        self.config = config
        self.key = self.KEY
        self.alpha_source = ALPHA_SOURCE
        self.process_group = None
        self.world_size = 1
        self.num_allreduces = 0
        self.streams: list[StreamState | None] = []  # none of the layout kind; units hold theirs
        self.layout = _CountedLayout(self)
        self.decisions = Decisions(
            config=config,
            num_points=1,  # α = 1: one coefficient serves every output (see read_stats)
            feeds_output=[True],
            alpha=None,
            num_steps=generation.num_steps,
            read_stats=self.read_stats,
            warn=session.warn_once,
            schedule_sigmas=generation.schedule_sigmas,
        )
        self.forward: _Forward | None = None
        self.units: dict[tuple[tuple[int, int], int], _UnitState] = {}
        self.unit_points: dict[tuple[int, int], int] = {}
        # stream -> (full step, the units that ran it in sync, in call order)
        self._synced: dict[int, tuple[int, list[_UnitState]]] = {}
        self._coefficients: dict[str, StepCoefficients] = {}
        self._outside: dict[tuple[str, str], StepCoefficients] = {}

    @classmethod
    def of(cls, generation: Generation, config: ScalingCacheConfig, where: str) -> BlockGraphsState:
        existing: Any = generation.layouts.get(cls.KEY)
        if existing is not None:
            assert isinstance(existing, BlockGraphsState)
            return existing
        if generation.layouts:
            raise ClockError(
                f"ScalingCache: {generation.session.name} runs both whole-model graphs and per-block graphs in "
                "one generation; compile it one way."
            )
        state = cls(generation, config, where)
        # It stands in for a layout: the report and the end of the generation read the same names.
        generation.layouts[cls.KEY] = state  # type: ignore[assignment]
        generation.leader = state  # type: ignore[assignment]
        return state

    # -- placement -----------------------------------------------------------------------------
    def place(self, unit: tuple[int, int], scope: GenerationScope, key: Any) -> _Forward:
        """The forward this call of ``unit`` belongs to (a new one where it starts one)."""
        name = stream_name(key)
        forward = self.forward
        pipeline = scope.pipeline
        starts = (
            forward is None
            or unit in forward.units
            or name != forward.name
            or (pipeline is not None and pipeline.steps_taken != forward.pipeline_step)
        )
        if starts:
            clock = self.generation.clock
            if pipeline is not None:
                step, stream = clock.place_in_pipeline_step(pipeline.steps_taken, name)
            else:
                step, stream = clock.place_next_forward(name)
            forward = self.forward = _Forward(step, stream, name, pipeline.steps_taken if pipeline else None, set())
            self.generation.num_calls += 1
        assert forward is not None
        forward.units.add(unit)
        return forward

    # -- decisions -----------------------------------------------------------------------------
    def decide(self, forward: _Forward, sigma: Callable[[], float | None]) -> StepDecision:
        generation = self.generation

        def step_info(s: int) -> StepInfo:
            return StepInfo(s, generation.num_steps, lambda: None)

        info = StepInfo(forward.step, generation.num_steps, lambda: None, sigma)
        return self.decisions.decide(forward.stream, info, step_info)

    def coefficients(self, device: torch.device, decision: StepDecision) -> StepCoefficients:
        """The step's coefficient c and refresh on ``device`` (written once per decision)."""
        buffers = self._coefficients.get(str(device))
        if buffers is None:
            buffers = self._coefficients[str(device)] = StepCoefficients(1, device)
        buffers.write(decision.coef, decision.refresh, decision)
        return buffers

    def outside_schedule(self, unit: _UnitState, step: int) -> tuple[StepCoefficients, str]:
        """A full step for a unit whose buffers do not hold the last full step (as the whole-model
        runtime's ``_outside_schedule``): right after its own full step the refresh is the plain
        difference; otherwise it starts over."""
        state = unit.state
        if state.last_full_step is not None and state.last_full_step == step - 1:
            kind, refresh, reason = "next", 1.0, "unit catching up (its buffers missed the last full step)"
        else:
            state.forget()
            kind, refresh, reason = "first", 0.0, "unit's first step (nothing written to predict from)"
        device = unit.layout.device
        buffers = self._outside.get((str(device), kind))
        if buffers is None:
            buffers = self._outside[(str(device), kind)] = StepCoefficients(1, device)
            buffers.write([0.0], [refresh], kind)
        return buffers, reason

    def synced_full(self, stream: int, step: int, unit: _UnitState) -> None:
        """``unit`` ran the unit's full ``step`` with the step's coefficients: its statistics count."""
        entry = self._synced.get(stream)
        if entry is None or entry[0] != step:
            entry = self._synced[stream] = (step, [])
            self.decisions.synced_full(stream)
        entry[1].append(unit)

    def read_stats(self, streams: Sequence[int]) -> list[list[list[float]]]:
        """The statistics of the last full step of ``streams`` as one row per stream (the decision
        unit's one point): one device→host read per device for all units.

        With α = 1 every output has the same coefficient, so the mean over outputs of the
        relative changes the host computes from per-output rows equals the change of one point
        whose row is ``[mean ratio, 1, mean next ratio, 1]``."""
        per_stream = [self._synced.get(s, (None, []))[1] for s in streams]
        if self.config.change_points is ChangePoints.OUTPUT:
            per_stream = [units[-1:] for units in per_stream]
        by_device: dict[str, list[torch.Tensor]] = {}
        for units in per_stream:
            for unit in units:
                by_device.setdefault(str(unit.layout.device), []).append(unit.state.stats)
        rows_of: dict[int, list[list[float]]] = {}
        for tables in by_device.values():
            rows = torch.cat(tables).tolist()  # the one read of this device
            start = 0
            for table in tables:
                rows_of[id(table)] = rows[start : start + table.shape[0]]
                start += table.shape[0]
        result = []
        for units in per_stream:
            rows = [row for unit in units for row in rows_of[id(unit.state.stats)]]
            if not rows:
                result.append([[0.0] * len(STAT_COLUMNS)])
                continue
            change = sum(_relative(r[CHANGE_L1], r[PREV_L1]) for r in rows) / len(rows)
            following = sum(_relative(r[NEXT_CHANGE_L1], r[VALUE_L1]) for r in rows) / len(rows)
            virtual = [0.0] * len(STAT_COLUMNS)
            virtual[CHANGE_L1], virtual[PREV_L1], virtual[NEXT_CHANGE_L1], virtual[VALUE_L1] = (
                change,
                1.0,
                following,
                1.0,
            )
            result.append([virtual])
        return result

    # -- buffers -------------------------------------------------------------------------------
    def unit_state(self, unit: tuple[int, int], stream: int) -> _UnitState | None:
        return self.units.get((unit, stream))

    def new_unit_state(
        self, unit: tuple[int, int], stream: int, label: str, outputs: Sequence[torch.Tensor]
    ) -> _UnitState:
        """Buffers for ``unit`` in ``stream``, shaped after its outputs at its first full step."""
        cache_dtype = self.config.cache_dtype
        points = [
            CachePointSpec(
                index=i, block=label, node_name=f"output {i}", shape=tuple(y.shape), dtype=y.dtype, feeds_output=True
            )
            for i, y in enumerate(outputs)
        ]
        device = outputs[0].device if outputs else torch.device("cpu")
        layout = PointLayout(points=points, device=device, fingerprint=f"per-block graph {label}")
        key = layout.key(cache_dtype)
        pool = self.generation.session.pool
        if not pool.has(key):
            new = layout.stream_nbytes(cache_dtype)
            limit, source, counted = new_stream_limit(self.config.max_cache_bytes, device, self.nbytes)
            needed = counted + new
            if limit is not None and needed > limit:
                error = refusal(
                    f"{label} (stream {stream}) of this generation",
                    needed,
                    limit,
                    source,
                    layout,
                    cache_dtype,
                    self.config.granularity,
                    streams=1,
                    available=limit - self.nbytes,
                )
                raise CacheMemoryError(
                    f"{error} With per-block graphs every output of every block graph keeps two full buffers "
                    "per stream; compiling the whole model as one graph keeps them only for the last block's output."
                )
        state = self.units[(unit, stream)] = _UnitState(key, layout, pool.take(key, layout, cache_dtype))
        self.unit_points[unit] = len(points)
        return state

    @property
    def nbytes(self) -> int:
        return sum(u.state.nbytes for u in self.units.values())

    def release(self, pool: StatePool) -> None:
        """Hand every unit's buffers back to the session's pool (the generation has finished)."""
        by_key: dict[tuple[object, ...], list[StreamState]] = {}
        for unit in self.units.values():
            by_key.setdefault(unit.key, []).append(unit.state)
        for key, states in by_key.items():
            pool.give_back(key, states)
        self.units.clear()
        self._synced.clear()


_TORCH_DIR = os.path.dirname(torch.__file__)


def _caller_anchor() -> torch.Tensor | None:
    """The first parameter of ``self`` of the frame that runs the graph (the first frame above
    this call outside PyTorch), for a graph that takes no parameter: a module method compiled
    whole (its parameters are in submodules called in Python). ``None`` for a resume function,
    which has no ``self``."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)
    ):
        frame = frame.f_back
    owner = frame.f_locals.get("self") if frame is not None else None
    if isinstance(owner, torch.nn.Module):
        return next(owner.parameters(), None)
    return None


def _dense(value: torch.Tensor) -> torch.Tensor:
    """``value`` with the strides of a fresh contiguous tensor, as a prediction has. Dynamo guards
    on exact strides (a slice of a wider tensor with a batch of one is "contiguous" but has other
    strides), so a consumer graph would otherwise be recompiled between full and cached steps."""
    if value.stride() == torch.empty(value.shape, device="meta").stride():
        return value
    return value.clone(memory_format=torch.contiguous_format)


def _relative(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else float("inf")
    return numerator / denominator


class BlockGraphRuntime:
    """Runs one per-block graph: in full (with the cache update) or as the prediction of its outputs."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        model: torch.nn.Module,
        label: str,
        where: str,
        code: object,
        identity_index: int | None,
        outputs: OutputPlan,
        config: ScalingCacheConfig,
        compile_token: Any,
    ):
        self.fn = fn
        self.model_class = type(model).__name__
        self.label = label
        self.where = where
        self.code_id = id(code)
        self._code = code  # keeps the id unique
        self.identity_index = identity_index
        self.outputs = outputs
        self.config = config
        self.compile_token = compile_token
        self.num_calls = 0
        self.num_full_calls = 0
        self.num_cached_calls = 0
        self._warned_scopes: set[str] = set()
        register_model(model)

    # -- what the call is ----------------------------------------------------------------------
    def _anchor(self, args: tuple[Any, ...]) -> torch.Tensor:
        if self.identity_index is not None:
            anchor = args[self.identity_index]
            _THREAD.anchor = anchor
            return anchor
        anchor = _caller_anchor()
        if anchor is not None:
            _THREAD.anchor = anchor
            return anchor
        anchor = _THREAD.anchor
        if anchor is None:
            raise ClockError(
                f"ScalingCache: the graph of {self.label} ({self.where}) takes no parameter of its block and no "
                "block ran before it in this thread, so the block it belongs to is unknown. Run it inside the "
                f"forward of {self.model_class}, or remove the graph break inside the block."
            )
        return anchor

    def __call__(self, *args: Any) -> Any:
        from sc_compile.runtime.dispatch import (
            _ACTIVITY,
            GradEnabledError,
            _scheduler_sigma,
            refuse_stochastic,
        )

        if torch.is_grad_enabled():
            raise GradEnabledError(
                f"ScalingCache: {self.model_class} was called with autograd enabled. The cache updates its "
                "buffers in place, which autograd cannot differentiate, and a denoising loop needs no gradients: "
                "run it under `torch.no_grad()` or `torch.inference_mode()` (diffusers pipelines do)."
            )
        anchor = self._anchor(args)
        model = _model_of(anchor)
        if model is None:
            raise ClockError(
                f"ScalingCache: {self.label} ({self.where}) was called outside the forward of a model that holds "
                "it, so no generation can place it. Call the model, or compile the whole model with "
                "torch.compile(model, backend='scalingcache')."
            )
        key = module_key(model)
        session = session_for(key, BLOCK_GRAPHS_TOKEN, self.config, type(model).__name__)
        if not any(ref() is self for ref in session.runtimes):
            session.runtimes.append(weakref.ref(self))
            session.warn_once(
                "per-block-alpha",
                "ScalingCache: Dynamo compiles the blocks of %s one by one (%s); they are cached with α = 1 (no "
                "calibrated table applies to per-block graphs) and every block output keeps two full buffers per "
                "stream.",
                type(model).__name__,
                self.where,
            )
        session.last_active = next(_ACTIVITY)
        if is_uncached(key):
            return self.fn(*args)
        scope, side_call = scope_for_call(key)
        if side_call:
            return self.fn(*args)
        if scope is None:
            raise ClockError(
                f"ScalingCache: Dynamo compiles the blocks of {type(model).__name__} one by one ({self.where}), and "
                "these graphs see no timestep, so the steps of a generation cannot be told apart from the calls. "
                "Place them explicitly: `sc_compile.enable(pipe)` (steps from the pipeline's scheduler) or "
                "`with sc_compile.generation(transformer, num_inference_steps=N):` around each generation (one "
                "forward per step). Or remove the graph break so that Dynamo compiles the whole forward."
            )
        generation = session.generation_for(scope)
        if scope.pipeline is not None and generation.clock.stream_names and stream_name(key) is None:
            # The pipeline names its denoising calls; one outside any cache_context is not one.
            return self.fn(*args)
        if scope.pipeline is not None and (scope.pipeline.stochastic or scope.stochastic_sampler):
            refuse_stochastic(self.config, scope, self._warned_scopes)
        elif scope.stochastic_sampler:
            refuse_stochastic(self.config, scope, self._warned_scopes)
        unit = (id(anchor), self.code_id)
        with generation.lock:
            state = BlockGraphsState.of(generation, session.config, self.where)
            forward = state.place(unit, scope, key)
            sigma = (
                _scheduler_sigma(scope.pipeline.scheduler, forward.step) if scope.pipeline is not None else lambda: None
            )
            return self._dispatch(state, unit, forward, sigma, args)

    # -- running -------------------------------------------------------------------------------
    def _dispatch(
        self,
        state: BlockGraphsState,
        unit: tuple[int, int],
        forward: _Forward,
        sigma: Callable[[], float | None],
        args: tuple[Any, ...],
    ) -> Any:
        step, stream = forward.step, forward.stream
        decision = state.decide(forward, sigma)
        previous = state.decisions.unit_last_full(stream, before=step)
        unit_state = state.unit_state(unit, stream)
        in_sync = (
            unit_state is not None
            and unit_state.state.last_full_step == previous
            and (decision.full or unit_state.state.has_difference)
        )
        record = state.generation.record(stream)
        self.num_calls += 1
        if in_sync and not decision.full:
            assert unit_state is not None
            coefficients = state.coefficients(unit_state.layout.device, decision)
            out = self._predict(unit_state, coefficients, args)
            self.num_cached_calls += 1
            if step not in record.cached_steps[-1:]:
                record.cached_steps.append(step)
            record.reasons.setdefault(step, decision.reason)
            return out
        outputs = list(self.fn(*args))
        values = [_dense(outputs[i]) for i in self.outputs.predicted]
        for i, value in zip(self.outputs.predicted, values, strict=True):
            outputs[i] = value
        if unit_state is None:
            unit_state = state.new_unit_state(unit, stream, self.label, values)
        if in_sync:
            coefficients, reason = state.coefficients(unit_state.layout.device, decision), decision.reason
        else:
            coefficients, reason = state.outside_schedule(unit_state, step)
        buffers = unit_state.state
        if buffers.last_full_step is None:
            buffers.zero_()  # a unit's first step: nothing it holds is read as history
        self._update(unit_state, values, coefficients)
        buffers.has_difference = buffers.last_full_step is not None
        buffers.last_full_step = step
        if in_sync:
            state.synced_full(stream, step, unit_state)
        self.num_full_calls += 1
        if step not in record.full_steps[-1:]:
            record.full_steps.append(step)
        record.reasons[step] = reason
        return outputs

    def _check_shapes(self, unit: _UnitState, values: Sequence[torch.Tensor]) -> None:
        expected = [(p.shape, p.dtype) for p in unit.layout.points]
        got = [(tuple(v.shape), v.dtype) for v in values]
        if expected != got:
            raise RuntimeError(
                f"ScalingCache: the outputs of {self.label} changed from {expected} to {got} within one generation; "
                "one generation runs at one size."
            )

    def _update(self, unit: _UnitState, values: Sequence[torch.Tensor], coefficients: StepCoefficients) -> None:
        """The full step's cache update of every output (the whole-model full branch, SPEC §1):
        statistics of the change, ``dy ← (y − y_full)·refresh``, ``y_full ← y``."""
        self._check_shapes(unit, values)
        state = unit.state
        coef, refresh = coefficients.values[0, 0], coefficients.values[1, 0]
        for index, value in enumerate(values):
            y_full, dy = state.y_full(index), state.dy(index)
            value32, y_full32 = value.float(), y_full.float()
            previous = y_full32 + dy.float() * coef
            new_dy = (value32 - y_full32) * refresh
            row = stats_row(
                change_l1=(value32 - previous).abs().sum(),
                prev_l1=previous.abs().sum(),
                next_change_l1=new_dy.abs().sum(),
                value_l1=value32.abs().sum(),
            )
            torch.stack(row, out=state.stats[index])  # type: ignore[arg-type]
            dy.copy_(new_dy)
            y_full.copy_(value)

    def _predict(self, unit: _UnitState, coefficients: StepCoefficients, args: tuple[Any, ...]) -> list[Any]:
        """Every output as ``y_full + c·dy`` (inputs passed through as they are); the graph does not run."""
        state = unit.state
        coef = coefficients.values[0, 0]
        outputs: list[Any] = [None] * self.outputs.num_outputs
        for index, (position, point) in enumerate(zip(self.outputs.predicted, unit.layout.points, strict=True)):
            predicted = torch.addcmul(state.y_full(index), state.dy(index), coef)
            outputs[position] = predicted if predicted.dtype == point.dtype else predicted.to(point.dtype)
        for position, input_index in self.outputs.passthrough:
            outputs[position] = args[input_index]
        return outputs


class OutsideBlocksRuntime:
    """A graph outside the blocks of a model whose forward runs in Python (an embedder, the
    head, a hook): it runs as compiled at every step, full or cached."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.num_calls = 0

    def __call__(self, *args: Any) -> Any:
        self.num_calls += 1
        return self.fn(*args)
