"""What happened in a generation: which steps were full, the change per step, per stream."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """One stream's view of a generation (a stream is one call per step: cond, uncond, ...)."""

    stream: int
    full_steps: tuple[int, ...]
    cached_steps: tuple[int, ...]
    # This stream's ē per step: measured at full steps, predicted at cached steps, None where
    # undefined. With shared decisions the step's decision used the mean over streams.
    changes: tuple[float | None, ...]
    reasons: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GenerationReport:
    """The record of the last generation of a compiled model (``sc_compile.report(model)``)."""

    num_steps: int
    full_steps: tuple[int, ...]
    cached_steps: tuple[int, ...]
    streams: tuple[StreamReport, ...]
    warmup_steps: int
    num_points: int
    alpha_source: str
    shared_decisions: bool
    nonfinite_steps: tuple[int, ...] = ()
    # Bytes of cache buffers (all streams) this generation held, on this rank.
    buffer_bytes: int = 0
    finished: bool = False
    # Context parallelism: ranks in the group; decisions are synchronised by one all-reduce of
    # the statistics per full step (counted since the model was compiled).
    world_size: int = 1
    num_allreduces: int = 0

    @property
    def num_full_steps(self) -> int:
        return len(self.full_steps)

    @property
    def speedup(self) -> float:
        """Steps per full step: the ideal speed-up in full transformer evaluations."""
        return self.num_steps / self.num_full_steps if self.full_steps else float("inf")

    def __str__(self) -> str:
        marks = "".join("F" if s in self.full_steps else "." for s in range(self.num_steps))
        lines = [
            f"ScalingCache: {self.num_steps} steps, {self.num_full_steps} full, {len(self.cached_steps)} cached "
            f"({self.speedup:.2f}x fewer full evaluations); warm-up {self.warmup_steps}, "
            f"{len(self.streams)} stream(s){' sharing decisions' if self.shared_decisions else ''}, "
            f"{self.num_points} cache points, α: {self.alpha_source}",
            f"  steps: {marks}  (F full, . cached)",
        ]
        if self.world_size > 1:
            lines.append(
                f"  context parallel: {self.world_size} ranks, decisions synchronised "
                f"({self.num_allreduces} all-reduces of the statistics so far)"
            )
        if self.nonfinite_steps:
            lines.append(f"  non-finite changes at steps {list(self.nonfinite_steps)}: the next step ran in full")
        for stream in self.streams:
            changes = " ".join("-" if c is None else f"{c:.3g}" for c in stream.changes)
            lines.append(f"  stream {stream.stream} change per step: {changes}")
        return "\n".join(lines)
