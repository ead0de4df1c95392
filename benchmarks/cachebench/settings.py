"""What one benchmark run measures: the workload, the samples, the timing, and the sweeps of every
method. One frozen dataclass, filled in by ``cli.parse_args`` (where the defaults per model live)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Sweeps:
    """The settings each method is run at (one configuration per value)."""

    # ScalingCache (ours)
    warmups: tuple[int, ...]  # dynamic schedule, warmup_steps
    ours_eager_variant: bool  # every sweep of ours also with the "eager" inner compiler
    static_intervals: tuple[int, ...]  # static_interval=k, after static_warmup steps
    budgets: tuple[int, ...]  # full_steps=B
    residual_warmups: tuple[int, ...]  # prediction="residual"
    module_warmups: tuple[int, ...]  # granularity="module"
    # peers (thresholds, intervals, skip ranges)
    fbc: tuple[float, ...]
    taylorseer: tuple[int, ...]
    taylorseer_lite: tuple[int, ...]
    magcache: tuple[float, ...]
    pab: tuple[int, ...]
    fastercache: tuple[int, ...]
    seacache: tuple[float, ...]
    dbcache: tuple[float, ...]
    dbcache_ts: tuple[float, ...]
    ts_warmup: int  # TaylorSeerCache: steps before the cache starts
    dbc_warmup: int  # cache-dit DBCache: max_warmup_steps
    compile_peers: str  # "one" (the middle point of each peer sweep), "all" or "none"
    static_warmup: int = 4
    mag_max_skip: int = 3
    dbc_fn: int = 1  # cache-dit Fn_compute_blocks
    dbc_bn: int = 0  # cache-dit Bn_compute_blocks
    only: str | None = None  # regex over "name variant" (the uncached references always run)

    def compiles(self, index: int, count: int) -> bool:
        """Whether the ``index``-th of ``count`` points of a peer sweep also runs compiled."""
        return self.compile_peers == "all" or (self.compile_peers == "one" and index == count // 2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run of the peer benchmark."""

    model: str  # a key of workloads.WORKLOADS
    quick: bool
    steps: int
    samples: int
    batch: int
    guidance: float  # > 1: cond and uncond as separate calls
    seed: int
    rounds: int  # interleaved timing rounds after the measured generation
    alpha: str  # "auto", "ones" or an α file
    ours_compiler: str  # inner compiler of ScalingCache
    peer_backend: str  # torch.compile backend of the uncached and peer compiled runs
    random_weights: bool
    perceptual: bool
    time_stat: str  # "min" | "median"
    out: Path
    sweeps: Sweeps
    argv: tuple[str, ...] = ()  # recorded in the results

    def __post_init__(self) -> None:
        if self.samples % self.batch:
            raise ValueError(
                f"samples must be a multiple of batch (all batches share one shape), but got {self.samples} and "
                f"{self.batch}"
            )
        if self.time_stat not in ("min", "median"):
            raise ValueError(f"time_stat must be 'min' or 'median', but got {self.time_stat!r}")

    @property
    def calls_per_generation(self) -> int:
        """Transformer calls per generation of one batch: two per step under guidance."""
        return 2 * self.steps if self.guidance > 1 else self.steps

    @property
    def compiled_variant(self) -> str:
        """The variant name of a run under ``torch.compile(backend=peer_backend)``."""
        return "inductor" if self.peer_backend == "inductor" else f"compiled ({self.peer_backend})"
