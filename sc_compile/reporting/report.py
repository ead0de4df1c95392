"""What happened in a generation: which steps were full, the change per step, per stream."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sc_compile.calibration.table import AlphaTable
    from sc_compile.clock.step_clock import StepClock
    from sc_compile.config import ScalingCacheConfig
    from sc_compile.decision.decisions import Decisions


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
    # The pipeline's name of the stream (its cache_context: "cond", "uncond"), "" where unnamed.
    name: str = ""
    # Per step decided by the rule ε > δ, the (ε, δ) it compared; None where decided otherwise.
    rule: tuple[tuple[float, float] | None, ...] = ()

    @property
    def label(self) -> str:
        """The stream's name where the pipeline named it, else its number."""
        return self.name or f"stream {self.stream}"


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
    # How the clock placed the calls where that is not the source alone (a loop's calls placed by
    # count, or why that ended), else "".
    clock_note: str = ""
    # The step count the generation was declared or scheduled with, if any.
    declared_steps: int | None = None
    # Calls of the compiled model in the generation (all streams).
    num_calls: int = 0
    # The ScalingCacheConfig the generation ran with, as ScalingCacheConfig.to_dict() writes it
    # (versioned; ScalingCacheConfig.from_dict reads it back).
    config: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    # The cached steps whose prediction read the difference before last (the α table's
    # two-difference coefficients: ``y_full + c₁·dy + c₂·dy_prev``); empty for first order.
    second_difference_steps: tuple[int, ...] = ()
    # Which schedule placed the full steps and why, in one line (``""``: none was built).
    schedule: str = ""
    # Above the table's calibrated step count, whether the cached steps predicted with its mapped
    # coefficients or with α = 1, as its finer-grid check decided (``""``: no check applied).
    coefficients: str = ""

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
            f"({self.speedup:.2f}x fewer full evaluations)",
            f"  steps:    {marks}  (F full, . cached{', blank: not run here' if others else ''})",
            f"  α:        {self.alpha_source or 'none'}",
            *([f"  schedule: {self.schedule}"] if self.schedule else []),
            *([f"  coefficients: {self.coefficients}"] if self.coefficients else []),
            f"  streams:  {self._describe_streams()}",
            f"  warm-up:  {self.warmup_steps} steps; {self.num_points} cache points",
        ]
        if self.world_size > 1:
            lines.append(
                f"  context parallel: {self.world_size} ranks, decisions synchronised "
                f"({self.num_allreduces} all-reduces of the statistics so far)"
            )
        if self.clock_note:
            lines.append(f"  clock:    {self.clock_note}")
        if self.second_difference_steps:
            lines.append(
                f"  predictor: two differences (y_full + c₁·dy + c₂·dy_prev) at cached steps "
                f"{list(self.second_difference_steps)}; one difference at the others"
            )
        if self.nonfinite_steps:
            lines.append(f"  non-finite changes at steps {list(self.nonfinite_steps)}: the next step ran in full")
        if self.streams:
            lines += [
                "  ē: the step's relative change, measured at full steps, predicted at cached steps",
                "  ε: the change accumulated since the last full step; δ: the threshold, the mean ē of the full "
                "steps so far;",
                "  after the warm-up a step runs in full when ε > δ (or for the reason given)",
            ]
            groups = [self.streams] if self.shared_decisions else [(stream,) for stream in self.streams]
            for group in groups:
                lines.extend(self._step_table(group))
        return "\n".join(lines)

    def _describe_streams(self) -> str:
        if not self.streams:
            return "none ran"
        names = ", ".join(stream.label for stream in self.streams)
        if len(self.streams) == 1:
            return f"1 ({names})"
        together = "one decision per step for all" if self.shared_decisions else "each deciding on its own"
        return f"{len(self.streams)} ({names}), {together}"

    def _step_table(self, group: tuple[StreamReport, ...]) -> list[str]:
        """One row per step: full or cached, ε and δ where the rule decided, each stream's ē, why."""
        width = max(8, *(len(f"ē {stream.label}") for stream in group))
        header = "  step  run     ε        δ        " + " ".join(f"{'ē ' + s.label:<{width}}" for s in group) + "  why"
        rows = [header]
        lead = group[0]
        for step in range(self.num_steps):
            if step not in self.full_steps and step not in self.cached_steps:
                continue  # run by another model (the other expert of a two-transformer pipeline)
            full = step in lead.full_steps or (step in self.full_steps and step not in lead.cached_steps)
            rule = lead.rule[step] if step < len(lead.rule) else None
            epsilon, delta = ("-", "-") if rule is None else (f"{rule[0]:.3g}", f"{rule[1]:.3g}")
            changes = " ".join(
                f"{'-' if step >= len(s.changes) or s.changes[step] is None else f'{s.changes[step]:.3g}':<{width}}"
                for s in group
            )
            reason = lead.reasons[step] if step < len(lead.reasons) else ""
            rows.append(
                f"  {step:4d}  {'full' if full else 'cached':<6}  {epsilon:<7}  {delta:<7}  {changes}  "
                f"{_why(reason, rule)}"
            )
        return rows


