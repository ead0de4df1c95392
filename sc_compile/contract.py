"""The state contract between the pass, the lowering, the runtime and ``explain``.

The cond-guarded graph the pass emits takes, after the model's own inputs, these *state inputs*,
in this order (:func:`state_input_names`)::

    sc_is_full                      bool scalar; only the cond graph reads it (the lowering fixes it)
    sc_y_full_0, sc_dy_0, ...       two buffers per cache point, point by point
    sc_coef, sc_refresh             [P] float32: the step's coefficient and dy refresh per point
    sc_stats                        [P, len(STAT_COLUMNS)] float32, written by every full step

A **second-order** layout (an α table whose two-difference coefficients are in use:
``PointLayout.second_order``) has a third buffer per point after ``dy``, ``sc_dy_prev_p``: the ``dy``
the full step before last wrote (each full step shifts ``dy`` into it before refreshing ``dy``),
and a second coefficient vector ``sc_coef2`` [P] after ``sc_refresh``; the prediction is
``y_full + sc_coef·dy + sc_coef2·dy_prev``. Every other layout is exactly the two-buffer one.

A cache point's two buffers hold either the **full** value (``y_full``, ``dy``: shape and dtype
of the point, or ``cache_dtype``) or, for a point no cached step reads, a **sketch**: a fixed
strided subsample of the point's elements, in float32 (:func:`sketch_plan`). The prediction and
the change statistic are linear in the value, so a sketch's buffers evolve exactly as the
subsample of the full buffers would; the statistics of a sketched point are the statistics of its
subsample, which estimate the relative change ē the host decides with (a ratio of L1 norms).

Everything here is node-free: :class:`CachePointSpec` and :class:`PointLayout` are what the
runtime, the memory model and the reports keep; the pass builds them, the lowering and the runtime
read them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import torch

IS_FULL = "sc_is_full"
COEF = "sc_coef"
COEF2 = "sc_coef2"
REFRESH = "sc_refresh"
STATS = "sc_stats"

# Columns of a point's statistics row: for the value ``prev = y_full + coef·dy`` the previous step
# had, ``[|y − prev|₁, |prev|₁, |dy_new|₁, |y|₁]`` — the step's relative change (columns 0/1) and
# the change a later cached step will make relative to the value (columns 2/3).
STAT_COLUMNS = ("change_l1", "prev_l1", "next_change_l1", "value_l1")
CHANGE_L1, PREV_L1, NEXT_CHANGE_L1, VALUE_L1 = range(len(STAT_COLUMNS))


def stats_row(*, change_l1: object, prev_l1: object, next_change_l1: object, value_l1: object) -> list[object]:
    """A point's statistics row in :data:`STAT_COLUMNS` order (scalar tensors, or the FX nodes
    that compute them)."""
    row: list[object] = [None] * len(STAT_COLUMNS)
    row[CHANGE_L1], row[PREV_L1], row[NEXT_CHANGE_L1], row[VALUE_L1] = change_l1, prev_l1, next_change_l1, value_l1
    return row


def buffers_per_point(second_order: bool) -> int:
    """A point's buffers in one stream: ``y_full``, ``dy`` (and ``dy_prev`` for a second-order layout)."""
    return 3 if second_order else 2


def y_full_index(point: int, second_order: bool = False) -> int:
    """The position of point ``point``'s ``y_full`` among a stream's buffers (``dy``, then
    ``dy_prev`` for a second-order layout, follow it)."""
    return buffers_per_point(second_order) * point


# A point's sketch takes at most this share of the bytes of one full value of the point (both
# sketch buffers together) ...
SKETCH_BYTES_SHARE = 0.02
# ... and at most this many elements (the subsample calibration always used for such points) ...
MAX_SKETCH_ELEMENTS = 1 << 16
# ... but at least this many: ē's accuracy depends on the number of elements, not on the share
# (held-out ablation in benchmarks/README.md, "Cache statistic"). The floor binds only for values
# under 204,800 elements in bf16 (102,400 in float32): small models, never the seeds' real sizes.
MIN_SKETCH_ELEMENTS = 1024
SKETCH_DTYPE = torch.float32


