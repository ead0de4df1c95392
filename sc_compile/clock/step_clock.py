"""The step clock: the step and stream of every call of a generation.

A generation's clock has one of three sources, the most explicit available:

``"pipeline"``
    a diffusers pipeline call (found by the call itself, or ``sc_compile.enable(pipe)``): a generation
    per pipeline call, a step per ``scheduler.step`` (per ``scheduler.order`` of them for a solver
    that calls the model more than once per step: each of those calls is a stream of its own),
    streams named by the pipeline's ``cache_context`` (or, where it uses none, numbered by call
    order within the step), the step count from the scheduler. No tensor is read to place a call.
``"context"``
    ``sc_compile.generation(model)``: the generation's boundaries are the context; steps come from
    the timestep input as in the fallback below; a timestep that goes back to an earlier step's is
    an error (two generations in one context), not a new generation.
``"timestep"``
    no context: the timestep input places the call. A step changes when the timestep tensor's
    values change (all of them: a ``[B]`` or per-token ``[B, seq]`` tensor, any dtype); a further
    call with the same values is another stream of the step. A new generation starts when the
    values go back to an earlier step's, or move against the direction the generation's first two
    steps set (so schedules that increase, 0 = noise … 1 = clean, work as decreasing ones do).
    What the timestep cannot tell, the clock refuses with an error that names the explicit source
    that can: more than ``MAX_STREAMS_PER_STEP`` calls at one timestep (repeated one-step
    generations), a repeated 16-bit timestep (neighbouring steps of a long schedule collide in
    bfloat16), more steps than declared. Once a generation has finished and the next one starts
    at the same timestep, the next one's calls are placed by their position in the finished one's
    pattern and their timesteps are checked afterwards, without a read per call (``loop.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sc_compile.errors import ClockError

# Calls with one timestep before the clock refuses to take them as further streams of a step.
MAX_STREAMS_PER_STEP = 8

EXPLICIT_SOURCES = (
    "use `sc_compile.enable(pipe)` (a generation per pipeline call, steps from the scheduler) or wrap each "
    "generation in `with sc_compile.generation(transformer, num_inference_steps=N):`"
)


class NewGeneration(Exception):
    """Raised by :meth:`StepClock.place_by_timestep` when a call starts a new generation."""


class StepClock:
    """Step and stream of the calls of one generation."""

    def __init__(self, source: str, num_steps: int | None):
        self.source = source
        self.num_steps = num_steps
        self.step = -1
        self.stream_names: dict[str, int] = {}
        # Pipeline clock: model calls per step (the scheduler's ``order``), and the step at which a
        # pipeline call already running was adopted (its first call ran inside a ``cache_context``
        # entered before the integration could name it: that unnamed stream is claimed by the
        # first new name of a later step).
        self.order = 1
        self.adopted_step: int | None = None
        self._claimable: set[int] = set()
        self.calls_per_step: list[int] = []
        self._streams_this_step: set[int] = set()
        # Per step: the timestep values read (flattened), where the clock read them.
        self._values: list[tuple[float, ...] | None] = []
        self.dtype: torch.dtype | None = None  # of the timesteps placed by their values

    # -- shared --------------------------------------------------------------------------------
    def follow_pipeline(self, order: int, adopted_at: int | None) -> None:
        """Place calls by a pipeline whose scheduler runs ``order`` model calls per step; ``adopted_at``:
        the scheduler steps taken when the pipeline call was adopted (None: placed from its start)."""
        self.order = max(int(order), 1)
        self.adopted_step = None if adopted_at is None else adopted_at // self.order

    def _stream_of(self, name: str | None) -> int:
        if name is None:
            unnamed = len(self._streams_this_step)
            if self.step == self.adopted_step:
                self._claimable.add(unnamed)
            return unnamed
        stream = self.stream_names.get(name)
        if stream is not None:
            return stream
        free = sorted(self._claimable - self._streams_this_step)
        if free:
            stream = free[0]
            self._claimable.discard(stream)
        else:
            stream = max([*self.stream_names.values(), *self._claimable, -1]) + 1
        self.stream_names[name] = stream
        return stream

    def _begin_step(self, values: tuple[float, ...] | None) -> None:
        self.step += 1
        if self.num_steps is not None and self.step >= self.num_steps:
            raise ClockError(
                f"ScalingCache: step {self.step + 1} started, but this generation was declared to have "
                f"{self.num_steps} steps (num_inference_steps). The step count sets the warm-up and "
                "final_full_steps, so the schedule would be wrong: declare the step count the run has, or "
                "none."
            )
        self._streams_this_step = set()
        self.calls_per_step.append(0)
        self._values.append(values)

    def _add_call(self, stream: int) -> int:
        if stream >= MAX_STREAMS_PER_STEP:
            raise ClockError(
                f"ScalingCache: call {len(self._streams_this_step) + 1} of step {self.step} would be stream "
                f"{stream}; more than {MAX_STREAMS_PER_STEP} streams in one step is not a guidance pattern "
                "but usually several generations the timestep cannot tell apart (one-step generations, "
                f"repeated). Each stream holds a full set of cache buffers: {EXPLICIT_SOURCES}."
            )
        self._streams_this_step.add(stream)
        self.calls_per_step[-1] += 1
        return stream

    def timestep_of(self, step: int) -> float | None:
        """The timestep input of ``step`` where the clock read it (the mean over elements where
        they differ per token), else ``None``."""
        if step < 0 or step >= len(self._values):
            return None
        values = self._values[step]
        if not values:
            return None
        first = values[0]
        return first if all(v == first for v in values) else sum(values) / len(values)

    # -- pipeline ------------------------------------------------------------------------------
    def record_timestep(self, step: int, value: float) -> None:
        """Keep a timestep the runtime read for ``step`` (the pipeline clock reads none itself)."""
        if 0 <= step < len(self._values) and self._values[step] is None:
            self._values[step] = (value,)

    def place_in_pipeline_step(self, scheduler_steps: int, name: str | None) -> tuple[int, int]:
        """Place a call after ``scheduler_steps`` calls of ``scheduler.step`` in the pipeline call.

        With a scheduler of order k > 1 (Heun, KDPM2: the pipeline calls the model and
        ``scheduler.step`` k times per step), the call is in step ``scheduler_steps // k`` and its
        sub-step ``scheduler_steps % k`` is part of its stream: the model is evaluated at another
        point of each sub-step (a predictor, then a corrector), so each sub-step's calls form a
        smooth trajectory of their own, predicted from their own history, never from the other's.
        """
        step, substep = divmod(scheduler_steps, self.order)
        if self.order > 1 and name is not None:
            name = f"{name}#{substep}"
        if step < self.step:
            raise RuntimeError(
                f"ScalingCache: the pipeline's step went back from {self.step} to {step}; bug in sc_compile"
            )
        while self.step < step:
            self._begin_step(None)
        stream = self._stream_of(name)
        if stream in self._streams_this_step:
            raise ClockError(
                f"ScalingCache: stream {name or stream!r} was called twice in step {step} without a scheduler "
                "step in between. A call outside the denoising loop (a preview in a step callback, a "
                "probe) belongs in `with sc_compile.uncached(transformer):`, which runs it in full without "
                "touching the generation."
            )
        return self.step, self._add_call(stream)

    # -- forwards of per-block graphs ------------------------------------------------------------
    def place_next_forward(self, name: str | None) -> tuple[int, int]:
        """Place a forward of a model whose blocks Dynamo compiles one by one, in a generation
        without a pipeline (``sc_compile.generation``): such graphs see no timestep, so each forward
        is the next step, except that a forward of a named stream (``cache_context``) that has not
        run in the current step joins that step."""
        if self.step >= 0 and name is not None:
            stream = self._stream_of(name)
            if stream not in self._streams_this_step:
                return self.step, self._add_call(stream)
        if self.num_steps is not None and self.step + 1 >= self.num_steps:
            raise ClockError(
                f"ScalingCache: forward {self.step + 2} of the blocks started, but this generation was declared "
                f"to have {self.num_steps} steps. The blocks of this model are compiled one by one and see no "
                "timestep, so inside `sc_compile.generation` every forward is one step: guidance run as separate "
                "calls counts twice. Use `sc_compile.enable(pipe)` (steps from the scheduler, streams from the "
                "pipeline's cache_context), or batch the guidance into one call."
            )
        self._begin_step(None)
        return self.step, self._add_call(self._stream_of(name))

    # -- by count (a hand-written loop whose pattern is known, ``loop.py``) ----------------------
    def place_counted(self, step: int, name: str | None, values: tuple[float, ...]) -> tuple[int, int]:
        """Place a call at ``step`` of a generation that repeats a known pattern: the step its position
        in the pattern says, with the timestep values the pattern had there (checked afterwards)."""
        if step < self.step:
            raise RuntimeError(f"ScalingCache: a counted step went back from {self.step} to {step}; bug in sc_compile")
        while self.step < step:
            self._begin_step(values)
        return self.step, self._add_call(self._stream_of(name))

    def correct_values(self, calls: Sequence[tuple[int, str | None, tuple[float, ...]]]) -> None:
        """The timestep values of the steps placed by count, as they were (read afterwards)."""
        for step, _, values in reversed(calls):
            if 0 <= step < len(self._values):
                self._values[step] = values

    # -- timestep ------------------------------------------------------------------------------
    def starts_new_generation(self, values: tuple[float, ...]) -> bool:
        """Whether a call with these timestep values starts a new generation: the values go back to
        an earlier step's, or move against the direction of the generation's first two steps."""
        if self.step < 0:
            return True
        current = self._values[self.step]
        if values == current:
            return False
        if any(values == earlier for earlier in self._values[: self.step]):
            return True
        if self.step < 1:
            return False
        first, second = _summary(self._values[0]), _summary(self._values[1])
        now, last = _summary(values), _summary(current)
        if None in (first, second, now, last) or first == second:
            return False
        return (now - last) * (second - first) < 0  # type: ignore[operator]

    def place_by_timestep(self, values: tuple[float, ...], name: str | None, dtype: torch.dtype) -> tuple[int, int]:
        """Place a call by its timestep values; raises :class:`NewGeneration` or :class:`ClockError`."""
        self.dtype = dtype
        if self.step < 0:
            self._begin_step(values)
            return self.step, self._add_call(self._stream_of(name))
        current = self._values[self.step]
        if values == current:
            stream = self._stream_of(name)
            if stream not in self._streams_this_step:
                if name is None and dtype.itemsize <= 2 and dtype.is_floating_point:
                    raise ClockError(
                        f"ScalingCache: two calls in a row had the same {dtype} timestep "
                        f"{_show(values)}. In {dtype} neighbouring steps of a long schedule share a value, so "
                        "the clock cannot tell the next step from another guidance call of this one. Pass the "
                        f"timestep in float32, or {EXPLICIT_SOURCES}."
                    )
                return self.step, self._add_call(stream)
            if name is None:
                raise AssertionError("unnamed streams are numbered by call order")
            # The same named stream again with an equal (low-precision) timestep: the next step.
        elif self.starts_new_generation(values):
            raise NewGeneration
        self._begin_step(values)
        return self.step, self._add_call(self._stream_of(name))


def _summary(values: tuple[float, ...] | None) -> float | None:
    return None if not values else math.fsum(values)


def _show(values: Sequence[float]) -> str:
    return f"{values[0]:.6g}" if len(values) == 1 or all(v == values[0] for v in values) else f"{list(values[:4])}…"
