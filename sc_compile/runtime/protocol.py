"""The runtime's protocol: what the one dispatcher (``dispatcher.py``) needs of the two graph kinds.

A compiled graph's call is dispatched the same way whatever Dynamo made of the model (guards,
side calls, placement → decision → coefficients, bookkeeping and records); the two kinds differ
only in

* their state in a generation, a :class:`StepState`: :class:`~sc_compile.runtime.generations.LayoutState`
  (one compiled cache layout: its streams' buffers, its decisions) or
  :class:`~sc_compile.runtime.per_block.BlockGraphsState` (every per-block graph's units, one
  decision per step);
* how a step runs, a :class:`StepRunner`: the compiled full-step / cached-step graphs
  (:class:`~sc_compile.runtime.dispatch.ScalingCacheRuntime`), or the graph followed by the eager
  cache update / the eager prediction of its outputs
  (:class:`~sc_compile.runtime.per_block.BlockGraphRuntime`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, Literal, Protocol

import torch

from sc_compile.decision.decisions import Decisions
from sc_compile.decision.schedule import StepDecision
from sc_compile.runtime.state import StepCoefficients, StreamState

__all__ = ["Placement", "PointCount", "StepCall", "StepKind", "StepRunner", "StepState"]

# The coefficients a full step runs with: the step's decision (in sync with its unit's schedule),
# or, for buffers that missed the unit's last full step, "next" (right after their own last full
# step: refresh 1) or "first" (nothing to predict from: c = 0, refresh 0).
StepKind = StepDecision | Literal["first", "next"]


@dataclasses.dataclass
class Placement:
    """Where a call sits, and how to learn its step's timestep and sigma (each may read once)."""

    step: int
    stream: int
    timestep: Callable[[], float | None]
    sigma: Callable[[], float | None] = lambda: None
    # Whether this call counts as a call of the model in the generation's record (per-block
    # graphs count a forward once, when it starts).
    counts_call: bool = True


class PointCount(Protocol):
    """What the report reads of a state's layout."""

    @property
    def num_points(self) -> int: ...


class StepState(Protocol):
    """A generation's state for one kind of graph (it stands in ``Generation.layouts``)."""

    key: tuple[object, ...]
    alpha_source: str
    process_group: Any
    world_size: int
    num_allreduces: int
    decisions: Decisions

    @property
    def layout(self) -> PointCount: ...

    @property
    def nbytes(self) -> int: ...

    def buffers(self, stream: int, unit: Hashable) -> StreamState | None:
        """The buffers of ``unit`` in ``stream`` (allocated where the layout is known; ``None``
        where they are made from the outputs of the unit's first full step)."""
        ...

    def coefficients(self, stream: int, kind: StepKind, device: torch.device) -> StepCoefficients:
        """The coefficient and refresh buffers a step of ``kind`` runs with, on ``device``."""
        ...

    def synced_full(self, stream: int, step: int, unit: Hashable) -> None:
        """``unit`` ran the unit's full ``step`` with the step's coefficients: its statistics count."""
        ...

    def release(self) -> list[tuple[tuple[object, ...], StreamState]]:
        """Give up every buffer (the generation finished): (layout key, state) pairs for the pool."""
        ...


@dataclasses.dataclass
class StepCall:
    """One call's step, as the dispatcher hands it to the runner."""

    state: StepState
    step: int
    stream: int
    unit: Hashable
    # The unit's buffers (``None``: a per-block unit's first full step makes them).
    buffers: StreamState | None
    # The step's coefficient buffers on a device (the runner knows where its values live).
    coefficients: Callable[[torch.device], StepCoefficients]


class StepRunner(Protocol):
    """How a step runs: the one thing in which the two graph kinds differ."""

    def run_full(self, call: StepCall, args: tuple[Any, ...]) -> tuple[Any, StreamState]:
        """Run the graph in full and update the unit's buffers; returns the outputs and the buffers."""
        ...

    def run_cached(self, call: StepCall, args: tuple[Any, ...]) -> Any:
        """The outputs predicted from the unit's buffers (``call.buffers`` is set)."""
        ...
