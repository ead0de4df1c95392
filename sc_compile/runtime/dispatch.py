"""The ScalingCache runtime of whole-model graphs: dispatch of each call of a compiled graph.

The dispatch itself is the one dispatcher of every graph kind (``dispatcher.py``); this module
says what is particular to whole-model graphs (and the pieces of a split forward): how a call is
placed by its timestep or joins its forward, and that a step runs the compiled full-step or
cached-step graph.

Dynamo calls the runtime with the traced graph's inputs. Per call the runtime finds the module's
session (by the module's first parameter, an input of the graph) and the generation the call
belongs to (an explicit scope in this thread, or the session's ambient generation), asks the
generation's clock for the step and stream (``clock.py``), asks the decision seam for the step's
decision (``decisions.py``), and runs the compiled full-step or cached-step graph with the stream's
state (``state.py``). A stream is predicted only from buffers it wrote at the step the prediction
starts from; otherwise it runs in full.

A model whose forward Dynamo split at graph breaks runs as several graphs, each with a runtime
(``piece``): a piece that starts the forward places the call; a piece that resumes it after a break
joins that placement (the last one made in this thread for the same ``torch.compile``), so every
graph of one forward runs in the same step and stream. All pieces of a generation take the step's
full-or-cached verdict of one *leader* (``Generation.leader``): the piece with blocks that runs last
in the forward, whose block outputs feed the model output. Pieces without blocks run as they are
(:class:`GraphPieceRuntime`).

Host reads: the pipeline clock reads nothing; the timestep clock reads the timestep once per call
until a loop's pattern is known, then once per generation (its first call), its other calls' timesteps
copied without a wait and compared after each full step (``clock/loop.py``);
the decision after a full step reads that step's statistics once. A cached step placed by the
pipeline clock reads nothing and allocates nothing (its coefficients are written into
preallocated buffers).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sc_compile.calibration.table import AlphaTable
from sc_compile.clock.loop import LoopCheck, LoopPattern, caller_frames
from sc_compile.clock.step_clock import EXPLICIT_SOURCES, ClockError, NewGeneration
from sc_compile.config import ScalingCacheConfig
from sc_compile.contract import step_inputs
from sc_compile.errors import BatchTimestepError, GradEnabledError, StochasticSamplerError, UncacheableSplitError
from sc_compile.reporting.report import GenerationReport
from sc_compile.runtime.dispatcher import (
    Dispatcher,
    Target,
    scheduler_sigma,
)
from sc_compile.runtime.generations import (
    Generation,
    GenerationScope,
    LayoutState,
    ModuleSession,
    module_key,
    sessions_of,
    stream_name,
)
from sc_compile.runtime.protocol import Placement, StepCall, StepState
from sc_compile.runtime.registry import REGISTRY, held_weakly
from sc_compile.runtime.state import PointLayout, StepCoefficients, StreamState

if TYPE_CHECKING:
    from sc_compile.backends.capture_check import GraphPiece

log = logging.getLogger(__name__)

__all__ = [
    "BatchTimestepError",
    "ClockError",
    "CompiledStep",
    "GradEnabledError",
    "GraphPieceRuntime",
    "Placement",
    "PointLayout",
    "ScalingCacheRuntime",
    "StochasticSamplerError",
    "StreamState",
    "latest_runtime",
    "runtimes_of",
]


@dataclasses.dataclass
class _Forward:
    """The placement of the forward running in this thread (for the pieces that resume it)."""

    session: ModuleSession | None  # None: no piece with blocks has run in it yet
    generation: Generation | None  # None: the forward runs uncached (or is not placed yet)
    placement: Placement | None  # None: not placed yet (its first pieces hold no block)
    # The pieces that ran in it, by piece key (a recompiled or re-guarded runtime of the same
    # piece has the same key: it starts a new forward rather than following this one).
    ran: set[tuple[bool, str]]


def piece_key(piece: GraphPiece) -> tuple[bool, str]:
    """What a piece of a split forward is, across recompilations: whether it resumes the forward,
    and the break it starts or resumes at."""
    return (piece.resumes, piece.where)


def open_forward(token: object, piece: GraphPiece) -> None:
    """A piece that starts the forward and holds no block ran: the forward's pieces after it
    are placed by the first of them that holds blocks (never by an earlier forward's placement)."""
    REGISTRY.threads.forwards.set(token, _Forward(None, None, None, {piece_key(piece)}))


def _forward_of(token: object) -> _Forward | None:
    """The forward of a split model running in this thread under the ``torch.compile`` call ``token``."""
    return REGISTRY.threads.forwards.get(token)


class _NoModule:
    """The key of a graph compiled without a module (a graph rebuilt outside Dynamo)."""


@dataclasses.dataclass
class CompiledStep:
    """One specialised graph, compiled, and the cond-graph inputs it takes."""

    fn: Callable[..., Any]
    input_indices: list[int]
    num_compute_nodes: int
    compile_seconds: float


@dataclasses.dataclass
class _Uncached:
    """Scratch state for calls outside any generation (``sc_compile.uncached``)."""

    state: StreamState
    coefficients: StepCoefficients


class ScalingCacheRuntime(Dispatcher):
    """Dispatches each call of one compiled graph to its full-step or cached-step graph (the
    :class:`~sc_compile.runtime.protocol.StepRunner` of whole-model graphs and the pieces of a
    split forward)."""

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
        timestep_index: int | None,
        identity_index: int | None = None,
        module: torch.nn.Module | None = None,
        compile_token: Any = None,
        fingerprint: str = "",
        granularity: str = "block",
        process_group: Any = None,
        calibration_hook: Callable[[ScalingCacheRuntime, int, int, StreamState], None] | None = None,
        piece: GraphPiece | None = None,
    ):
        super().__init__(model_class, config, compile_token)
        self.fingerprint = fingerprint
        self.granularity = granularity
        # Context parallelism: the group whose ranks each hold a sequence shard of every hidden
        # state. The statistics are sums over elements, so one all-reduce (sum) of the table per
        # full step gives every rank the global values, hence the same decisions.
        self.process_group = process_group
        self.world_size = 1 if process_group is None else torch.distributed.get_world_size(process_group)
        self.layout = layout
        self.full_step = full_step
        self.cached_step = cached_step
        self.alpha = alpha
        self.alpha_source = alpha_source
        self.timestep_index = timestep_index
        # The graph input that is the module's first parameter: it names the module a call runs.
        self.identity_index = identity_index
        self.num_points = layout.num_points
        self.calibration_hook = calibration_hook
        # A piece of a forward Dynamo split at a graph break (None: the whole forward).
        self.piece = piece
        self._fixed_key = module_key(module) if module is not None else _NoModule()
        self._last_session: ModuleSession | None = None
        self._uncached: _Uncached | None = None
        self._uncached_lock = threading.Lock()
        if module is not None:
            self.session_of(Target(self._fixed_key, self.model_class))
        if piece is not None:
            REGISTRY.note_cached_compile(compile_token)

    # -- what the call is ----------------------------------------------------------------------
    def target(self, args: tuple[Any, ...]) -> Target:
        key = args[self.identity_index] if self.identity_index is not None else self._fixed_key
        return Target(key, self.model_class)

    def session_token(self) -> Any:
        return self.compile_token

    def session_of(self, target: Target) -> ModuleSession:
        session = super().session_of(target)
        self._last_session = session
        return session

    @property
    def session(self) -> ModuleSession:
        return self._last_session or self.session_of(Target(self._fixed_key, self.model_class))

    def __call__(self, *args: Any) -> Any:
        self.refuse_grad()
        if self.piece is not None and self.piece.resumes:
            forward = _forward_of(self.compile_token)
            if forward is not None and forward.session is not None and piece_key(self.piece) not in forward.ran:
                return self._follow(forward, args)
        return self.dispatch(args)

    def step_state(self, generation: Generation) -> StepState:
        return generation.layout_state(self)

    def leader(self, generation: Generation, state: StepState) -> StepState:
        # Only the pieces of a split forward follow another graph's verdict; graphs of a whole
        # forward (several sizes or guard variants in one generation) each decide for themselves.
        leader = generation.leader if self.piece is not None else None
        return state if leader is None else leader

    def after_synced_full(self, step: int, stream: int, buffers: StreamState) -> None:
        if self.calibration_hook is not None:
            self.calibration_hook(self, step, stream, buffers)

    # -- how a step runs -----------------------------------------------------------------------
    def run_full(self, call: StepCall, args: tuple[Any, ...]) -> tuple[Any, StreamState]:
        assert call.buffers is not None
        return self._run(self.full_step, call, args), call.buffers

    def run_cached(self, call: StepCall, args: tuple[Any, ...]) -> Any:
        return self._run(self.cached_step, call, args)

    def _run(self, compiled: CompiledStep, call: StepCall, args: tuple[Any, ...]) -> Any:
        state = call.buffers
        assert state is not None
        coefficients = call.coefficients(self.layout.device)
        inputs = step_inputs(
            args, state.buffers, coefficients.coef, coefficients.refresh, state.stats, coefficients.coef2
        )
        return compiled.fn(*[inputs[i] for i in compiled.input_indices])

    # -- pieces of a split forward -------------------------------------------------------------
    def _start_forward(
        self, session: ModuleSession, generation: Generation | None, placement: Placement | None
    ) -> None:
        if self.piece is not None:
            forward = _forward_of(self.compile_token)
            # Pieces without blocks that started this forward stay in it (they ran in this call).
            before = forward.ran if forward is not None and forward.session is None else set()
            REGISTRY.threads.forwards.set(
                self.compile_token, _Forward(session, generation, placement, before | {piece_key(self.piece)})
            )

    def _follow(self, forward: _Forward, args: tuple[Any, ...]) -> Any:
        """A piece after a break: run in the step and stream its forward's first piece was placed in."""
        assert self.piece is not None and forward.session is not None
        forward.ran.add(piece_key(self.piece))
        self._last_session = forward.session
        self.session_of(Target(forward.session.key_ref(), self.model_class))
        if forward.generation is None or forward.placement is None:
            return self._scratch(args)
        generation = forward.generation
        if generation.finished:
            raise ClockError(
                f"ScalingCache: a piece of {self.model_class} after a "
                f"{self.piece.where if self.piece else 'graph break'} "
                "ran after its generation ended; run the whole forward inside one generation."
            )
        with generation.lock:
            return self.run_step(generation, generation.layout_state(self), forward.placement, (), args)

    # -- placement -----------------------------------------------------------------------------
    def _timestep_values(
        self, args: tuple[Any, ...], generation: Generation | None = None
    ) -> tuple[tuple[float, ...], torch.dtype]:
        """The timestep input's values: one device→host read (under the pipeline clock, ``generation``
        brings the scheduler's sigmas over in the same read)."""
        if self.timestep_index is None:
            where = self.piece.where if self.piece is not None else "a graph break"
            raise ClockError(
                f"ScalingCache: Dynamo split {self.model_class} at a {where}, and the first graph of the forward "
                "that holds blocks does not receive the timestep, so this call cannot be placed in a step by it. "
                f"Place the steps explicitly with `sc_compile.enable(pipe)` (steps from the pipeline's scheduler) "
                "or `with sc_compile.generation(transformer, num_inference_steps=N):` around each generation (one "
                "forward per step), or move the break after the first block (the timestep embedding then runs in "
                "the same graph as the blocks)."
            )
        timestep = args[self.timestep_index]
        if not isinstance(timestep, torch.Tensor):
            return (float(timestep),), torch.float64
        if generation is not None:
            values = generation.read_timestep(timestep)
        else:
            values = tuple(timestep.detach().reshape(-1).tolist())
        self._check_samples(timestep, values)
        return values, timestep.dtype

    def _check_samples(self, timestep: torch.Tensor, values: tuple[float, ...]) -> None:
        """Refuse a batch whose samples are at different timesteps (dim 0 is the batch)."""
        if timestep.ndim == 0 or timestep.shape[0] <= 1:
            return
        width = len(values) // timestep.shape[0]
        first = values[:width]
        for index in range(1, timestep.shape[0]):
            if values[index * width : (index + 1) * width] != first:
                row = values[index * width : index * width + min(width, 4)]
                raise BatchTimestepError(
                    f"ScalingCache: the samples of this batch are at different timesteps (sample 0: "
                    f"{list(first[:4])}, sample {index}: {list(row)}). A compiled call takes one step decision "
                    "and one set of cached states for the whole batch, so the samples must share one schedule: "
                    "batch only samples at the same step, or run each schedule in its own call."
                )

    def place(
        self, state: StepState, generation: Generation, scope: GenerationScope, target: Target, args: tuple[Any, ...]
    ) -> Placement:
        placement = self._place_in_scope(generation, scope, target.key, args)
        self._start_forward(generation.session, generation, placement)
        return placement

    def _place_in_scope(
        self, generation: Generation, scope: GenerationScope, key: Any, args: tuple[Any, ...]
    ) -> Placement:
        if scope.pipeline is not None:
            read: list[float] = []

            step, stream = generation.clock.place_in_pipeline_step(scope.pipeline.steps_taken, stream_name(key))

            def timestep() -> float | None:
                if not read:
                    values, _ = self._timestep_values(args, generation)
                    read.append(_mean(values))
                    generation.clock.record_timestep(step, read[0])
                return read[0]

            if self.timestep_index is None:
                # A piece without the timestep (split forward): the pipeline places it; nothing to read.
                return Placement(step, stream, lambda: None, scheduler_sigma(scope.pipeline.scheduler, step))
            if not generation.checked_samples or self.calibration_hook is not None:
                # The one read of the generation's first (full) step: the batch check. Calibration
                # (every step full, not a hot path) records every step's timestep.
                generation.checked_samples = True
                timestep()
            return Placement(step, stream, timestep, scheduler_sigma(scope.pipeline.scheduler, step))
        if self.timestep_index is None and generation.num_steps is not None:
            # A piece without the timestep (split forward) in a context that declared its step
            # count: each forward is the next step, as for per-block graphs (guidance run as
            # separate calls is refused once the forwards outnumber the declared steps).
            step, stream = generation.clock.place_next_forward(stream_name(key))
            return Placement(step, stream, lambda: None)
        session = generation.session
        if generation.loop is not None:
            placement = self._place_counted(session, generation, key, args, frames=False)
            if placement is not None:
                return placement
        values, dtype = self._timestep_values(args)
        name = stream_name(key)
        pattern = session.context_pattern if session.context_pattern_repeated else None
        timestep = args[self.timestep_index]  # type: ignore[index]
        if (
            generation.clock.step < 0
            and pattern is not None
            and isinstance(timestep, torch.Tensor)
            and pattern.starts(name, values, dtype)
            and generation.num_steps in (None, pattern.calls[-1][0] + 1)
        ):
            # The context's generations repeat a pattern: its calls after the first are placed by count.
            loop = LoopCheck(pattern, timestep.device, (0, name, values), [])
            generation.count_by(loop)
            return _first_counted(generation, loop)
        try:
            step, stream = generation.clock.place_by_timestep(values, name, dtype)
        except NewGeneration:
            raise ClockError(
                f"ScalingCache: inside one `sc_compile.generation`, the timestep went back to an earlier step's "
                f"value ({_mean(values):.6g}): that is a second generation (or a call outside the denoising "
                "loop). Open one context per generation; run side calls such as previews inside "
                "`with sc_compile.uncached(transformer):`."
            ) from None
        generation.placed_calls.append((step, name, values))
        mean = _mean(values)
        return Placement(step, stream, lambda: mean)

    def run_ambient(self, session: ModuleSession, target: Target, args: tuple[Any, ...]) -> Any:
        with session.lock:
            generation, placement = self._place_ambient(session, target.key, args)
            self._start_forward(session, generation, placement)
            return self.run_step(generation, generation.layout_state(self), placement, (), args)

    def run_step(
        self, generation: Generation, state: StepState, placement: Placement, unit: Any, args: tuple[Any, ...]
    ) -> Any:
        full_calls = self.num_full_calls
        out = super().run_step(generation, state, placement, unit, args)
        loop = generation.loop
        if loop is not None and placement is loop.current:
            loop.ran(self.num_full_calls > full_calls)  # the call the count placed (not a later piece of it)
        return out

    def _place_counted(
        self, session: ModuleSession, generation: Generation, key: Any, args: tuple[Any, ...], frames: bool = True
    ) -> Placement | None:
        """A call of a generation that repeats its loop's pattern (``clock/loop.py``): placed by its
        position, its timestep copied without a wait; after a full step, the copies so far compared
        with the pattern. None: the generation ended (the call is not the pattern's)."""
        check = generation.loop
        assert check is not None and self.timestep_index is not None
        if check.due and not session.check_loop(generation, placing=True):
            return None
        if generation.loop is None:
            return None  # the generation goes on placed by the timestep
        found = stream_name(key)
        differs = self._not_the_patterns(check, found, args, frames)
        if differs is not None:
            # Not the pattern's call: what ran before it is compared first (a difference there is the
            # earlier one); where that matched, the generation goes on placed by the timestep, which
            # places this call (a new generation where its timestep says so).
            if session.check_loop(generation, placing=True) and generation.loop is not None:
                session.leave_loop(
                    generation,
                    f"placed by count up to call {check.position - 1}, then by the timestep: call {check.position} "
                    f"was not the pattern's: {differs}",
                )
                log.info("ScalingCache: %s: %s.", self.model_class, generation.clock_note)
            return None
        step, name, values = check.pattern.calls[check.position - 1]
        step, stream = generation.clock.place_counted(step, name, values)
        return _counted(check, step, stream, _mean(values))

    def _not_the_patterns(self, check: LoopCheck, found: str | None, args: tuple[Any, ...], frames: bool) -> str | None:
        """What makes a call not the next of the pattern (known without its timestep's values), else
        None, and its timestep is copied."""
        if check.complete:
            return f"the pattern has {len(check.pattern)} calls"
        step, name, _ = check.expected()
        if found != name:
            return f"its stream is {found!r}, where the pattern's is {name!r}"
        if frames and not check.in_loop(caller_frames(), step):
            return (
                "it was called from outside the loop that made the generation's first calls (a new generation: "
                "the previous one was interrupted)"
            )
        assert self.timestep_index is not None
        return check.copy(args[self.timestep_index])

    def _start_counted(
        self,
        session: ModuleSession,
        old: Generation,
        pattern: LoopPattern,
        name: str | None,
        values: tuple[float, ...],
        device: torch.device,
    ) -> tuple[Generation, Placement]:
        """The first call of a generation that starts its loop's pattern again (read): the generation
        whose other calls are placed by count."""
        loop = LoopCheck(pattern, device, (0, name, values), caller_frames(), old.loop)
        generation = session.restart_ambient(old, loop)
        return generation, _first_counted(generation, loop)

    def _place_ambient(self, session: ModuleSession, key: Any, args: tuple[Any, ...]) -> tuple[Generation, Placement]:
        generation = session.ambient  # this thread's
        if generation is not None and generation.loop is not None and not generation.loop.complete:
            placement = self._place_counted(session, generation, key, args)
            if placement is not None:
                return generation, placement
        values, dtype = self._timestep_values(args)
        generation = session.ambient
        if generation is not None and generation.loop is not None:
            session.check_loop(generation)  # the counted calls not compared yet
            generation = session.ambient  # None where that ended it
        if generation is None:
            session.refuse_continuing_another_thread(values)
            generation = session.generation_for(None)
            if generation.source == "timestep" and not generation.num_calls:
                # A caveat, not a detected failure (the README says the same): logged at INFO.
                session.info_once(
                    "timestep-clock",
                    "ScalingCache: %s places calls by their timestep (no generation context). It cannot tell "
                    "an interrupted generation from the next one that continues its schedule, nor a side call "
                    "from a step; for exact boundaries %s.",
                    self.model_class,
                    EXPLICIT_SOURCES,
                )
        name = stream_name(key)
        timestep = args[self.timestep_index]  # type: ignore[index]
        if generation.loop is not None:
            # The counted generation placed all its pattern's calls: a call that starts the pattern
            # again starts the next generation; any other is placed by the timestep from here on.
            repeated = generation.loop.pattern
            if repeated.starts(name, values, dtype) and timestep.device == generation.loop.device:
                session.refuse_continuing_another_thread(values)
                return self._start_counted(session, generation, repeated, name, values, timestep.device)
            session.leave_loop(
                generation, f"placed by count for the pattern's {len(repeated)} calls, then by the timestep"
            )
        try:
            step, stream = generation.clock.place_by_timestep(values, name, dtype)
        except NewGeneration:
            session.refuse_continuing_another_thread(values)
            # A loop repeats itself: where the generation that ended made the calls the one before it
            # made, and the new one starts as they did, its calls are placed by count (``clock/loop.py``).
            pattern = LoopPattern.learn(generation.placed_calls, dtype) if isinstance(timestep, torch.Tensor) else None
            if (
                pattern is not None
                and pattern.repeats(generation.previous_pattern)
                and pattern.starts(name, values, dtype)
            ):
                return self._start_counted(session, generation, pattern, name, values, timestep.device)
            else:
                generation = session.restart_ambient(generation)
                generation.previous_pattern = pattern
                step, stream = generation.clock.place_by_timestep(values, name, dtype)
        if generation.loop is None:
            generation.placed_calls.append((step, name, values))
        mean = _mean(values)
        return generation, Placement(step, stream, lambda: mean)

    # -- calls outside any generation ----------------------------------------------------------
    def run_uncached(self, args: tuple[Any, ...]) -> Any:
        if self._last_session is not None:
            self._start_forward(self._last_session, None, None)
        return self._scratch(args)

    def _scratch(self, args: tuple[Any, ...]) -> Any:
        with self._uncached_lock:
            if self._uncached is None:
                coefficients = StepCoefficients(self.num_points, self.layout.device, self.layout.second_order)
                coefficients.write([0.0] * self.num_points, [0.0] * self.num_points, "first")
                self._uncached = _Uncached(StreamState(self.layout, self.config.cache_dtype), coefficients)
            scratch = self._uncached
            scratch.state.zero_()
            state = scratch.state
            coefficients = scratch.coefficients
            inputs = step_inputs(
                args, state.buffers, coefficients.coef, coefficients.refresh, state.stats, coefficients.coef2
            )
            return self.full_step.fn(*[inputs[i] for i in self.full_step.input_indices])

    # -- what callers of the old per-graph runtime read ----------------------------------------
    @property
    def streams(self) -> list[StreamState]:
        """The stream states of this graph's layout in the session's current generation."""
        generation = self.session.last_generation
        if generation is None:
            return []
        layout_state = generation.layouts.get(self.layout.key(self.config.cache_dtype))
        if not isinstance(layout_state, LayoutState):
            return []
        return [s for s in layout_state.streams if s is not None]

    def report(self) -> GenerationReport:
        """The session's current generation's record (or its last finished one)."""
        return self.session.report()

    @property
    def timesteps(self) -> list[float]:
        """The timestep inputs of the current (or last) generation's steps."""
        generation = self.session.last_generation
        if generation is None:
            return []
        timesteps = []
        for step in range(generation.clock.step + 1):
            timestep = generation.timestep_of(step)
            if timestep is None:
                raise RuntimeError(
                    f"ScalingCache: the timestep of step {step} was not read (the pipeline clock reads none on "
                    "cached steps); it is recorded for every step only while calibrating."
                )
            timesteps.append(timestep)
        return timesteps

    def end_generation(self) -> None:
        """End the session's ambient (timestep-placed) generation: report it and free its state."""
        self.session.end_ambient()


