"""A hand-written loop's calls placed by count once its pattern is known, checked without a read per call.

Without a pipeline or a context, the timestep clock (``step_clock.py``) places a call by its
timestep: one device→host read per call, a sync on a GPU. A loop repeats itself: once two
timestep-placed generations in a row made the same calls (the same timesteps, calls per step and
stream names: :class:`LoopPattern`), the next generation that starts as they did is expected to
repeat them. Its first call is still read (the check that the pattern starts
again, the batch check, and the check against the other threads' generations). Its later calls are
placed by their position in the pattern, and each one's timestep is copied to the host without
waiting (``non_blocking`` into pinned memory on CUDA). After each full step the copies made so far
are compared with the pattern (:class:`LoopCheck`): one wait per full step, at the next call, on the
copy made just before that full step's graph; a report waits for the rest.

A difference ends the generation; the call that finds it is placed by its timestep again, as the
first step of a new generation. Calls placed at the wrong step that ran in full are exact whatever
their placement (their buffers are dropped with the generation); a call that ran *cached* at a wrong
step was predicted from another step's state, and may be wrong: the warning names those calls. Full
steps come first (the warm-up), so a loop that changes its schedule (another step count, another
shift) is found before anything is cached. What the check cannot prevent is a generation
interrupted between two full steps and followed by a new one: the new one's first call is placed at
the next position of the old pattern, and runs cached if that position is cached. The warning then
says so, after the next full step; explicit boundaries (``sc_compile.generation``,
``sc_compile.enable``, or a diffusers pipeline, which the one line finds by itself) have none of this.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from types import CodeType, FrameType

import torch

from sc_compile.clock.step_clock import ClockError, NewGeneration, StepClock

# A call of a timestep-placed generation as the loop pattern keeps it: step, stream name, timestep values.
PlacedCall = tuple[int, str | None, tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class LoopPattern:
    """The calls of a finished timestep-placed generation, in order: what the next one repeats."""

    calls: tuple[PlacedCall, ...]
    values: torch.Tensor  # the calls' timestep values, [calls, width] float64, on the host
    dtype: torch.dtype

    @classmethod
    def learn(cls, calls: Sequence[PlacedCall], dtype: torch.dtype) -> LoopPattern | None:
        """The pattern of a generation's calls; None where there is none to repeat (fewer than two
        steps, or timesteps of varying size)."""
        if not calls or calls[-1][0] < 1 or len({len(values) for _, _, values in calls}) != 1:
            return None
        return cls(tuple(calls), torch.tensor([values for _, _, values in calls], dtype=torch.float64), dtype)

    def __len__(self) -> int:
        return len(self.calls)

    @property
    def width(self) -> int:
        return len(self.calls[0][2])

    def repeats(self, other: LoopPattern | None) -> bool:
        """Whether ``other`` (the generation before) had the same calls: a loop is placed by count once
        it has repeated itself."""
        return other is not None and other.dtype == self.dtype and other.calls == self.calls

    def starts(self, name: str | None, values: tuple[float, ...], dtype: torch.dtype) -> bool:
        """Whether a call with this stream name and these timestep values is the pattern's first call."""
        _, first_name, first_values = self.calls[0]
        return name == first_name and dtype == self.dtype and values == first_values


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """A counted generation's call that was not the pattern's."""

    call: int  # its position in the generation
    step: int  # the step the pattern placed it at
    what: str  # what differed
    cached_calls: tuple[int, ...]  # the calls from ``call`` on that ran cached: possibly wrong outputs

    def describe(self, model: str) -> str:
        head = (
            f"ScalingCache: {model} is called from a loop with no pipeline and no generation context, and this "
            f"generation's calls were placed by count, repeating the previous generation's pattern; call {self.call} "
            f"(step {self.step}) was not the pattern's: {self.what}."
        )
        if self.cached_calls:
            shown = ", ".join(str(c) for c in self.cached_calls[:8]) + (", …" if len(self.cached_calls) > 8 else "")
            effect = (
                f" {len(self.cached_calls)} call(s) from there on ran cached at a step they were not at (calls "
                f"{shown}): their outputs were predicted from another step's state and may be wrong (an "
                "interrupted generation followed by a new one does this)."
            )
        else:
            effect = " Every call from there on ran in full, so no output is affected."
        return (
            f"{head}{effect} The generation ends here; the next calls are placed by their timestep again. For "
            "exact generation boundaries wrap each one in `with sc_compile.generation(transformer):` or run it "
            "through a diffusers pipeline."
        )