def _why(reason: str, rule: tuple[float, float] | None) -> str:
    """A step's reason as the report says it."""
    if reason == "threshold":
        return "ε > δ"
    if reason == "cached":
        return "ε ≤ δ" if rule is not None else "cached"
    return {"warm-up": "warm-up", "final": "a forced final step", "planned": "planned by the budget"}.get(
        reason, reason or "-"
    )


def describe_alpha(option: Any, table: AlphaTable | None, coefficients: Any = None, second_order: bool = False) -> str:
    """Where a compiled model's α came from, for the report: ``option`` is the ``alpha`` option as
    given, ``table`` the table it resolved to (``None``: α = 1), ``coefficients`` the option of
    that name (``None``: fitted where the table has them), ``second_order``: its two-difference
    coefficients are in use."""
    if table is None:
        if isinstance(option, str) and option == "ones":
            return "α = 1 (alpha='ones')"
        return "α = 1 (no α table fits this model; the warning at compile time says how to calibrate one)"
    what = (
        f"{table.num_steps} steps, {table.num_samples} calibration samples"
        + (
            ", fitted per-gap coefficients"
            if table.fitted is not None and str(getattr(coefficients, "value", coefficients)) != "chained"
            else ", chained one-step α"
        )
        + (" with two differences" if second_order else "")
    )
    if option is None:
        return f"the table shipped with sc_compile for {table.model_class or 'this model'} ({what})"
    if isinstance(option, (str, os.PathLike)):
        return f"{os.fspath(option)} ({what})"
    return f"the AlphaTable given as the alpha option ({what})"


# What a report reads of a generation, written as protocols so that this module does not import the
# runtime that builds reports from it (sc_compile.runtime.generations.Generation fits them).


class _StreamRecord(Protocol):
    @property
    def full_steps(self) -> Sequence[int]: ...
    @property
    def cached_steps(self) -> Sequence[int]: ...
    @property
    def reasons(self) -> Mapping[int, str]: ...


class _PointCount(Protocol):
    @property
    def num_points(self) -> int: ...