class GraphPieceRuntime:
    """A piece of a split forward that holds no block (the output head after a break): it runs
    as compiled at every step. It refuses to run a second time when no piece of its
    ``torch.compile`` holds blocks: then nothing would ever be cached."""

    def __init__(self, fn: Callable[..., Any], *, piece: GraphPiece, compile_token: Any, refusal: str | None = None):
        self.fn = fn
        self.piece = piece
        # What to say when nothing of the compile holds blocks (default: the split forward's break).
        self.refusal = refusal
        # The torch.compile call that built it, held weakly (see registry.py).
        self._compile_token = held_weakly(compile_token)
        self.num_calls = 0

    def __call__(self, *args: Any) -> Any:
        self.num_calls += 1
        if not self.piece.resumes:
            open_forward(self._compile_token(), self.piece)
        if self.num_calls > 1 and not REGISTRY.compile_caches(self._compile_token()):
            raise UncacheableSplitError(
                self.refusal
                or f"ScalingCache: Dynamo split {type(self.piece.module).__name__}'s forward at a {self.piece.where}, "
                "and none of the graphs it compiled holds a transformer block, so nothing would be cached. "
                "Remove the break (torch.compile(model, backend='scalingcache', fullgraph=True) reports every "
                "break at its source), or pass options={'fallback': 'inductor'} to compile the model uncached."
            )
        return self.fn(*args)