class LoopCheck:
    """The calls of one counted generation: their placement by position, the asynchronous copies of
    their timesteps, the frame the loop runs in, and the comparison with the pattern."""

    def __init__(
        self,
        pattern: LoopPattern,
        device: torch.device,
        first: PlacedCall,
        stack: list[FrameType],
        previous: LoopCheck | None = None,
    ):
        self.pattern = pattern
        self.device = device
        pinned = device.type == "cuda"
        self.copies: torch.Tensor  # [calls, width]: each call's timestep, copied without a wait
        if previous is not None and previous.pattern is pattern and previous.device == device:
            self.copies = previous.copies  # every copy into it was waited for before this generation
        else:
            self.copies = torch.empty((len(pattern), pattern.width), dtype=pattern.dtype, pin_memory=pinned)
        self._event: torch.cuda.Event | None = None
        self.first = first  # the first call as read
        self.placed: list[tuple[int, int]] = []  # (step, stream) of each call placed
        self.current: object = None  # the placement of the call placed last (the runtime's)
        self.position = 1  # the next call; the first was read
        self.verified = 1  # calls before this one matched the pattern
        self.full = [True] + [False] * (len(pattern) - 1)
        self.due = False  # a full step ran since the last comparison
        # The loop's frame: the innermost frame the first call shares with the next step's first
        # (strong references, dropped when the pattern's last call is placed or the generation ends).
        self._first_stack: list[FrameType] | None = stack
        self.frame: FrameType | None = None
        self._callee: CodeType | None = None

    @property
    def complete(self) -> bool:
        """Every call of the pattern was placed: the next call starts the next generation."""
        return self.position >= len(self.pattern)

    @property
    def pending(self) -> bool:
        return self.verified < self.position

    def expected(self) -> PlacedCall:
        return self.pattern.calls[self.position]

    # -- the frame -------------------------------------------------------------------------------
    def in_loop(self, stack: list[FrameType], step: int) -> bool:
        """Whether a call at ``step`` with this Python stack (innermost first) runs in the generation's
        loop: the innermost frame the first call shares with the first call of the next step is on it,
        calling the code they called from it. A generation interrupted and followed by a new one from a
        new call of the loop's function, a new notebook cell, or a function the loop's frame calls is
        found here, before its first call is placed. (The calls of one step can share a deeper frame: a
        comprehension over the guidance calls.)"""
        if self._first_stack is None and self.frame is None:
            return True  # released: the pattern's calls were all placed
        if self.frame is None:
            if step == 0:
                return True  # still the first step (in full: the warm-up)
            first = self._first_stack or []
            index = {id(frame): i for i, frame in enumerate(first)}
            self._first_stack = None
            for i, frame in enumerate(stack):
                if id(frame) in index:
                    j = index[id(frame)]
                    self.frame = frame
                    # The code the loop's frame called (the same in both calls, else not checked).
                    below = [s[k - 1].f_code for s, k in ((stack, i), (first, j)) if k > 0]
                    self._callee = below[0] if len(below) == 2 and below[0] is below[1] else None
                    break
            return True
        for i, frame in enumerate(stack):
            if frame is self.frame:
                return self._callee is None or (i > 0 and stack[i - 1].f_code is self._callee)
        return False

    def release(self) -> None:
        self._first_stack = None
        self.frame = None

    # -- the timesteps ---------------------------------------------------------------------------
    def copy(self, timestep: object) -> str | None:
        """Copy the next call's timestep to the host without waiting; what differs from the pattern
        where that is known without its values (then nothing is copied)."""
        if not isinstance(timestep, torch.Tensor):
            return f"its timestep is a {type(timestep).__name__}, not a tensor"
        if timestep.dtype != self.pattern.dtype or timestep.numel() != self.pattern.width:
            return (
                f"its timestep is {timestep.dtype} with {timestep.numel()} values, where the pattern has "
                f"{self.pattern.dtype} with {self.pattern.width}"
            )
        if timestep.device != self.device:
            return f"its timestep is on {timestep.device}, where the pattern's was on {self.device}"
        self.copies[self.position].copy_(timestep.detach().reshape(-1), non_blocking=True)
        if self.device.type == "cuda":
            if self._event is None:
                self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.device))
        self.position += 1
        if self.complete:
            self.release()
        return None

    def ran(self, full: bool) -> None:
        """The call placed last ran (in full or cached)."""
        self.full[self.position - 1] = full
        self.due = self.due or full

    def differing(self) -> int | None:
        """Compare the copies not compared yet with the pattern (waits for the last copy): the first
        call whose timestep differs, else None."""
        self.due = False
        if not self.pending:
            return None
        if self._event is not None:
            self._event.synchronize()
        start, stop = self.verified, self.position
        found = self.copies[start:stop].to(torch.float64)
        want = self.pattern.values[start:stop]
        if torch.equal(found, want):
            self.verified = stop
            return None
        rows = (found != want).any(dim=1).tolist()
        return start + rows.index(True)

    def actual(self) -> list[PlacedCall]:
        """The calls placed so far with their actual timesteps (after :meth:`differing` waited)."""
        rows = self.copies[1 : self.position].tolist()
        calls = [self.first]
        for index, row in enumerate(rows, start=1):
            step, name, _ = self.pattern.calls[index]
            calls.append((step, name, tuple(row)))
        return calls

    def mismatch(self, call: int, what: str) -> Mismatch:
        cached = tuple(c for c in range(call, self.position) if not self.full[c])
        return Mismatch(call, self.pattern.calls[min(call, len(self.pattern) - 1)][0], what, cached)

    def describe_values(self, call: int) -> str:
        found = self.copies[call].to(torch.float64).tolist()
        return f"its timestep was {_show(found)}, where the pattern had {_show(self.pattern.calls[call][2])}"


def replay(calls: Sequence[PlacedCall], dtype: torch.dtype) -> list[tuple[int, int]] | None:
    """The steps and streams the timestep clock gives these calls, None where it would not place
    them all in one generation."""
    clock = StepClock("timestep", None)
    placed = []
    try:
        for _, name, values in calls:
            placed.append(clock.place_by_timestep(values, name, dtype))
    except (NewGeneration, ClockError):
        return None
    return placed


def caller_frames() -> list[FrameType]:
    """The Python stack of the caller, innermost first."""
    frames = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _show(values: Sequence[float]) -> str:
    return f"{values[0]:.6g}" if all(v == values[0] for v in values) else f"{[round(v, 6) for v in values[:4]]}…"
