"""The one dispatcher of every ScalingCache graph: whole-model graphs and per-block graphs alike.

Per call: the guards (autograd, a stochastic sampler), the module's session, side calls (outside
any generation, or outside the pipeline's ``cache_context``), the generation and the placement of
the call in a step and stream, the step's decision, the coefficients, and the bookkeeping (the
buffers' history, the record of the generation). The graph kinds differ only in what the
protocol (``protocol.py``) leaves to them: their :class:`~sc_compile.runtime.protocol.StepState`
in a generation, how a call is placed, and how a step runs
(:class:`~sc_compile.runtime.protocol.StepRunner`).

A unit's buffers are predicted from only where they hold the unit's last full step; otherwise
the call runs in full, with the coefficients of a step outside the schedule
(:func:`outside_schedule`).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

from sc_compile.clock.pipeline import scope_for_call
from sc_compile.config import ScalingCacheConfig, StochasticSampler
from sc_compile.decision.decisions import StepInfo
from sc_compile.errors import GradEnabledError, StochasticSamplerError
from sc_compile.runtime.generations import (
    Generation,
    GenerationScope,
    ModuleSession,
    StreamRecord,
    is_side_call,
    is_uncached,
    session_for,
)
from sc_compile.runtime.protocol import Placement, StepCall, StepKind, StepRunner, StepState
from sc_compile.runtime.registry import REGISTRY, IdentityMap, held_weakly
from sc_compile.runtime.state import StreamState

log = logging.getLogger("sc_compile.runtime.dispatch")

__all__ = [
    "Dispatcher",
    "GradEnabledError",
    "StochasticSamplerError",
    "Target",
    "outside_schedule",
    "record_step",
    "refuse_stochastic",
    "scheduler_sigma",
]


def refuse_stochastic(
    config: ScalingCacheConfig, scope: GenerationScope, warned: weakref.WeakSet[GenerationScope]
) -> None:
    """Refuse a generation with a stochastic sampler, or warn once per scope where the config says so."""
    how = (
        "declared with stochastic_sampler=True"
        if scope.stochastic_sampler
        else "its scheduler drew random numbers in a step"
    )
    what = (
        f"ScalingCache: this generation uses a stochastic sampler ({how}): it injects fresh noise into the "
        "latents every step, and a cached step, predicted from past full steps, never sees it, so the result "
        "drifts from the uncached one"
    )
    if config.stochastic_sampler is StochasticSampler.WARN:
        if scope not in warned:
            warned.add(scope)
            log.warning("%s (caching anyway, as options={'stochastic_sampler': 'warn'} asks).", what)
        return
    raise StochasticSamplerError(
        f"{what}. To keep fidelity use the scheduler's deterministic (ODE) mode, e.g. "
        "FlowMatchEulerDiscreteScheduler(stochastic_sampling=False), or run this pipeline uncompiled by "
        "ScalingCache; options={'stochastic_sampler': 'warn'} caches anyway with a warning "
        "(prediction='residual' adds the prediction to the current input, which carries the noise, "
        "and drifts less)."
    )


def scheduler_sigma(scheduler: Any, step: int) -> Callable[[], float | None]:
    """The scheduler's sigma of the pipeline's ``step`` (read only when asked)."""

    def sigma() -> float | None:
        sigmas = getattr(scheduler, "sigmas", None)
        index = (getattr(scheduler, "begin_index", None) or 0) + step
        if not isinstance(sigmas, torch.Tensor) or index >= len(sigmas):
            return None
        return float(sigmas[index])

    return sigma


def outside_schedule(buffers: StreamState | None, step: int, noun: str) -> tuple[StepKind, str]:
    """A full step for buffers that do not hold their unit's last full step, and why.

    Right after the buffers' own full step the refresh is the plain difference (``"next"``:
    factor 1); otherwise they start over (``"first"``: nothing they hold is read as history)."""
    if buffers is not None and buffers.last_full_step is not None and buffers.last_full_step == step - 1:
        return "next", f"{noun} catching up (its buffers missed the last full step)"
    if buffers is not None:
        buffers.forget()
    return "first", f"{noun}'s first step (nothing written to predict from)"


def record_step(record: StreamRecord, step: int, full: bool, reason: str) -> None:
    """Write one call's step into its stream's record. The graphs of one step (the pieces of a
    split forward, the blocks of a per-block model) record it once: full only if every one of them
    ran full (one prediction among them makes the step's output a prediction, not the model's),
    else cached with the reason of a call that predicted."""
    if full:
        if step in record.cached_steps[-1:]:
            return  # another graph of this step predicted: the step stays cached
        if step not in record.full_steps[-1:]:
            record.full_steps.append(step)
        record.reasons[step] = reason
        return
    if step in record.full_steps[-1:]:
        record.full_steps.pop()
    if step not in record.cached_steps[-1:]:
        record.cached_steps.append(step)
    record.reasons[step] = reason


@dataclasses.dataclass(frozen=True)
class Target:
    """What a call runs: the module (its key), the module's class name, and the unit of buffers
    within a stream (``()`` for a whole-model graph; the block and code for a per-block graph)."""

    key: Any
    name: str
    unit: Hashable = ()


class Dispatcher:
    """Dispatches each call of one compiled graph (see the module docstring).

    Subclasses say what a call is (:meth:`target`, :meth:`session_token`), where it runs
    (:meth:`step_state`, :meth:`place`, :meth:`run_ambient`), and how a step runs
    (:meth:`run_full`, :meth:`run_cached`, :meth:`run_uncached`)."""

    # What the autograd refusal says of where the cache updates its buffers.
    UPDATES = "in place inside the graph"
    # What a record's reason calls the buffers of one unit in one stream.
    NOUN = "stream"

    def __init__(self, model_class: str, config: ScalingCacheConfig, compile_token: Any):
        self.compile_token = compile_token
        self._sessions: IdentityMap[Any, ModuleSession] = IdentityMap()
        self.model_class = model_class
        self.config = config
        self.num_calls = 0
        self.num_full_calls = 0
        self.num_cached_calls = 0
        self._warned_scopes: weakref.WeakSet[GenerationScope] = weakref.WeakSet()

    # -- what subclasses say -------------------------------------------------------------------
    def target(self, args: tuple[Any, ...]) -> Target:
        """What the call runs (its module key is ``generations.module_key`` of the module)."""
        raise NotImplementedError

    def session_token(self) -> Any:
        """The session token: what the sessions of this graph's modules are per."""
        raise NotImplementedError

    @property
    def compile_token(self) -> Any:
        """The ``torch.compile`` call that built this graph (held weakly; see registry.py)."""
        return self._compile_token()

    @compile_token.setter
    def compile_token(self, token: Any) -> None:
        self._compile_token = held_weakly(token)

    def new_session(self, session: ModuleSession, target: Target) -> None:
        """This graph serves ``session`` for the first time."""

    def step_state(self, generation: Generation) -> StepState:
        raise NotImplementedError

    def place(
        self, state: StepState, generation: Generation, scope: GenerationScope, target: Target, args: tuple[Any, ...]
    ) -> Placement:
        """The step and stream of a call in an explicit generation."""
        raise NotImplementedError

    def run_ambient(self, session: ModuleSession, target: Target, args: tuple[Any, ...]) -> Any:
        """A call outside any explicit generation."""
        raise NotImplementedError

    def run_uncached(self, args: tuple[Any, ...]) -> Any:
        """A side call: in full, on scratch state, outside any generation."""
        raise NotImplementedError

    def run_full(self, call: StepCall, args: tuple[Any, ...]) -> tuple[Any, StreamState]:
        raise NotImplementedError

    def run_cached(self, call: StepCall, args: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def leader(self, generation: Generation, state: StepState) -> StepState:
        """The state whose verdict the step takes (``state`` itself unless it follows another)."""
        return state

    def after_synced_full(self, step: int, stream: int, buffers: StreamState) -> None:
        """A full step in sync with its unit's schedule ran (calibration observes it)."""

    # -- sessions ------------------------------------------------------------------------------
    def session_of(self, target: Target) -> ModuleSession:
        token = self.compile_token
        session = session_for(target.key, self.session_token(), self.config, target.name, token)
        if token is None and self._sessions.get(target.key) is not session:
            # A graph built outside a torch.compile call: its sessions live as long as it does.
            self._sessions.set(target.key, session)
        if session.add_runtime(self):
            self.new_session(session, target)
        return session

    # -- the call ------------------------------------------------------------------------------
    def refuse_grad(self) -> None:
        if torch.is_grad_enabled():
            raise GradEnabledError(
                f"ScalingCache: {self.model_class} was called with autograd enabled. The cache updates its "
                f"buffers {self.UPDATES}, which autograd cannot differentiate, and a denoising loop needs no "
                "gradients: run it under `torch.no_grad()` or `torch.inference_mode()` (diffusers pipelines do)."
            )

    def __call__(self, *args: Any) -> Any:
        self.refuse_grad()
        return self.dispatch(args)

    def dispatch(self, args: tuple[Any, ...]) -> Any:
        target = self.target(args)
        session = self.session_of(target)
        session.last_active = REGISTRY.activity()
        if is_uncached(target.key):
            return self.run_uncached(args)
        # The scope open in this context, else the diffusers pipeline call found on the stack
        # (adopted: the one line gets the pipeline clock), else None (the timestep clock).
        scope, side_call = scope_for_call(target.key)
        if side_call:
            return self.run_uncached(args)
        if scope is None:
            return self.run_ambient(session, target, args)
        generation = session.generation_for(scope)
        if is_side_call(scope, generation, target.key):
            return self.run_uncached(args)
        if (scope.pipeline is not None and scope.pipeline.stochastic) or scope.stochastic_sampler:
            refuse_stochastic(self.config, scope, self._warned_scopes)
        with generation.lock:
            state = self.step_state(generation)
            placement = self.place(state, generation, scope, target, args)
            return self.run_step(generation, state, placement, target.unit, args)

    def run_step(
        self, generation: Generation, state: StepState, placement: Placement, unit: Hashable, args: tuple[Any, ...]
    ) -> Any:
        """Decision → coefficients → the step → bookkeeping, for a placed call."""
        step, stream = placement.step, placement.stream
        decisions = state.decisions
        info = StepInfo(step, generation.num_steps, placement.timestep, placement.sigma)

        def step_info(s: int) -> StepInfo:
            return StepInfo(s, generation.num_steps, lambda: generation.timestep_of(s))

        leader = self.leader(generation, state)
        if leader is state:
            decision = decisions.decide(stream, info, step_info)
        else:
            # Another graph of the split forward feeds the model output: its verdict is the step's.
            leader.decisions.decide(stream, info, step_info)
            decision = decisions.decide(
                stream, info, step_info, follow=lambda s: leader.decisions.decision_of(stream, s)
            )
        # The unit's last full step before this one: the step its buffers must hold.
        previous = decisions.unit_last_full(stream, before=step)
        buffers = state.buffers(stream, unit)
        in_sync = (
            buffers is not None and buffers.last_full_step == previous and (decision.full or buffers.has_difference)
        )
        if in_sync and not decision.full and decision.uses_second_difference:
            # The second term reads dy_prev: the dy the unit's full step before last wrote.
            assert buffers is not None and previous is not None
            in_sync = buffers.has_second_difference and buffers.previous_full_step == decisions.unit_last_full(
                stream, before=previous
            )
        kind: StepKind
        if in_sync:
            full, kind, reason = decision.full, decision, decision.reason
        else:
            full = True
            kind, reason = outside_schedule(buffers, step, self.NOUN)
        if full and buffers is not None and buffers.last_full_step is None:
            buffers.zero_()  # the unit's first step: nothing its buffers hold is read as history
        call = StepCall(state, step, stream, unit, buffers, lambda device: state.coefficients(stream, kind, device))
        runner: StepRunner = self  # how the step runs: the one thing the graph kinds differ in
        if full:
            out, buffers = runner.run_full(call, args)
        else:
            out = runner.run_cached(call, args)
        assert buffers is not None
        self.num_calls += 1
        if placement.counts_call:
            generation.num_calls += 1
        if full:
            self.num_full_calls += 1
            buffers.record_full(step, in_sync)
            if in_sync:
                state.synced_full(stream, step, unit)
                self.after_synced_full(step, stream, buffers)
        else:
            self.num_cached_calls += 1
        record_step(generation.record(stream), step, full, reason)
        return out
