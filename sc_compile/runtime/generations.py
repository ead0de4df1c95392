"""State per generation, sessions per compiled module, and explicit generation scopes.

* A :class:`ModuleSession` belongs to one module and one ``torch.compile`` of it. Every graph Dynamo
  compiles for that pair (a recompile for ``inference_mode``, a new shape) shares it, so a
  recompile in the middle of a generation continues the generation. The module is identified by
  its first parameter, which the compiled graphs receive as an input: a ``copy.deepcopy`` of a
  compiled model reuses the graphs but gets its own session.
* A :class:`Generation` holds everything one generation writes: its clock, its stream buffers, its
  decisions and its record. Finishing it builds its report and hands its buffers back to the
  session's pool; nothing of it is read again.
* A :class:`GenerationScope` is an explicit generation (``sc_compile.generation`` or one pipeline
  call under ``sc_compile.enable``). Scopes live in a ``contextvars`` variable, so concurrent
  generations in separate threads (or tasks) each see their own and are isolated. Calls outside
  any scope go to the calling thread's *ambient* generation, placed by the timestep; a thread whose
  new generation's first timestep continues another thread's running one is refused.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
import weakref
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sc_compile.clock.loop import LoopCheck, LoopPattern, Mismatch, PlacedCall, replay
from sc_compile.clock.step_clock import ClockError, StepClock
from sc_compile.config import ALL_FULL_WARMUP, ScalingCacheConfig
from sc_compile.decision.decisions import Decisions
from sc_compile.memory import CacheMemoryError, format_bytes, graph_memory_bytes, new_stream_limit, refusal
from sc_compile.runtime.protocol import StepKind, StepState
from sc_compile.runtime.registry import REGISTRY, held_weakly
from sc_compile.runtime.state import PointLayout, StatePool, StepCoefficients, StreamState, state_zeros

if TYPE_CHECKING:
    from sc_compile.calibration.table import AlphaTable
    from sc_compile.reporting.report import GenerationReport

# The runtime's logger: what a generation did is logged under one name users filter on.
log = logging.getLogger("sc_compile.runtime")


def module_key(module: torch.nn.Module) -> Any:
    """What identifies ``module`` (compiled or not) across its compiled graphs: its first parameter."""
    module = getattr(module, "_orig_mod", module)
    first = next(module.parameters(), None)
    return module if first is None else first


# -- explicit scopes ---------------------------------------------------------------------------
@dataclasses.dataclass
class PipelineRun:
    """One pipeline call under the pipeline clock: the scheduler steps taken so far."""

    scheduler: Any
    steps_taken: int = 0
    num_steps: int | None = None
    stochastic: bool = False
    stochastic_checked: bool = False
    # Model calls (and scheduler steps) per denoising step: the scheduler's ``order``.
    order: int = 1
    # The scheduler steps already taken when a running pipeline call was adopted (the one line).
    adopted_at: int | None = None


@dataclasses.dataclass(eq=False)
class GenerationScope:
    """An explicit generation of one module: ``sc_compile.generation`` or a pipeline call."""

    key: Any
    num_inference_steps: int | None = None
    pipeline: PipelineRun | None = None
    stochastic_sampler: bool = False
    generations: dict[int, Generation] = dataclasses.field(default_factory=dict)

    def finish(self, error: BaseException | None) -> None:
        for generation in list(self.generations.values()):
            generation.session.finish(generation, interrupted=error is not None)
        self.generations.clear()


# Context variables: per thread and per asyncio task by design (``registry.py`` lists them with the
# cross-call state it owns). The open generation scopes:
_SCOPES: contextvars.ContextVar[tuple[GenerationScope, ...]] = contextvars.ContextVar("sc_compile_scopes", default=())
# Modules whose calls in this context run outside any generation (``sc_compile.uncached``).
_UNCACHED: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("sc_compile_uncached", default=())
# cache_context names set through the pipeline integration: (module key, name) pairs.
_STREAM_NAMES: contextvars.ContextVar[tuple[tuple[Any, str], ...]] = contextvars.ContextVar(
    "sc_compile_stream_names", default=()
)


def active_scope(key: Any) -> GenerationScope | None:
    for scope in reversed(_SCOPES.get()):
        if scope.key is key:
            return scope
    return None


def push_scope(scope: GenerationScope) -> contextvars.Token:
    """Open ``scope``. A pipeline call inside an explicit generation takes over its declarations."""
    outer = active_scope(scope.key)
    if outer is not None and scope.pipeline is not None and outer.pipeline is None:
        scope.num_inference_steps = scope.num_inference_steps or outer.num_inference_steps
        scope.stochastic_sampler = scope.stochastic_sampler or outer.stochastic_sampler
    elif outer is not None:
        raise ClockError(
            "ScalingCache: a generation of this model is already open in this thread; generations do not "
            "nest. Close the outer `sc_compile.generation` first (a pipeline call under "
            "`sc_compile.enable` opens its own)."
        )
    return _SCOPES.set((*_SCOPES.get(), scope))


def pop_scope(token: contextvars.Token) -> None:
    _SCOPES.reset(token)


def remove_scope(scope: GenerationScope) -> None:
    """Close ``scope`` wherever it sits (a scope opened inside a call already running, which no
    ``with`` block closes: the pipeline call adopted by the one line)."""
    _SCOPES.set(tuple(s for s in _SCOPES.get() if s is not scope))


def is_uncached(key: Any) -> bool:
    return any(k is key for k in _UNCACHED.get())


def push_uncached(key: Any) -> contextvars.Token:
    return _UNCACHED.set((*_UNCACHED.get(), key))


def pop_uncached(token: contextvars.Token) -> None:
    _UNCACHED.reset(token)


def stream_name(key: Any) -> str | None:
    for k, name in reversed(_STREAM_NAMES.get()):
        if k is key:
            return name
    return None


def push_stream_name(key: Any, name: str) -> contextvars.Token:
    return _STREAM_NAMES.set((*_STREAM_NAMES.get(), (key, name)))


def pop_stream_name(token: contextvars.Token) -> None:
    _STREAM_NAMES.reset(token)


# -- one generation ----------------------------------------------------------------------------
@dataclasses.dataclass
class StreamRecord:
    """What one stream actually ran, step by step."""

    full_steps: list[int] = dataclasses.field(default_factory=list)
    cached_steps: list[int] = dataclasses.field(default_factory=list)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)


class LayoutState:
    """A generation's state for one cache layout: stream buffers, decisions, fixed coefficients
    (the :class:`~sc_compile.runtime.protocol.StepState` of whole-graph runtimes)."""

    def __init__(
        self,
        generation: Generation,
        layout: PointLayout,
        alpha: AlphaTable | None,
        alpha_source: str,
        process_group: Any,
    ):
        session = generation.session
        self.generation = generation
        self.layout = layout
        self.cache_dtype = session.config.cache_dtype
        self.key = layout.key(self.cache_dtype)
        self.alpha_source = alpha_source
        self.process_group = process_group
        self.world_size = 1 if process_group is None else torch.distributed.get_world_size(process_group)
        self.num_allreduces = 0
        self.streams: list[StreamState | None] = []
        self.decisions = Decisions(
            config=session.config,
            num_points=layout.num_points,
            feeds_output=layout.feeds_output,
            alpha=alpha,
            num_steps=generation.num_steps,
            read_stats=self.read_stats,
            warn=session.warn_once,
            schedule_sigmas=generation.schedule_sigmas,
            second_order=layout.second_order,
        )
        # Coefficients of a stream's full step outside its unit's schedule: a first step (no
        # history: c = 0, refresh = 0) and a step right after its own last full step (refresh 1).
        self.first_step = StepCoefficients(layout.num_points, layout.device, layout.second_order)
        self.first_step.write([0.0] * layout.num_points, [0.0] * layout.num_points, "first")
        self.next_step = StepCoefficients(layout.num_points, layout.device, layout.second_order)
        self.next_step.write([0.0] * layout.num_points, [1.0] * layout.num_points, "next")
        self._gathered: torch.Tensor | None = None

    def stream(self, index: int, pool: StatePool) -> StreamState:
        while len(self.streams) <= index:
            self.streams.append(None)
        state = self.streams[index]
        if state is None:
            if not pool.has(self.key):
                streams = sum(1 for s in self.streams if s is not None) + 1
                new = self.layout.stream_nbytes(self.cache_dtype)
                self.generation.check_fits(
                    self.layout,
                    f"stream {index} of this generation ({streams} stream(s) of this layout, {format_bytes(new)} each)",
                    streams=streams,
                    own_bytes=self.nbytes,
                )
            state = self.streams[index] = pool.take(self.key, self.layout, self.cache_dtype)
        return state

    # -- the StepState protocol ----------------------------------------------------------------
    def buffers(self, stream: int, unit: Hashable) -> StreamState:
        return self.stream(stream, self.generation.session.pool)

    def coefficients(self, stream: int, kind: StepKind, device: torch.device) -> StepCoefficients:
        if kind == "first":
            return self.first_step
        if kind == "next":
            return self.next_step
        assert not isinstance(kind, str)
        return self.decisions.coefficients(stream, kind, self.layout.device)

    def synced_full(self, stream: int, step: int, unit: Hashable) -> None:
        self.decisions.synced_full(stream)

    def global_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """The statistics summed over the context-parallel group (one all-reduce)."""
        if self.process_group is None:
            return stats
        stats = stats.clone()
        torch.distributed.all_reduce(stats, group=self.process_group)
        self.num_allreduces += 1
        return stats

    def read_stats(self, streams: Sequence[int]) -> list[list[list[float]]]:
        """The one device→host read of a full step: the statistics of ``streams``, gathered into a
        preallocated table (it grows only when a generation has more streams than before)."""
        tables = [self.streams[s].stats for s in streams]  # type: ignore[union-attr]
        if self._gathered is None or self._gathered.shape[0] < len(tables):
            self._gathered = state_zeros(len(tables), *tables[0].shape, dtype=tables[0].dtype, device=tables[0].device)
        gathered = self._gathered[: len(tables)]  # [S, P, len(STAT_COLUMNS)]
        torch.stack(tables, out=gathered)
        return self.global_stats(gathered).tolist()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.streams if s is not None)

    def release(self) -> list[tuple[tuple[object, ...], StreamState]]:
        """Give up the stream states (the generation has finished): they go to the session's pool."""
        returned = [(self.key, s) for s in self.streams if s is not None]
        self.streams.clear()
        return returned