class _LayoutRecord(Protocol):
    @property
    def decisions(self) -> Decisions: ...
    @property
    def layout(self) -> _PointCount: ...
    @property
    def alpha_source(self) -> str: ...
    @property
    def process_group(self) -> object | None: ...
    @property
    def world_size(self) -> int: ...
    @property
    def num_allreduces(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


class _Session(Protocol):
    @property
    def config(self) -> ScalingCacheConfig: ...


class GenerationRecord(Protocol):
    """The state of a generation a report is built from."""

    @property
    def clock(self) -> StepClock: ...
    @property
    def layouts(self) -> Mapping[tuple[object, ...], _LayoutRecord]: ...
    @property
    def leader(self) -> _LayoutRecord | None: ...
    @property
    def records(self) -> Mapping[int, _StreamRecord]: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def session(self) -> _Session: ...
    @property
    def source(self) -> str: ...
    @property
    def declared_steps(self) -> int | None: ...
    @property
    def clock_note(self) -> str: ...
    @property
    def num_calls(self) -> int: ...


def _stream_changes(
    generation: GenerationRecord, layouts: Sequence[_LayoutRecord], stream: int, num_steps: int
) -> tuple[float | None, ...]:
    """A stream's ē per step: the leader's for a split forward (all pieces took its verdicts),
    otherwise from whichever graph's layout the stream ran on at each step (a stream at its own
    size, or a recompile within the generation, runs on a layout of its own)."""
    sources = [generation.leader] if generation.leader is not None else layouts
    rows = [ls.decisions.stream_changes(stream, num_steps) for ls in sources]
    return tuple(next((row[step] for row in rows if row[step] is not None), None) for step in range(num_steps))


def _stream_rule(
    generation: GenerationRecord, layouts: Sequence[_LayoutRecord], stream: int, num_steps: int
) -> tuple[tuple[float, float] | None, ...]:
    """A stream's (ε, δ) per step where the rule ε > δ decided it, from the layout that decided."""
    sources = [generation.leader] if generation.leader is not None else layouts
    rows = [ls.decisions.stream_rule(stream, num_steps) for ls in sources]
    return tuple(next((row[step] for row in rows if row[step] is not None), None) for step in range(num_steps))


def build_report(generation: GenerationRecord, finished: bool, collective: bool = True) -> GenerationReport:
    """The record of ``generation``. ``collective=False`` (a report asked for on one rank) folds in
    no statistics that would need an all-reduce the other ranks never join."""
    num_steps = generation.clock.step + 1
    layouts = list(generation.layouts.values())
    for layout_state in layouts:
        layout_state.decisions.finish(collective, layout_state.process_group is not None)
    # The layout whose decisions all graphs took (several with a forward split at graph breaks).
    main = generation.leader if generation.leader is not None else (layouts[0] if layouts else None)
    names = {index: name for name, index in generation.clock.stream_names.items()}
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
                name=names.get(stream, ""),
                rule=_stream_rule(generation, layouts, stream, num_steps),
            )
        )
    full = sorted({s for r in streams for s in r.full_steps})
    cached = sorted({s for r in streams for s in r.cached_steps} - set(full))
    second = {
        step
        for ls in layouts
        for r in streams
        for step in ls.decisions.second_difference_steps(r.stream)
        if step in r.cached_steps
    }
    return GenerationReport(
        num_steps=num_steps,
        full_steps=tuple(full),
        cached_steps=tuple(cached),
        streams=tuple(streams),
        # A plan may shorten the warm-up (a budget, a stored plan): the decisions' own.
        warmup_steps=main.decisions.warmup_steps if main is not None else generation.warmup_steps,
        num_points=main.layout.num_points if main is not None else 0,
        alpha_source=main.alpha_source if main is not None else "",
        shared_decisions=generation.session.config.share_decision_across_streams,
        nonfinite_steps=tuple(sorted({s for ls in layouts for s in ls.decisions.nonfinite_steps})),
        buffer_bytes=sum(ls.nbytes for ls in layouts),
        finished=finished,
        world_size=main.world_size if main is not None else 1,
        num_allreduces=sum(ls.num_allreduces for ls in layouts),
        clock=generation.source,
        clock_note=generation.clock_note,
        declared_steps=generation.declared_steps,
        num_calls=generation.num_calls,
        config=generation.session.config.to_dict(),
        second_difference_steps=tuple(sorted(second)),
        schedule=main.decisions.schedule if main is not None else "",
        coefficients=main.decisions.coefficient_note if main is not None else "",
    )
