"""A hand-written loop's calls placed by count once its pattern is known, checked without a read per call.

Without a pipeline or a context, the timestep clock (``step_clock.py``) places a call by its
timestep: one device→host read per call, a sync on a GPU. A loop repeats itself: when a
timestep-placed generation has finished (the next call went back to its first timestep), the next
generation is expected to repeat its calls: the same timesteps, the same calls per step, the same
stream names (:class:`LoopPattern`). Its first call is still read (the check that the pattern starts
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
from collections.abc import Sequence

import torch

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
    """The calls of one counted generation after its first: their placement by position, the
    asynchronous copies of their timesteps, and the comparison with the pattern."""

    def __init__(self, pattern: LoopPattern, device: torch.device, previous: LoopCheck | None = None):
        self.pattern = pattern
        self.device = device
        pinned = device.type == "cuda"
        if previous is not None and previous.pattern is pattern and previous.device == device:
            self.copies = previous.copies  # every copy into it was waited for before this generation
        else:
            self.copies = torch.empty((len(pattern), pattern.width), dtype=pattern.dtype, pin_memory=pinned)
        self._event: torch.cuda.Event | None = None
        self.position = 1  # the next call; the first was read
        self.verified = 1  # calls before this one matched the pattern
        self.full = [True] + [False] * (len(pattern) - 1)
        self.due = False  # a full step ran since the last comparison

    @property
    def complete(self) -> bool:
        """Every call of the pattern was placed: the next call starts the next generation."""
        return self.position >= len(self.pattern)

    @property
    def pending(self) -> bool:
        return self.verified < self.position

    def expected(self) -> PlacedCall:
        return self.pattern.calls[self.position]

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
        return None

    def ran(self, full: bool) -> None:
        """The call placed last ran (in full or cached)."""
        self.full[self.position - 1] = full
        self.due = self.due or full

    def check(self) -> Mismatch | None:
        """Compare the copies not compared yet with the pattern (waits for the last copy)."""
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
        rows = (found != want).any(dim=1)
        first = start + next(i for i, differs in enumerate(rows.tolist()) if differs)
        got, had = found[first - start].tolist(), want[first - start].tolist()
        return self.mismatch(first, f"its timestep was {_show(got)}, where the pattern had {_show(had)}")

    def mismatch(self, call: int, what: str) -> Mismatch:
        cached = tuple(c for c in range(call, self.position) if not self.full[c])
        return Mismatch(call, self.pattern.calls[min(call, len(self.pattern) - 1)][0], what, cached)


def _show(values: Sequence[float]) -> str:
    return f"{values[0]:.6g}" if all(v == values[0] for v in values) else f"{[round(v, 6) for v in values[:4]]}…"