class Generation:
    """Everything one generation of one compiled module writes."""

    def __init__(self, session: ModuleSession, source: str, scope: GenerationScope | None):
        self.session = session
        self.scope = scope
        self.source = source
        declared = scope.num_inference_steps if scope is not None else None
        pipeline_steps = scope.pipeline.num_steps if scope is not None and scope.pipeline is not None else None
        if declared is not None and pipeline_steps is not None and declared != pipeline_steps:
            raise ClockError(
                f"ScalingCache: num_inference_steps={declared} was declared, but the pipeline's scheduler runs "
                f"{pipeline_steps} steps; the pipeline integration reads the step count from the scheduler: "
                "drop the declaration."
            )
        config_steps = session.config.num_inference_steps
        # A per-generation declaration overrides the compile-time option.
        self.num_steps = declared or pipeline_steps or config_steps
        if (
            source == "pipeline"
            and config_steps is not None
            and pipeline_steps is not None
            and config_steps != pipeline_steps
        ):
            raise ClockError(
                f"ScalingCache: options={{'num_inference_steps': {config_steps}}} was given, but the pipeline's "
                f"scheduler runs {pipeline_steps} steps. Drop the option: `sc_compile.enable(pipe)` reads the "
                "step count from the scheduler."
            )
        self.declared_steps = self.num_steps
        self.clock = StepClock(source, self.num_steps)
        if scope is not None and scope.pipeline is not None:
            self.clock.follow_pipeline(scope.pipeline.order, scope.pipeline.adopted_at)
        # The state of each kind of graph that ran: a LayoutState per compiled layout, or the one
        # BlockGraphsState of per-block graphs.
        self.layouts: dict[tuple[object, ...], StepState] = {}
        # A forward Dynamo split at breaks: the layout whose decisions every piece follows, the
        # piece layout created last. The pieces first run in forward order, so it is the piece
        # whose blocks feed the model output (ē comes from its cache points, the prediction the
        # output is made from; the others' statistics are never read). A piece recompiled alone
        # later (a guard variant) becomes the leader with no history: it runs full until it has
        # one, and the others follow it to full steps (fewer cached steps, never a wrong one).
        # Graphs of a whole forward never follow another layout.
        self.leader: StepState | None = None
        self.records: dict[int, StreamRecord] = {}
        self.owner = threading.get_ident()
        self.lock = threading.Lock()
        self.num_calls = 0
        self.finished = False
        self.checked_samples = False
        self.report: GenerationReport | None = None  # built when the generation finishes
        # A timestep-placed generation: its calls as placed by their timestep (the pattern the next
        # generation repeats), or, placed by count, the check of its calls (``clock/loop.py``).
        self.placed_calls: list[PlacedCall] = []
        self.previous_pattern: LoopPattern | None = None  # the calls of the generation before (its thread's)
        self.loop: LoopCheck | None = None
        self.clock_note = ""
        self._read_sigmas: list[float] | None = None  # the scheduler's sigmas, read with a timestep
        if self.session.config.final_full_steps and self.num_steps is None:
            raise ValueError(
                f"final_full_steps={self.session.config.final_full_steps} needs the generation's step count: set "
                "options={'num_inference_steps': N}, use `sc_compile.enable(pipe)`, or wrap the pipeline call in "
                "`with sc_compile.generation(transformer, num_inference_steps=N):`"
            )
        warmup = session.config.warmup_for(self.num_steps)
        if self.num_steps is not None and self.num_steps <= warmup < ALL_FULL_WARMUP:
            session.warn_once(
                "warmup",
                "ScalingCache: warm-up of %d steps covers the whole %d-step generation; nothing will be cached.",
                warmup,
                self.num_steps,
            )

    @property
    def warmup_steps(self) -> int:
        return self.session.config.warmup_for(self.num_steps)

    def count_by(self, loop: LoopCheck) -> None:
        """Place this generation's calls after the first by count (``clock/loop.py``)."""
        self.loop = loop
        self.clock_note = f"calls after the first placed by count: the loop's pattern of {len(loop.pattern)} calls"

    def stop_counting(self, note: str) -> None:
        """No call of this generation is placed by count from here on; ``note`` says why."""
        if self.loop is not None:
            self.loop.release()
            self.loop = None
        self.clock_note = note

    def layout_state(self, runtime: Any) -> LayoutState:
        key = runtime.layout.key(self.session.config.cache_dtype)
        state = self.layouts.get(key)
        if state is None:
            state = LayoutState(self, runtime.layout, runtime.alpha, runtime.alpha_source, runtime.process_group)
            self.layouts[key] = state
            if getattr(runtime, "piece", None) is not None:
                self.leader = state
        assert isinstance(state, LayoutState)
        return state

    def check_fits(self, layout: PointLayout, what: str, *, streams: int, own_bytes: int, note: str = "") -> None:
        """Refuse a stream state of ``layout`` that would not fit (``sc_compile.memory``), before
        it is allocated. ``streams`` states of the layout are counted in the advice, of which
        ``own_bytes`` are held already; ``note`` is added to the message.

        Against a declared ``max_cache_bytes`` the generation's states count, and so do the free
        states the session's pool holds: they are dropped where the new state would otherwise
        take the total over the limit (they are only kept for reuse)."""
        config = self.session.config
        new = layout.stream_nbytes(config.cache_dtype)
        held = sum(state.nbytes for state in self.layouts.values())
        # CUDA-graph captures of this session's graphs hold memory too (sc_compile.runtime.cuda_graphs).
        graphs = graph_memory_bytes(r for ref in self.session.runtimes if (r := ref()) is not None)
        if graphs:
            what = f"{what}, with {format_bytes(graphs)} held by its CUDA-graph captures"
        limit, source, counted = new_stream_limit(config.max_cache_bytes, layout.device, held + graphs)
        pool = self.session.pool
        if config.max_cache_bytes is not None and limit is not None and counted + pool.nbytes + new > limit:
            pool.clear()
        needed = counted + new
        if limit is not None and needed > limit:
            error = refusal(
                what,
                needed,
                limit,
                source,
                layout,
                config.cache_dtype,
                config.granularity,
                # For these streams: the limit less what the other states count against it.
                streams=streams,
                available=limit - max(counted - own_bytes, 0),
            )
            raise CacheMemoryError(f"{error} {note}") if note else error

    def record(self, stream: int) -> StreamRecord:
        record = self.records.get(stream)
        if record is None:
            record = self.records[stream] = StreamRecord()
        return record

    def timestep_of(self, step: int) -> float | None:
        """The step's timestep where it is known without a device read (see ``StepClock``)."""
        return self.clock.timestep_of(step)

    def read_timestep(self, timestep: torch.Tensor) -> tuple[float, ...]:
        """A pipeline call's timestep input as host floats. The first read also brings the scheduler's
        sigmas over (for :meth:`schedule_sigmas`): one device→host read for both."""
        flat = timestep.detach().reshape(-1)
        sigmas = self.schedule()[1]
        if self._read_sigmas is not None or not isinstance(sigmas, torch.Tensor):
            return tuple(flat.tolist())
        dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        both = torch.cat([flat.to(dtype), sigmas.detach().reshape(-1).to(flat.device, dtype)]).tolist()
        self._read_sigmas = both[flat.numel() :]
        return tuple(both[: flat.numel()])

    def schedule_sigmas(self) -> list[float] | None:
        """The scheduler's sigmas as host floats (one read), when the pipeline integration knows them."""
        sigmas = self.schedule()[1]
        if sigmas is None:
            return None
        if self._read_sigmas is not None:
            values = self._read_sigmas
        else:
            values = [float(s) for s in sigmas.detach().flatten().cpu().tolist()]
        # A solver of order k evaluates k points per step: the step starts at every k-th sigma.
        return values[:: self.clock.order]

    def schedule(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scheduler's timesteps and sigmas, when the pipeline integration knows them."""
        if self.scope is None or self.scope.pipeline is None:
            return None, None
        scheduler = self.scope.pipeline.scheduler
        return getattr(scheduler, "timesteps", None), getattr(scheduler, "sigmas", None)


# -- sessions ----------------------------------------------------------------------------------
class ModuleSession:
    """One module under one compile: its runtimes, its generations, its report."""

    def __init__(self, key: Any, config: ScalingCacheConfig, name: str):
        self.key_ref = held_weakly(key)
        self.config = config
        self.name = name
        self.runtimes: list[weakref.ReferenceType[Any]] = []
        # Held for the whole of an ambient call (placement and dispatch), and to take one over.
        self.lock = threading.RLock()
        # Per thread: its ambient (timestep-placed) generation. Threads that share a compiled model
        # without a context each get their own (``ambient`` is the calling thread's).
        self._ambient: dict[int, Generation] = {}
        self.last_generation: Generation | None = None
        self.last_report: GenerationReport | None = None
        self.last_active = 0.0
        self.pool = StatePool()
        # The calls of the last generation a ``generation()`` context ran, placed by their timesteps:
        # where the one before made the same, the next that starts as they did is placed by count
        # (``clock/loop.py``).
        self.context_pattern: LoopPattern | None = None
        self.context_pattern_repeated = False  # the generation before it made the same calls
        self._warned: set[str] = set()

    @property
    def ambient(self) -> Generation | None:
        """The calling thread's ambient generation."""
        return self._ambient.get(threading.get_ident())

    @ambient.setter
    def ambient(self, generation: Generation | None) -> None:
        if generation is None:
            self._ambient.pop(threading.get_ident(), None)
        else:
            self._ambient[threading.get_ident()] = generation

    def refuse_continuing_another_thread(self, values: tuple[float, ...]) -> None:
        """Before a thread starts an ambient generation at these timestep values: refuse if they
        continue another thread's running generation (its next step, as the timestep clock reads
        it), which would be one generation run across threads; every thread then places its own
        steps in a generation of its own. Reads the other generations' clocks only (under
        ``self.lock``, which every ambient call holds), so the refusal touches none of their state.
        Generations of threads that have ended are finished here."""
        alive = {thread.ident for thread in threading.enumerate()}
        for owner, generation in list(self._ambient.items()):
            if owner == threading.get_ident() or generation.finished:
                continue
            if owner not in alive:
                self.finish(generation, interrupted=True)
                continue
            clock = generation.clock
            current = clock._values[clock.step] if clock.step >= 0 else None
            if values != current and not clock.starts_new_generation(values):
                self._other_thread(generation)

    def add_runtime(self, runtime: Any) -> bool:
        """Note a runtime that serves this session (held weakly); whether it is new here."""
        if any(ref() is runtime for ref in self.runtimes):
            return False
        self.runtimes = [ref for ref in self.runtimes if ref() is not None]
        self.runtimes.append(weakref.ref(runtime))
        return True

    def warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def info_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.info(message, *args)

    # -- which generation a call belongs to -------------------------------------------------------
    def generation_for(self, scope: GenerationScope | None) -> Generation:
        if scope is not None:
            generation = scope.generations.get(id(self))
            if generation is None:
                if scope.pipeline is not None and scope.pipeline.num_steps is None:
                    scope.pipeline.num_steps = pipeline_step_count(scope.pipeline.scheduler)
                source = "pipeline" if scope.pipeline is not None else "context"
                generation = scope.generations[id(self)] = Generation(self, source, scope)
                self.last_generation = generation
            return generation
        with self.lock:
            generation = self.ambient
            if generation is None:
                generation = self.ambient = Generation(self, "timestep", None)
                self.last_generation = generation
            elif generation.owner != threading.get_ident() and not generation.finished:
                generation = self._other_thread(generation)
            return generation

    def _other_thread(self, generation: Generation) -> Generation:
        """A call from a thread that did not start the running ambient generation."""
        raise ClockError(
            f"ScalingCache: {self.name} is called from a second thread, with no generation context, at a "
            "timestep that continues the generation another thread is running (its next step): one "
            "generation whose steps run in several threads cannot be placed by the timestep (each thread "
            "gets a generation of its own). Give each generation its own state: call it inside "
            "`with sc_compile.generation(transformer):` in its own thread, or run each pipeline call "
            "(`sc_compile.enable(pipe)` or found by the compiled model) in one thread."
        )

    def restart_ambient(self, old: Generation, loop: LoopCheck | None = None) -> Generation:
        """The ambient generation ``old`` ended (the timestep went back): a fresh one, whose calls after
        the first are placed by count by ``loop`` where given (``clock/loop.py``)."""
        with self.lock:
            if self.ambient is old:
                self.finish(old, interrupted=False)
                generation = self.ambient = Generation(self, "timestep", None)
                self.last_generation = generation
                if loop is not None:
                    generation.count_by(loop)
            return self.ambient  # type: ignore[return-value]

    def check_loop(self, generation: Generation, placing: bool = False) -> bool:
        """Compare a counted generation's timestep copies with its pattern (a wait for the last copy).
        Where a timestep differs but the timestep clock places every call so far where the count did
        (the loop changed its schedule, not its steps), the generation goes on placed by its timesteps;
        otherwise it ends (a ``generation()`` context's cannot end: ``placing`` raises the ClockError the
        timestep clock would have raised). Whether it still runs."""
        loop = generation.loop
        if loop is None or generation.finished:
            return not generation.finished
        first = loop.differing()
        if first is None:
            return True
        what = loop.describe_values(first)
        actual = loop.actual()
        if replay(actual, loop.pattern.dtype) != loop.placed:
            mismatch = loop.mismatch(first, what)
            if generation.source != "context":
                self.end_loop(generation, mismatch)
                return False
            generation.stop_counting(mismatch.describe(self.name))
            log.warning(generation.clock_note)
            if placing:
                raise ClockError(
                    f"{generation.clock_note} Inside one `sc_compile.generation`, the calls' timesteps are not one "
                    "generation's: open one context per generation."
                )
            return True
        # The same steps and streams: the values were the pattern's where they were not the call's.
        misvalued = [c for c in range(first, loop.position) if actual[c][2] != loop.pattern.calls[c][2]]
        cached = [c for c in misvalued if not loop.full[c]]
        note = (
            f"placed by count up to call {loop.position - 1}, then by the timestep: call {first} (step "
            f"{actual[first][0]}) was at the step the count said, but {what}"
        )
        self.leave_loop(generation, note, actual)
        if cached:
            log.warning(
                "ScalingCache: %s: %s. Calls %s ran cached with the pattern's timestep in place of theirs (an α "
                "table is looked up by it): their outputs may differ slightly. The rest of the generation is "
                "placed by the timestep.",
                self.name,
                note,
                cached,
            )
        else:
            log.info("ScalingCache: %s: %s; nothing cached was affected.", self.name, note)
        return True

    def leave_loop(self, generation: Generation, note: str, actual: list[PlacedCall] | None = None) -> None:
        """A counted generation whose calls so far the timestep clock places as the count did goes on
        placed by the timestep (after :meth:`check_loop` compared them; ``actual``: the calls with
        their timesteps, where it has them already)."""
        assert generation.loop is not None
        actual = generation.loop.actual() if actual is None else actual
        generation.clock.correct_values(actual)
        generation.placed_calls = actual
        generation.stop_counting(note)

    def end_loop(self, generation: Generation, mismatch: Mismatch) -> None:
        """End a counted generation whose call was not its pattern's: a warning where a cached call
        ran at a wrong step (its output may be wrong), else a note (nothing was affected)."""
        generation.stop_counting(mismatch.describe(self.name))
        (log.warning if mismatch.cached_calls else log.info)(generation.clock_note)
        self.finish(generation, interrupted=True)

    def finish(self, generation: Generation, interrupted: bool) -> None:
        """Build the generation's report and free its state."""
        if generation.finished:
            return
        if generation.loop is not None and generation.loop.pending:
            # The calls placed by count not compared yet (what ends the generation there finishes it;
            # a generation that stopped counting is not compared again).
            self.check_loop(generation)
            if generation.finished:
                return
        from sc_compile.reporting.report import build_report

        generation.finished = True
        if generation.loop is not None:
            generation.loop.release()
        elif (
            generation.source == "context"
            and not interrupted
            and generation.placed_calls
            and generation.clock.dtype is not None
        ):
            # What the next context's generation is expected to repeat (``clock/loop.py``).
            pattern = LoopPattern.learn(generation.placed_calls, generation.clock.dtype)
            self.context_pattern_repeated = pattern is not None and pattern.repeats(self.context_pattern)
            self.context_pattern = pattern
        if generation.num_calls:
            ran = generation.clock.step + 1
            run = generation.scope.pipeline if generation.scope is not None else None
            if run is not None:  # the pipeline's steps, some perhaps run by another denoiser
                ran = max(ran, -(-run.steps_taken // run.order))
            if generation.declared_steps is not None and ran < generation.declared_steps and not interrupted:
                log.warning(
                    "ScalingCache: the generation ran %d of its %d declared steps%s.",
                    ran,
                    generation.declared_steps,
                    f"; final_full_steps={self.config.final_full_steps} was not honoured"
                    if self.config.final_full_steps
                    else "",
                )
            report = build_report(generation, finished=True)
            if self.last_generation is generation or self.last_report is None:
                self.last_report = report
            generation.report = report
        self.pool.keep([returned for state in generation.layouts.values() for returned in state.release()])
        if self._ambient.get(generation.owner) is generation:
            del self._ambient[generation.owner]

    def end_ambient(self) -> None:
        with self.lock:
            if self.ambient is not None and self.check_loop(self.ambient):
                self.finish(self.ambient, interrupted=False)

    def report(self) -> GenerationReport:
        from sc_compile.reporting.report import build_report

        generation = self.last_generation
        if generation is not None and generation.loop is not None:
            with self.lock:
                self.check_loop(generation)  # the calls placed by count so far, before they are reported
        if generation is not None and not generation.finished and generation.num_calls:
            # Under context parallelism the last full step's change is folded in by the next call
            # (on every rank), not here: the report may be asked for on one rank only.
            return build_report(generation, finished=False, collective=False)
        if self.last_report is None:
            raise RuntimeError(f"no generation has run on this compiled {self.name} yet")
        return self.last_report


def pipeline_step_count(scheduler: Any) -> int | None:
    """The number of steps the pipeline's loop runs (after ``set_timesteps``): its ``scheduler.step``
    calls, in groups of the scheduler's ``order`` (a second-order solver calls the model and steps
    twice per step; its last step may be a single call)."""
    calls = scheduler_calls(scheduler)
    if calls is None:
        return None
    order = scheduler_order(scheduler)
    return -(-calls // order)


def scheduler_calls(scheduler: Any) -> int | None:
    """The number of ``scheduler.step`` calls the pipeline's loop makes (after ``set_timesteps``)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None)
    return len(timesteps) - (begin or 0)


def scheduler_order(scheduler: Any) -> int:
    """Model calls per step of ``scheduler`` (diffusers' ``order``: 2 for Heun and KDPM2)."""
    order = getattr(scheduler, "order", 1)
    return order if isinstance(order, int) and order > 1 else 1


def session_for(key: Any, token: Any, config: ScalingCacheConfig, name: str, holder: Any) -> ModuleSession:
    """The live session of module ``key`` under session ``token`` (a new one where none lives),
    held by the ``torch.compile`` call ``holder`` (``None``: the caller holds it) and by its
    generations."""
    session: ModuleSession = REGISTRY.session(key, token, lambda: ModuleSession(key, config, name), holder)
    return session


def sessions_of(module: torch.nn.Module) -> list[ModuleSession]:
    sessions: list[ModuleSession] = REGISTRY.sessions_of(module_key(module))
    return sessions


def is_side_call(scope: GenerationScope, generation: Generation, key: Any) -> bool:
    """A call the pipeline makes outside any ``cache_context`` while it names its denoising calls:
    not one of them (it runs in full on scratch state and leaves the generation alone)."""
    return scope.pipeline is not None and bool(generation.clock.stream_names) and stream_name(key) is None


__all__ = [
    "ClockError",
    "Generation",
    "GenerationScope",
    "ModuleSession",
    "PipelineRun",
    "active_scope",
    "module_key",
    "session_for",
    "sessions_of",
]
