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
  split at a break are two units; and with the graph itself: Dynamo may run one block's code with
  another graph at a later step (a graph cut at a call whose callee breaks does not guard on the
  callee, so it also serves the blocks compiled whole before it), and a graph's buffers hold
  exactly its own outputs (the block's new graph starts its buffers with a full step);
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
import itertools
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from sc_compile.backends.integration import calling_module
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
from sc_compile.decision.decisions import Decisions
from sc_compile.decision.schedule import relative_change
from sc_compile.runtime.dispatcher import Dispatcher, Target, scheduler_sigma
from sc_compile.runtime.generations import (
    Generation,
    GenerationScope,
    ModuleSession,
    module_key,
    stream_name,
)
from sc_compile.runtime.protocol import Placement, StepCall, StepKind, StepState
from sc_compile.runtime.registry import REGISTRY
from sc_compile.runtime.state import StepCoefficients, StreamState

log = logging.getLogger("sc_compile.runtime")

__all__ = [
    "BLOCK_GRAPHS_TOKEN",
    "BlockGraphRuntime",
    "BlockGraphsState",
    "OutputPlan",
    "OutsideBlocksRuntime",
    "eager_update",
]

# The session token of per-block graphs: every graph of one model's blocks shares one session
# (regional compilation compiles each block with its own ``torch.compile`` call).
BLOCK_GRAPHS_TOKEN = ("per-block graphs",)

ALPHA_SOURCE = "α = 1 (per-block graphs: no calibrated table applies to them)"


def _model_of(anchor: torch.Tensor) -> torch.nn.Module | None:
    model = REGISTRY.model_of(anchor)
    if model is not None:
        return model
    # A model the graph was not compiled for (a copy of it): find it among the modules whose
    # forward runs in Python above this call.
    from sc_compile.backends.capture_check import running_models_holding

    for model in running_models_holding(anchor):
        REGISTRY.register_model(model)
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
    units: set[Hashable]


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

    The :class:`~sc_compile.runtime.protocol.StepState` of per-block graphs: it stands in the
    generation's ``layouts`` (and is its ``leader``), so the dispatcher, the report and the end
    of the generation treat it as any layout."""

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
        self._layout = _CountedLayout(self)
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
        # (unit, stream) -> the unit's buffers in the stream; a unit is (block parameter id, code id, graph serial).
        self.units: dict[tuple[Hashable, int], _UnitState] = {}
        self.unit_points: dict[Hashable, int] = {}
        # stream -> (full step, the units that ran it in sync, in call order)
        self._synced: dict[int, tuple[int, list[_UnitState]]] = {}
        self._coefficients: dict[tuple[str, str], StepCoefficients] = {}

    @property
    def layout(self) -> _CountedLayout:
        return self._layout

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
        generation.layouts[cls.KEY] = state
        generation.leader = state
        return state

    # -- placement -----------------------------------------------------------------------------
    def place(self, unit: Hashable, scope: GenerationScope, key: Any) -> _Forward:
        """The forward this call of ``unit`` belongs to (a new one where it starts one). A forward is
        told by the blocks and code that ran in it, whichever graph ran them."""
        name = stream_name(key)
        unit = _block_call(unit)
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

    # -- the StepState protocol ----------------------------------------------------------------
    def buffers(self, stream: int, unit: Hashable) -> StreamState | None:
        unit_state = self.units.get((unit, stream))
        return unit_state.state if unit_state is not None else None

    def coefficients(self, stream: int, kind: StepKind, device: torch.device) -> StepCoefficients:
        """The step's coefficient c and refresh on ``device``: the decision's (written once per
        decision), or those of a full step outside the schedule (refresh 1 right after the unit's
        own last full step, 0 at its first)."""
        name = kind if isinstance(kind, str) else "decision"
        buffers = self._coefficients.get((str(device), name))
        if buffers is None:
            buffers = self._coefficients[(str(device), name)] = StepCoefficients(1, device)
            if isinstance(kind, str):
                buffers.write([0.0], [1.0 if kind == "next" else 0.0], kind)
        if not isinstance(kind, str):
            buffers.write(kind.coef, kind.refresh, kind)
        return buffers

    def synced_full(self, stream: int, step: int, unit: Hashable) -> None:
        """``unit`` ran the unit's full ``step`` with the step's coefficients: its statistics count."""
        entry = self._synced.get(stream)
        if entry is None or entry[0] != step:
            entry = self._synced[stream] = (step, [])
            self.decisions.synced_full(stream)
        entry[1].append(self.units[(unit, stream)])

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
            change = sum(relative_change(r[CHANGE_L1], r[PREV_L1]) for r in rows) / len(rows)
            following = sum(relative_change(r[NEXT_CHANGE_L1], r[VALUE_L1]) for r in rows) / len(rows)
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
    def new_unit_state(self, unit: Hashable, stream: int, label: str, outputs: Sequence[torch.Tensor]) -> StreamState:
        """Zeroed buffers for ``unit`` in ``stream``, shaped after its outputs at its first full step."""
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
            self.generation.check_fits(
                layout,
                f"{label} (stream {stream}) of this generation",
                streams=1,
                own_bytes=0,
                note="With per-block graphs every output of every block graph keeps two full buffers per stream; "
                "compiling the whole model as one graph keeps them only for the last block's output.",
            )
        state = pool.take(key, layout, cache_dtype)
        state.zero_()  # the unit's first step: nothing it holds is read as history
        self.units[(unit, stream)] = _UnitState(key, layout, state)
        self.unit_points[_block_call(unit)] = len(points)  # the block's graph that ran last
        return state

    def unit_layout(self, unit: Hashable, stream: int) -> PointLayout:
        return self.units[(unit, stream)].layout

    @property
    def nbytes(self) -> int:
        return sum(u.state.nbytes for u in self.units.values())

    def release(self) -> list[tuple[tuple[object, ...], StreamState]]:
        """Give up every unit's buffers (the generation has finished): they go to the session's pool."""
        returned = [(unit.key, unit.state) for unit in self.units.values()]
        self.units.clear()
        self._synced.clear()
        return returned


_RUNTIME_DIR = os.path.dirname(__file__)
# A serial number per per-block graph (never reused, unlike an object's id): the graph in a unit.
_GRAPH_SERIAL = itertools.count()


def _block_call(unit: Hashable) -> Hashable:
    """The block and code of a unit (block parameter id, code id, graph serial), without the graph."""
    assert isinstance(unit, tuple)
    return unit[:2]


def _dense(value: torch.Tensor) -> torch.Tensor:
    """``value`` with the strides of a fresh contiguous tensor, as a prediction has. Dynamo guards
    on exact strides (a slice of a wider tensor with a batch of one is "contiguous" but has other
    strides), so a consumer graph would otherwise be recompiled between full and cached steps."""
    if value.stride() == torch.empty(value.shape, device="meta").stride():
        return value
    return value.clone(memory_format=torch.contiguous_format)


def eager_update(
    y_full: torch.Tensor,
    dy: torch.Tensor,
    stats: torch.Tensor,
    value: torch.Tensor,
    coef: torch.Tensor,
    refresh: torch.Tensor,
) -> None:
    """The full step's cache update of one output, eagerly (the full branch of the pass's cache
    update, ``passes/insert_cache_conds.py``; SPEC §1): the statistics row of the change,
    ``dy ← (y − y_full)·refresh``, ``y_full ← y``."""
    value32, y_full32 = value.float(), y_full.float()
    previous = y_full32 + dy.float() * coef
    new_dy = (value32 - y_full32) * refresh
    row = stats_row(
        change_l1=(value32 - previous).abs().sum(),
        prev_l1=previous.abs().sum(),
        next_change_l1=new_dy.abs().sum(),
        value_l1=value32.abs().sum(),
    )
    torch.stack(row, out=stats)  # type: ignore[arg-type]
    dy.copy_(new_dy)
    y_full.copy_(value)


class BlockGraphRuntime(Dispatcher):
    """Runs one per-block graph: in full (with the eager cache update) or as the eager prediction
    of its outputs (the :class:`~sc_compile.runtime.protocol.StepRunner` of per-block graphs)."""

    UPDATES = "in place"
    NOUN = "unit"

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
        super().__init__(type(model).__name__, config, compile_token)
        self.fn = fn
        self.label = label
        self.where = where
        self.code_id = id(code)
        self._code = code  # keeps the id unique
        self.identity_index = identity_index
        self.graph_serial = next(_GRAPH_SERIAL)
        self.outputs = outputs
        REGISTRY.register_model(model)

    # -- what the call is ----------------------------------------------------------------------
    def _anchor(self, args: tuple[Any, ...]) -> torch.Tensor:
        threads = REGISTRY.threads
        if self.identity_index is not None:
            anchor = args[self.identity_index]
            threads.anchor = anchor
            return anchor
        # A graph that takes no parameter: a module method compiled whole (its parameters are in
        # submodules called in Python) runs in a frame whose ``self`` is the module; a resume
        # function has no ``self`` (the part of a block after a break inside it).
        owner = calling_module(_RUNTIME_DIR)
        found = next(owner.parameters(), None) if owner is not None else None
        if found is not None:
            threads.anchor = found
            return found
        last = threads.anchor
        if last is None:
            raise ClockError(
                f"ScalingCache: the graph of {self.label} ({self.where}) takes no parameter of its block and no "
                "block ran before it in this thread, so the block it belongs to is unknown. Run it inside the "
                f"forward of {self.model_class}, or remove the graph break inside the block."
            )
        return last

    def target(self, args: tuple[Any, ...]) -> Target:
        anchor = self._anchor(args)
        model = _model_of(anchor)
        if model is None:
            raise ClockError(
                f"ScalingCache: {self.label} ({self.where}) was called outside the forward of a model that holds "
                "it, so no generation can place it. Call the model, or compile the whole model with "
                "torch.compile(model, backend='scalingcache')."
            )
        return Target(module_key(model), type(model).__name__, (id(anchor), self.code_id, self.graph_serial))

    def session_token(self) -> Any:
        return BLOCK_GRAPHS_TOKEN

    def new_session(self, session: ModuleSession, target: Target) -> None:
        session.warn_once(
            "per-block-alpha",
            "ScalingCache: Dynamo compiles the blocks of %s one by one (%s); they are cached with α = 1 (no "
            "calibrated table applies to per-block graphs) and every block output keeps two full buffers per "
            "stream.",
            target.name,
            self.where,
        )

    def run_ambient(self, session: ModuleSession, target: Target, args: tuple[Any, ...]) -> Any:
        raise ClockError(
            f"ScalingCache: Dynamo compiles the blocks of {target.name} one by one ({self.where}), and "
            "these graphs see no timestep, so the steps of a generation cannot be told apart from the calls. "
            "Place them explicitly: `sc_compile.enable(pipe)` (steps from the pipeline's scheduler) or "
            "`with sc_compile.generation(transformer, num_inference_steps=N):` around each generation (one "
            "forward per step). Or remove the graph break so that Dynamo compiles the whole forward."
        )

    def run_uncached(self, args: tuple[Any, ...]) -> Any:
        return self.fn(*args)

    def step_state(self, generation: Generation) -> StepState:
        return BlockGraphsState.of(generation, generation.session.config, self.where)

    def place(
        self, state: StepState, generation: Generation, scope: GenerationScope, target: Target, args: tuple[Any, ...]
    ) -> Placement:
        assert isinstance(state, BlockGraphsState)
        forward = state.place(target.unit, scope, target.key)
        sigma = scheduler_sigma(scope.pipeline.scheduler, forward.step) if scope.pipeline is not None else lambda: None
        # The forward counted the model's call when it started.
        return Placement(forward.step, forward.stream, lambda: None, sigma, counts_call=False)

    # -- how a step runs -----------------------------------------------------------------------
    def run_full(self, call: StepCall, args: tuple[Any, ...]) -> tuple[Any, StreamState]:
        """The graph, then the eager cache update of each predicted output."""
        outputs = list(self.fn(*args))
        values = [_dense(outputs[i]) for i in self.outputs.predicted]
        for i, value in zip(self.outputs.predicted, values, strict=True):
            outputs[i] = value
        state = call.state
        assert isinstance(state, BlockGraphsState)
        buffers = call.buffers
        if buffers is None:
            buffers = state.new_unit_state(call.unit, call.stream, self.label, values)
        layout = state.unit_layout(call.unit, call.stream)
        self._check_shapes(layout, values)
        coefficients = call.coefficients(layout.device)
        coef, refresh = coefficients.values[0, 0], coefficients.values[1, 0]
        for index, value in enumerate(values):
            eager_update(buffers.y_full(index), buffers.dy(index), buffers.stats[index], value, coef, refresh)
        return outputs, buffers

    def run_cached(self, call: StepCall, args: tuple[Any, ...]) -> list[Any]:
        """Every output as ``y_full + c·dy`` (inputs passed through as they are); the graph does not run."""
        state, buffers = call.state, call.buffers
        assert isinstance(state, BlockGraphsState) and buffers is not None
        layout = state.unit_layout(call.unit, call.stream)
        coef = call.coefficients(layout.device).values[0, 0]
        outputs: list[Any] = [None] * self.outputs.num_outputs
        for index, (position, point) in enumerate(zip(self.outputs.predicted, layout.points, strict=True)):
            predicted = torch.addcmul(buffers.y_full(index), buffers.dy(index), coef)
            outputs[position] = predicted if predicted.dtype == point.dtype else predicted.to(point.dtype)
        for position, input_index in self.outputs.passthrough:
            outputs[position] = args[input_index]
        return outputs

    def _check_shapes(self, layout: PointLayout, values: Sequence[torch.Tensor]) -> None:
        expected = [(p.shape, p.dtype) for p in layout.points]
        got = [(tuple(v.shape), v.dtype) for v in values]
        if expected != got:
            raise RuntimeError(
                f"ScalingCache: the outputs of {self.label} changed from {expected} to {got} within one generation; "
                "one generation runs at one size."
            )


class OutsideBlocksRuntime:
    """A graph outside the blocks of a model whose forward runs in Python (an embedder, the
    head, a hook): it runs as compiled at every step, full or cached."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.num_calls = 0

    def __call__(self, *args: Any) -> Any:
        self.num_calls += 1
        return self.fn(*args)
