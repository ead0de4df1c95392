"""What happened in a generation: which steps were full, the change per step, per stream."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sc_compile.runtime.generations import Generation


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
    # the statistics per full step (counted over the generation).
    world_size: int = 1
    num_allreduces: int = 0
    # Where the step clock came from: "pipeline" (sc_compile.enable), "context"
    # (sc_compile.generation) or "timestep" (the timestep input, no context).
    clock: str = "timestep"
    # The step count the generation was declared or scheduled with, if any.
    declared_steps: int | None = None
    # Calls of the compiled model in the generation (all streams).
    num_calls: int = 0

    @property
    def num_full_steps(self) -> int:
        return len(self.full_steps)

    @property
    def steps_run(self) -> int:
        """Steps at which this model ran (full or cached): fewer than ``num_steps`` for one expert of a
        pipeline whose steps are shared between two denoisers (the other expert ran the rest)."""
        return len(set(self.full_steps) | set(self.cached_steps))

    @property
    def speedup(self) -> float:
        """Steps run per full step: the ideal speed-up in full transformer evaluations."""
        return self.steps_run / self.num_full_steps if self.full_steps else float("inf")

    def __str__(self) -> str:
        marks = "".join(
            "F" if s in self.full_steps else "." if s in self.cached_steps else " " for s in range(self.num_steps)
        )
        others = self.num_steps - self.steps_run
        lines = [
            f"ScalingCache: {self.num_steps} steps{f' ({others} run by another model)' if others else ''}, "
            f"{self.num_full_steps} full, {len(self.cached_steps)} cached "
            f"({self.speedup:.2f}x fewer full evaluations); warm-up {self.warmup_steps}, "
            f"{len(self.streams)} stream(s){' sharing decisions' if self.shared_decisions else ''}, "
            f"{self.num_points} cache points, α: {self.alpha_source}",
            f"  steps: {marks}  (F full, . cached{', blank: not run here' if others else ''})",
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


def _stream_changes(generation: Generation, layouts: list, stream: int, num_steps: int) -> tuple[float | None, ...]:
    """A stream's ē per step: the leader's for a split forward (all pieces took its verdicts),
    otherwise from whichever graph's layout the stream ran on at each step (a stream at its own
    size, or a recompile within the generation, runs on a layout of its own)."""
    sources = [generation.leader] if generation.leader is not None else layouts
    rows = [ls.decisions.stream_changes(stream, num_steps) for ls in sources]
    return tuple(next((row[step] for row in rows if row[step] is not None), None) for step in range(num_steps))


def build_report(generation: Generation, finished: bool, collective: bool = True) -> GenerationReport:
    """The record of ``generation``. ``collective=False`` (a report asked for on one rank) folds in
    no statistics that would need an all-reduce the other ranks never join."""
    num_steps = generation.clock.step + 1
    layouts = list(generation.layouts.values())
    for layout_state in layouts:
        layout_state.decisions.finish(collective, layout_state.process_group is not None)
    # The layout whose decisions all graphs took (several with a forward split at graph breaks).
    main = generation.leader if generation.leader is not None else (layouts[0] if layouts else None)
    streams = []
    for stream in sorted(generation.records):
        record = generation.records[stream]
        streams.append(
            StreamReport(
                stream=stream,
                full_steps=tuple(sorted(record.full_steps)),
                cached_steps=tuple(sorted(record.cached_steps)),
                changes=_stream_changes(generation, layouts, stream, num_steps),
                reasons=tuple(record.reasons.get(step, "") for step in range(num_steps)),
            )
        )
    full = sorted({s for r in streams for s in r.full_steps})
    cached = sorted({s for r in streams for s in r.cached_steps} - set(full))
    return GenerationReport(
        num_steps=num_steps,
        full_steps=tuple(full),
        cached_steps=tuple(cached),
        streams=tuple(streams),
        warmup_steps=generation.warmup_steps,
        num_points=main.layout.num_points if main is not None else 0,
        alpha_source=main.alpha_source if main is not None else "",
        shared_decisions=generation.session.config.share_decision_across_streams,
        nonfinite_steps=tuple(sorted({s for ls in layouts for s in ls.decisions.nonfinite_steps})),
        buffer_bytes=sum(ls.nbytes for ls in layouts),
        finished=finished,
        world_size=main.world_size if main is not None else 1,
        num_allreduces=sum(ls.num_allreduces for ls in layouts),
        clock=generation.source,
        declared_steps=generation.declared_steps,
        num_calls=generation.num_calls,
    )