class OptionEnum(str, enum.Enum):
    """The base of the options' enums: a member is its value everywhere a string is read. It equals,
    hashes, formats and prints as the value (``f"{Granularity.BLOCK}"`` is ``"block"``, as with
    Python 3.11's ``enum.StrEnum``), so the enums travel through the passes, the runtime, reports
    and messages without turning back into strings; ``repr`` still names the member."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


class Statistic(OptionEnum):
    """What a cache point that no cached step reads keeps for the change statistic and calibration."""

    SUBSAMPLE = "subsample"
    """A fixed strided subsample of the point's elements, in float32: at most 2 % of the bytes of
    one full value and at most 65,536 elements, but at least 1,024 (a point smaller than that
    keeps full buffers): the default."""
    FULL = "full"
    """Both full buffers, as for the points the output reads (the exact statistic)."""


def y_full_name(index: int) -> str:
    return f"sc_y_full_{index}"


def dy_name(index: int) -> str:
    return f"sc_dy_{index}"


def dy_prev_name(index: int) -> str:
    return f"sc_dy_prev_{index}"


def state_input_names(num_points: int, second_order: bool = False) -> list[str]:
    """The state inputs of a cond graph with ``num_points`` cache points, in order."""
    per_point = (y_full_name, dy_name, dy_prev_name)[: buffers_per_point(second_order)]
    buffers = [name(i) for i in range(num_points) for name in per_point]
    return [IS_FULL, *buffers, COEF, REFRESH, *([COEF2] if second_order else []), STATS]


def step_inputs(
    model_inputs: Sequence[object],
    buffers: Sequence[torch.Tensor],
    coef: torch.Tensor,
    refresh: torch.Tensor,
    stats: torch.Tensor,
    coef2: torch.Tensor | None = None,
) -> list[object]:
    """What a specialised step graph is selected from: the model's inputs, then the state inputs
    without ``sc_is_full`` (the lowering fixed it). A step graph's ``input_indices`` index this.
    ``coef2``: a second-order layout's second coefficient vector (``None``: a first-order one)."""
    return [*model_inputs, *buffers, coef, refresh, *([] if coef2 is None else [coef2]), stats]


@dataclasses.dataclass(frozen=True)
class Sketch:
    """Elements ``0, stride, 2·stride, …`` (``elements`` of them) of a point's flattened value."""

    elements: int
    stride: int

    @property
    def stop(self) -> int:
        """The end of the slice ``flat[:stop:stride]`` that takes exactly ``elements`` elements."""
        return (self.elements - 1) * self.stride + 1


def sketch_plan(numel: int, element_size: int, last_dim: int) -> Sketch | None:
    """The subsample of a point with ``numel`` elements of ``element_size`` bytes; ``None`` when a
    sketch would not be smaller than the full buffers (then the point keeps them: exact).

    The stride is coprime with the last (channel) dimension, so the subsample visits every channel
    equally often instead of a fixed comb of them.
    """
    budget = math.floor(SKETCH_BYTES_SHARE * numel * element_size / (2 * SKETCH_DTYPE.itemsize))
    wanted = min(MAX_SKETCH_ELEMENTS, max(budget, MIN_SKETCH_ELEMENTS))
    if wanted < 1 or wanted * SKETCH_DTYPE.itemsize >= numel * element_size:
        return None
    stride = max(1, math.ceil(numel / wanted))
    while math.gcd(stride, max(last_dim, 1)) != 1:
        stride += 1
    elements = min(wanted, (numel - 1) // stride + 1)
    return Sketch(elements, stride)


@dataclasses.dataclass(frozen=True)
class CachePointSpec:
    """A cache point as the runtime sees it: a tensor and its two buffers per stream."""

    index: int
    block: str
    node_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # True when a cached step reads the point's prediction (it reaches the model output).
    feeds_output: bool
    # The subsample its buffers hold instead of the full value (``None``: full buffers).
    sketch: Sketch | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def buffer_shape(self) -> tuple[int, ...]:
        return self.shape if self.sketch is None else (self.sketch.elements,)

    def buffer_dtype(self, cache_dtype: torch.dtype | None) -> torch.dtype:
        return (cache_dtype or self.dtype) if self.sketch is None else SKETCH_DTYPE

    def buffer_nbytes(self, cache_dtype: torch.dtype | None, second_order: bool = False) -> int:
        """Bytes of the point's buffers in one stream (two, or three for a second-order layout)."""
        count = buffers_per_point(second_order)
        return count * math.prod(self.buffer_shape()) * self.buffer_dtype(cache_dtype).itemsize


@dataclasses.dataclass
class PointLayout:
    """The cache points of one graph, where their buffers live, and the layout's fingerprint."""

    points: list[CachePointSpec]
    device: torch.device
    fingerprint: str = ""
    # Each point keeps a third buffer (the difference before last) and the step takes a second
    # coefficient: the α table's two-difference coefficients are in use.
    second_order: bool = False

    @property
    def num_points(self) -> int:
        return len(self.points)

    @property
    def feeds_output(self) -> list[bool]:
        return [p.feeds_output for p in self.points]

    def key(self, cache_dtype: torch.dtype | None) -> tuple[object, ...]:
        """Graphs whose layouts have equal keys can share stream state."""
        buffers = tuple((p.buffer_shape(), p.buffer_dtype(cache_dtype)) for p in self.points)
        order = ("second_order",) if self.second_order else ()
        return (self.fingerprint, buffers, str(self.device), cache_dtype, *order)

    def stream_nbytes(self, cache_dtype: torch.dtype | None) -> int:
        """Bytes of one stream's state: every point's buffers and the statistics table."""
        stats = self.num_points * len(STAT_COLUMNS) * 4
        return sum(p.buffer_nbytes(cache_dtype, self.second_order) for p in self.points) + stats
