"""Cache state: the preallocated tensors of one stream and the coefficient buffers of a step.

Every tensor here is allocated once (when a generation first needs a stream) and then only
written in place: by the full-step graph (``y_full``, ``dy`` and the statistics table) and by the
host when a step's coefficients are decided (``StepCoefficients``). A run of cached steps
allocates nothing. The tensors are marked as static addresses
(``torch._dynamo.mark_static_address``), the contract CUDA-graph capture needs; the cached-step
graph only reads them.

A stream's buffers carry what they hold: ``last_full_step`` (the step whose output is ``y_full``)
and ``has_difference`` (whether ``dy`` was refreshed from two real full steps); a second-order
layout's also ``previous_full_step`` and ``has_second_difference`` (whether ``dy_prev`` is a ``dy``
that a full step in its unit's schedule refreshed from two real full steps). The dispatcher never
predicts from a stream whose buffers were not written at the steps the prediction reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sc_compile.contract import STAT_COLUMNS, PointLayout, buffers_per_point, y_full_index
from sc_compile.runtime.registry import REGISTRY

__all__ = ["PointLayout", "StatePool", "StepCoefficients", "StreamState", "state_zeros"]


def state_zeros(*shape: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """A zero tensor for state that outlives the call that allocates it, made outside inference mode.

    A tensor allocated under ``torch.inference_mode()`` can never be updated in place outside it,
    and this state is written by calls in any mode (a generation under ``inference_mode``, the next
    one under ``no_grad``, pooled buffers reused by both) and read by ``report()`` in none. A normal
    tensor may be updated in place under inference mode and outside it alike.
    """
    with torch.inference_mode(False):
        return torch.zeros(shape, dtype=dtype, device=device)


def _static(tensor: torch.Tensor) -> torch.Tensor:
    torch._dynamo.mark_static_address(tensor, guard=False)
    return tensor


class StreamState:
    """Preallocated state of one stream: two buffers per cache point and the statistics table,
    laid out as :mod:`sc_compile.contract` says (full buffers or a point's sketch)."""

    def __init__(self, layout: PointLayout, cache_dtype: torch.dtype | None):
        self.buffers: list[torch.Tensor] = []
        self.second_order = layout.second_order
        for point in layout.points:
            shape, dtype = point.buffer_shape(), point.buffer_dtype(cache_dtype)
            for _ in range(buffers_per_point(layout.second_order)):  # y_full, dy (, dy_prev)
                self.buffers.append(_static(state_zeros(*shape, dtype=dtype, device=layout.device)))
        # stats: [P, len(STAT_COLUMNS)] float32, written by every full step.
        self.stats = _static(
            state_zeros(layout.num_points, len(STAT_COLUMNS), dtype=torch.float32, device=layout.device)
        )
        self.forget()
        REGISTRY.add_state(self)  # the live-state accounting tests read

    def y_full(self, point: int) -> torch.Tensor:
        return self.buffers[y_full_index(point, self.second_order)]

    def dy(self, point: int) -> torch.Tensor:
        return self.buffers[y_full_index(point, self.second_order) + 1]

    def dy_prev(self, point: int) -> torch.Tensor:
        """The difference before last (second-order layouts only)."""
        if not self.second_order:
            raise RuntimeError("a first-order layout keeps no difference before last")
        return self.buffers[y_full_index(point, True) + 2]

    def forget(self) -> None:
        """Mark the buffers as holding nothing (their values are never read again)."""
        self.last_full_step: int | None = None
        self.has_difference = False
        # The full step before the last one, and whether the dy it wrote (now dy_prev) may be read.
        self.previous_full_step: int | None = None
        self.has_second_difference = False
        self.last_full_synced = False

    def record_full(self, step: int, in_sync: bool) -> None:
        """The buffers were written by a full ``step`` (``in_sync``: with its unit's coefficients).
        ``dy_prev`` now holds the old ``dy``: readable only when the full step that wrote it ran in
        its unit's schedule and had a difference."""
        self.has_second_difference = self.has_difference and self.last_full_synced
        self.previous_full_step = self.last_full_step
        self.has_difference = self.last_full_step is not None
        self.last_full_step = step
        self.last_full_synced = in_sync

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers) + self.stats.numel() * 4

    def zero_(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()
        self.stats.zero_()


class StepCoefficients:
    """The per-point coefficient and refresh vectors of a step, in preallocated device memory.

    ``values[0]`` is the coefficient c and ``values[1]`` the refresh factor (SPEC §1); with
    ``second_order``, ``values[2]`` is the coefficient c₂ of the difference before last. ``write``
    copies a decision's host values in place: no allocation, no device→host read.
    """

    def __init__(self, num_points: int, device: torch.device, second_order: bool = False):
        rows = 3 if second_order else 2
        self.values = _static(state_zeros(rows, num_points, dtype=torch.float32, device=device))  # [2 or 3, P]
        self.written: object = None

    @property
    def second_order(self) -> bool:
        return self.values.shape[0] == 3

    def write(
        self,
        coef: Sequence[float],
        refresh: Sequence[float],
        token: object,
        coef2: Sequence[float] | None = None,
    ) -> None:
        """Write ``coef``, ``refresh`` (and ``coef2``, 0 where ``None``) unless ``token`` (the
        decision) is already written. A first-order buffer refuses a nonzero ``coef2``."""
        if not self.second_order and coef2 is not None and any(c != 0.0 for c in coef2):
            raise RuntimeError("ScalingCache: a second coefficient for a first-order layout; this is a bug")
        if token is self.written and token is not None:
            return
        if self.values.device.type == "cpu":
            target = self.values
        else:
            # Host staging (a host→device copy, never a read back). On CUDA it is pinned and copied
            # without blocking: a copy from pageable memory waits for the stream (a sync per step).
            # The caching host allocator reuses a pinned block only after its copy has run.
            pinned = self.values.device.type == "cuda"
            target = torch.empty(self.values.shape, dtype=torch.float32, pin_memory=pinned)
        array = target.numpy()  # a view of host memory
        array[0, :] = coef
        array[1, :] = refresh
        if self.second_order:
            array[2, :] = 0.0 if coef2 is None else coef2
        if target is not self.values:
            self.values.copy_(target, non_blocking=target.is_pinned())
        self.written = token

    @property
    def coef(self) -> torch.Tensor:
        return self.values[0]

    @property
    def refresh(self) -> torch.Tensor:
        return self.values[1]

    @property
    def coef2(self) -> torch.Tensor | None:
        """The second coefficient vector (``None`` for a first-order layout)."""
        return self.values[2] if self.second_order else None


class StatePool:
    """Stream states a finished generation handed back, reused by the next one (same layout).

    A pool belongs to one session (one module under one ``torch.compile``) and dies with it. It
    keeps only the states the last finished generation handed back (the layouts of one size), so
    sequential generations reuse one set of buffers and a change of size does not keep the old
    set. A stream about to be allocated counts the pool's states against ``max_cache_bytes``; they
    are dropped rather than let the total exceed it (``Generation.check_fits``).
    """

    def __init__(self) -> None:
        self._free: dict[tuple[object, ...], list[StreamState]] = {}

    def has(self, key: tuple[object, ...]) -> bool:
        """Whether a state of this layout is free to reuse (taking it allocates nothing)."""
        return bool(self._free.get(key))

    def take(self, key: tuple[object, ...], layout: PointLayout, cache_dtype: torch.dtype | None) -> StreamState:
        free = self._free.get(key)
        state = free.pop() if free else StreamState(layout, cache_dtype)
        state.forget()
        return state

    def keep(self, returned: Sequence[tuple[tuple[object, ...], StreamState]]) -> None:
        """Keep the states a finished generation handed back, in place of what the pool held."""
        if not returned:
            return
        free: dict[tuple[object, ...], list[StreamState]] = {}
        for key, state in returned:
            state.forget()
            free.setdefault(key, []).append(state)
        self._free = free

    @property
    def nbytes(self) -> int:
        """The bytes of the free states the pool holds."""
        return sum(state.nbytes for states in self._free.values() for state in states)

    def clear(self) -> None:
        self._free.clear()
