"""CUDA graphs: the compiled full-step and cached-step graphs replayed as captured CUDA graphs.

``mode="reduce-overhead"`` (or ``"max-autotune"``), or ``options={"triton.cudagraphs": True}``, asks
Inductor to run its graphs as CUDA graphs. Under ``backend="scalingcache"`` the two specialised
step graphs of a whole-model graph are then compiled by Inductor *without* its own CUDA graphs and
each is wrapped in a :class:`CudaGraphStep`, a capture of our own. Why not Inductor's cudagraph
trees (see also the README, "CUDA graphs"):

* A tree's outputs live in its memory pool and a later replay of the same graph overwrites them;
  trees take every call of the compiled function for a new iteration. Guidance run as separate
  cond/uncond calls replays the same cached-step graph twice before either output is read, so the
  cond output would be overwritten (trees raise on such an access). Here every output is cloned
  out of the graph's memory right after its replay: the caller owns what it gets.
* The step graphs are compiled in a tracing context of their own (``backends/inner_compiler.py``),
  outside the one Dynamo built: Inductor would not know which inputs are parameters and would copy
  every parameter into a static input at every replay. Here an input is read in place when it has a
  static address (parameters and buffers, which Dynamo marks, and the cache state, which
  ``runtime/state.py`` marks), and copied into a static input of ours otherwise.
* The cache state is one set of buffers per stream (cond, uncond), so one step graph runs on several
  sets of static addresses. Here each set gets its own capture, up to :data:`MAX_CAPTURES` per step
  graph, all in one memory pool per compiled graph; the coefficient vectors of a step (a new buffer
  per generation, ``2 × points`` floats) are copied, not keyed.

What a call does, per step graph and *key* (the addresses of the in-place inputs, and shape,
stride and dtype of every input): the first call with a key runs the compiled graph as it is
(warm-up: Triton autotuning and lazy initialisation run outside any capture), the second captures
it (nothing executes during a capture) and replays it, every later call copies the copied inputs
into the static ones, replays and clones the outputs. A capture never runs the graph twice for one
call, so the full step's in-place state updates run exactly once per call. Past
:data:`MAX_CAPTURES` keys, or when a capture fails, the graph runs uncaptured with one warning.
A graph whose inputs are not all on one CUDA device is never captured (one log line).

The memory a capture holds (its pool, its static inputs) is measured at capture
(:attr:`GraphPool.nbytes`); the check of a new stream against ``max_cache_bytes`` counts it
(``sc_compile/memory.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch._dynamo.utils import get_static_address_type
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

__all__ = ["CAPTURES", "MAX_CAPTURES", "CudaGraphStep", "GraphPool", "cudagraphs_requested"]

# Captures of one step graph (sets of state addresses, input layouts): streams of one generation
# (cond, uncond), the scratch state of uncached calls, parameters moved by ``model.to()``.
MAX_CAPTURES = 8

CUDAGRAPHS_OPTION = "triton.cudagraphs"


def cudagraphs_requested(config_patches: dict[str, Any]) -> bool:
    """Whether the mode or options ask for CUDA graphs (else Inductor's global setting, read only)."""
    if CUDAGRAPHS_OPTION in config_patches:
        return bool(config_patches[CUDAGRAPHS_OPTION])
    return bool(torch._inductor.config.triton.cudagraphs)


class Captured(Protocol):
    """A captured graph: ``replay()`` runs it on its static inputs and writes ``outputs`` (the
    graph's output structure, whose tensors live in memory every replay overwrites); ``nbytes``:
    the memory the capture added to its pool."""

    outputs: Any
    nbytes: int

    def replay(self) -> None: ...


class GraphPool:
    """The memory pool of one compiled graph's captures (full and cached step), and its bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.handle: Any = None
        self.nbytes = 0  # measured at each capture: pool segments and static inputs
        self.num_captures = 0
        # Captures in one pool share memory for their intermediates: one replay at a time, each
        # followed by the copies of its outputs (generations in threads of their own included).
        self.lock = threading.Lock()


class _CudaCaptured:
    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any, nbytes: int):
        self.graph = graph
        self.outputs = outputs
        self.nbytes = nbytes  # the segments the capture added to the pool

    def replay(self) -> None:
        self.graph.replay()


def capture_cuda(fn: Callable[..., Any], static_args: Sequence[Any], pool: GraphPool) -> Captured:
    """Capture ``fn(*static_args)`` into a CUDA graph in ``pool`` (nothing executes)."""
    if pool.handle is None:
        pool.handle = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool.handle):
        # Read after the context's empty_cache(): what the capture reserves is what it adds.
        before = torch.cuda.memory_reserved(pool.device)
        outputs = fn(*static_args)
    return _CudaCaptured(graph, outputs, max(torch.cuda.memory_reserved(pool.device) - before, 0))


# Capture function per device type. Tests add one for "cpu" that emulates a CUDA graph's
# semantics (static inputs, outputs in reused storage) to check this module's bookkeeping.
CAPTURES: dict[str, Callable[[Callable[..., Any], Sequence[Any], GraphPool], Captured]] = {"cuda": capture_cuda}


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.dtype, tuple(t.shape), t.stride())


class _Entry:
    def __init__(self, captured: Captured, static_args: list[Any], copied: list[int]):
        self.captured = captured
        self.static_args = static_args
        self.copied = copied  # argument positions copied into static_args at every call


class CudaGraphStep:
    """A compiled step graph, replayed as a CUDA graph (see the module docstring).

    ``copied``: argument positions always copied into static inputs even when their address is
    static (the step's coefficient vectors: a new buffer per generation). Every other tensor with
    a static address is read in place and is part of the key.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        pool: GraphPool,
        copied: frozenset[int] = frozenset(),
        max_captures: int = MAX_CAPTURES,
    ):
        self.fn = fn
        self.name = name
        self.pool = pool
        self.copied = copied
        self.max_captures = max_captures
        self._capture = CAPTURES.get(pool.device.type)
        self._entries: dict[tuple[Any, ...], _Entry | None] = {}  # None: warmed up, not captured yet
        self._failed: set[tuple[Any, ...]] = set()
        self._warned = False
        self.num_replays = 0
        self.num_uncaptured = 0

    @property
    def num_captures(self) -> int:
        return sum(1 for e in self._entries.values() if e is not None)

    def _in_place(self, position: int, arg: Any) -> bool:
        return position not in self.copied and get_static_address_type(arg) is not None

    def _key(self, args: Sequence[Any]) -> tuple[Any, ...]:
        key: list[Any] = []
        for position, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                address = arg.data_ptr() if self._in_place(position, arg) else None
                key.append((address, *_layout(arg)))
            else:
                key.append(arg)
        return tuple(key)

    def _uncaptured(self, args: Sequence[Any], why: str) -> Any:
        if not self._warned:
            self._warned = True
            log.warning("ScalingCache: the %s graph runs without CUDA graphs from now on: %s", self.name, why)
        self.num_uncaptured += 1
        return self.fn(*args)

    def __call__(self, *args: Any) -> Any:
        if self._capture is None:
            return self._uncaptured(args, f"CUDA graphs need a CUDA device, the graph runs on {self.pool.device}")
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        if devices != {self.pool.device}:
            return self._uncaptured(args, f"its inputs are on {sorted(map(str, devices))}, not all on one device")
        key = self._key(args)
        if key not in self._entries:
            if len(self._entries) >= self.max_captures:
                return self._uncaptured(
                    args,
                    f"{self.max_captures} captures (sets of state addresses and input layouts) already exist; "
                    "calls with a new one run uncaptured",
                )
            self._entries[key] = None  # warm-up: Triton autotuning and lazy initialisation, uncaptured
            self.num_uncaptured += 1
            return self.fn(*args)
        if key in self._failed:
            return self._uncaptured(args, "its capture failed")
        with self.pool.lock:
            entry = self._entries[key]
            if entry is None:
                try:
                    entry = self._entries[key] = self._new_entry(args)
                except Exception as error:  # noqa: BLE001 - reported, and the call runs uncaptured
                    # Never tried again: no further captures of this graph, this key runs uncaptured.
                    self.max_captures = 0
                    self._failed.add(key)
                    return self._uncaptured(args, f"its capture failed ({type(error).__name__}: {error})")
            for position in entry.copied:
                entry.static_args[position].copy_(args[position])
            entry.captured.replay()
            self.num_replays += 1
            outputs, spec = tree_flatten(entry.captured.outputs)
            # The outputs live in the graph's memory, which the next replay in this pool may
            # overwrite: the caller gets copies.
            return tree_unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in outputs], spec)

    def _new_entry(self, args: Sequence[Any]) -> _Entry:
        assert self._capture is not None
        static_args: list[Any] = []
        copied: list[int] = []
        static_input_bytes = 0
        for position, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and not self._in_place(position, arg):
                static = torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device=arg.device)
                static.copy_(arg)
                static_args.append(static)
                copied.append(position)
                static_input_bytes += static.untyped_storage().nbytes()
            else:
                static_args.append(arg)
        captured = self._capture(self.fn, static_args, self.pool)
        self.pool.nbytes += captured.nbytes + static_input_bytes
        self.pool.num_captures += 1
        log.info(
            "ScalingCache: captured the %s graph as a CUDA graph (capture %d of this graph, %d copied inputs)",
            self.name,
            self.num_captures + 1,
            len(copied),
        )
        return _Entry(captured, static_args, copied)