def _first_counted(generation: Generation, loop: LoopCheck) -> Placement:
    """The placement of a counted generation's first call (read: ``loop.first``)."""
    _, name, values = loop.first
    step, stream = generation.clock.place_counted(0, name, values)
    return _counted(loop, step, stream, _mean(values))


def _counted(loop: LoopCheck, step: int, stream: int, timestep: float) -> Placement:
    """The placement of a call the count placed (at the pattern's timestep), noted in its check."""
    loop.placed.append((step, stream))
    loop.current = Placement(step, stream, lambda: timestep)
    return loop.current


def _mean(values: tuple[float, ...]) -> float:
    first = values[0]
    return first if all(v == first for v in values) else sum(values) / len(values)


def runtimes_of(model: torch.nn.Module) -> list[ScalingCacheRuntime]:
    return [r for session in sessions_of(model) for ref in session.runtimes if (r := ref()) is not None]


def latest_session(model: torch.nn.Module) -> ModuleSession:
    sessions = [s for s in sessions_of(model) if s.last_active]
    # A session that only ran calls outside any generation (a preview, a graph another compile
    # built and this one reuses) has nothing to report while another has.
    sessions = [s for s in sessions if s.last_generation is not None] or sessions
    if not sessions:
        name = type(getattr(model, "_orig_mod", model)).__name__
        raise RuntimeError(
            f"{name} has not run under backend='scalingcache' yet: compile it with "
            "torch.compile(model, backend='scalingcache') and call it (run a generation) first."
        )
    return max(sessions, key=lambda s: s.last_active)


def latest_runtime(model: torch.nn.Module) -> ScalingCacheRuntime:
    session = latest_session(model)
    runtimes = [r for ref in session.runtimes if (r := ref()) is not None]
    if not runtimes:
        raise RuntimeError("the compiled graphs of this model were freed")
    return max(runtimes, key=lambda r: r.num_calls)


def report(model: torch.nn.Module) -> GenerationReport:
    return latest_session(model).report()
