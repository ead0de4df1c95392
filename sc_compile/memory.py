"""Will the cache state fit? Checked before it is allocated, never by an out-of-memory error later.

Two checks, both against one limit (:func:`cache_bytes_limit`): ``options={'max_cache_bytes': N}``
when given, else on a CUDA device its free memory when the graph is compiled, else none.

* When a graph is compiled: one stream's state must fit (the number of streams is not known yet).
* When a generation allocates a stream: the state of all its streams (every graph of the
  module) must fit; the stream that would exceed the limit is refused before it is allocated, at
  the generation's first step. With CUDA graphs, the memory the module's captures hold
  (:func:`graph_memory_bytes`, measured when each was captured) counts against a declared
  ``max_cache_bytes`` too; the device's free memory already excludes it.

Both errors give the bytes and the options that would fit (computed from the layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from sc_compile.config import Granularity
from sc_compile.contract import CachePointSpec, PointLayout, Statistic, sketch_plan
from sc_compile.errors import CacheMemoryError


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def cache_bytes_limit(max_cache_bytes: int | None, device: torch.device) -> tuple[int | None, str]:
    """The limit the cache state must fit, and where it comes from."""
    if max_cache_bytes is not None:
        return max_cache_bytes, f"options={{'max_cache_bytes': {max_cache_bytes}}}"
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"the free memory of {device} when the graph was compiled"
    return None, ""


def new_stream_limit(max_cache_bytes: int | None, device: torch.device, held: int) -> tuple[int | None, str, int]:
    """The limit a stream about to be allocated is checked against, where it comes from, and the
    bytes already counted against it: a declared budget counts the ``held`` bytes of the
    generation's other streams; a device's free memory (on CUDA, read now) already excludes them."""
    if max_cache_bytes is not None:
        return max_cache_bytes, f"options={{'max_cache_bytes': {max_cache_bytes}}}", held
    limit, _ = cache_bytes_limit(None, device)
    return limit, f"the free memory of {device} now", 0


def graph_memory_bytes(runtimes: Iterable[Any]) -> int:
    """Bytes the CUDA-graph captures of these runtimes' step graphs hold (each memory pool once)."""
    pools: dict[int, Any] = {}
    for runtime in runtimes:
        for step in (getattr(runtime, "full_step", None), getattr(runtime, "cached_step", None)):
            pool = getattr(getattr(step, "fn", None), "pool", None)
            if pool is not None:
                pools[id(pool)] = pool
    return sum(pool.nbytes for pool in pools.values())


def _sketched(point: CachePointSpec) -> CachePointSpec:
    if point.feeds_output or point.sketch is not None:
        return point
    sketch = sketch_plan(point.numel, point.dtype.itemsize, point.shape[-1] if point.shape else 1)
    return dataclasses.replace(point, sketch=sketch)


def fitting_options(
    layout: PointLayout, cache_dtype: torch.dtype | None, granularity: Granularity, streams: int, available: int
) -> list[str]:
    """Options (and their bytes for ``streams`` streams) under which the state would fit ``available``."""
    candidates: list[tuple[str, PointLayout, torch.dtype | None]] = []
    sketched = dataclasses.replace(layout, points=[_sketched(p) for p in layout.points])
    any_sketch = sketched.points != layout.points
    if layout.second_order:
        # One difference: no third buffer per point.
        candidates.append(("predictor_order=1", dataclasses.replace(layout, second_order=False), cache_dtype))
    if any_sketch:
        candidates.append((f"statistic={Statistic.SUBSAMPLE.value!r}", sketched, cache_dtype))
    if any(p.buffer_dtype(cache_dtype).itemsize > 2 for p in layout.points if p.sketch is None):
        candidates.append(("cache_dtype=torch.bfloat16", layout, torch.bfloat16))
        if any_sketch:
            candidates.append(
                (f"statistic={Statistic.SUBSAMPLE.value!r} and cache_dtype=torch.bfloat16", sketched, torch.bfloat16)
            )
    fits = []
    for text, candidate, dtype in candidates:
        needed = streams * candidate.stream_nbytes(dtype)
        if needed <= available:
            fits.append(f"{text} ({format_bytes(needed)})")
    if granularity is Granularity.MODULE:
        fits.append("granularity='block' (fewer cache points; `sc_compile.explain` gives its bytes)")
    return fits


def refusal(
    what: str,
    needed: int,
    limit: int,
    source: str,
    layout: PointLayout,
    cache_dtype: torch.dtype | None,
    granularity: Granularity,
    streams: int,
    available: int,
) -> CacheMemoryError:
    options = fitting_options(layout, cache_dtype, granularity, streams, available)
    advice = (
        "Options that would fit: " + "; ".join(options) + "."
        if options
        else "No ScalingCache option brings it under the limit: use fewer streams (one batched guidance call "
        "instead of separate cond/uncond calls), a smaller input, or a larger limit."
    )
    return CacheMemoryError(
        f"ScalingCache: {what} needs {format_bytes(needed)} of cache buffers ({needed:,} bytes), over the "
        f"limit of {format_bytes(limit)} set by {source}. {advice}"
    )
