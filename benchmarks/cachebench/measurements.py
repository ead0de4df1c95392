"""What the benchmark measures per configuration, and the record it keeps (``Result``).

* full evaluations and block-Linear multiply-adds: ``LinearCounter`` wraps every block
  ``nn.Linear.forward`` of an eager configuration *below* the peer's hooks, so a skipped module is
  not counted; ScalingCache is counted from ``sc_compile.report`` (``counts_from_reports``);
* peak RSS growth (``PeakRSS``: Linux ``VmHWM`` after ``echo 5 > /proc/self/clear_refs``;
  tracemalloc cannot see torch's CPU allocations);
* Dynamo graphs, graph breaks and frames (``dynamo_snapshot`` / ``dynamo_delta``);
* the timing statistic, compile time and speed-ups (``summarize_times``, ``set_speedups``), which
  ``--render`` recomputes from a results JSON;
* PSNR / SSIM and the EfficientNet-Lite0 feature distance against the reference (``fidelity``).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from typing import Any


@dataclasses.dataclass
class Result:
    """One configuration's measurements; a row of the results JSON (field names are its keys)."""

    name: str
    method: str
    param: str
    variant: str
    kind: str
    status: str = "ok"
    error: str | None = None
    calls_per_gen: float = 0.0
    full_evals_per_gen: float | None = None
    macs_frac: float | None = None
    count_source: str = ""
    time_s: float | None = None
    time_all: list[float] = dataclasses.field(default_factory=list)
    warmup_s: float | None = None
    compile_s: float | None = None
    speedup_vs_inductor: float | None = None
    speedup_vs_eager: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    perceptual: float | None = None  # EfficientNet-Lite0 feature distance (perceptual.py), not LPIPS
    twin_max_abs_diff: float | None = None
    repeat_max_abs_diff: float | None = None
    graphs: int = 0
    graph_breaks: int = 0
    frames: int = 0
    recompiles: int = 0
    peak_rss_mib: float | None = None
    warmup_peak_rss_mib: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}|{self.variant}"


# --------------------------------------------------------------------------- memory


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no field {field!r}")


class PeakRSS:
    """Peak RSS growth over a block, from VmHWM after resetting it (Linux >= 4.0); NaN where the
    high-water mark cannot be reset."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.ok = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.ok = False
        self.start = rss_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = rss_kib("VmHWM")
        self.delta_mib = (self.peak - self.start) / 1024 if self.ok else float("nan")


# --------------------------------------------------------------------------- compute


class LinearCounter:
    """Counts block-Linear multiply-adds per transformer call (eager configurations only)."""

    def __init__(self) -> None:
        self.on = False
        self.macs = 0
        self.per_call: list[int] = []

    def install(self, transformer: Any) -> None:
        import torch

        # the block stacks: ModuleList children of the transformer (Flux: transformer_blocks and
        # single_transformer_blocks; Wan: blocks)
        stacks = tuple(f"{n}." for n, m in transformer.named_children() if isinstance(m, torch.nn.ModuleList))
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear) or not name.startswith(stacks):
                continue
            original = module.forward

            def forward(x: Any, *args: Any, _orig: Any = original, _out: int = module.out_features, **kw: Any) -> Any:
                if self.on:
                    self.macs += x.numel() * _out
                return _orig(x, *args, **kw)

            module.forward = forward

        def pre(_m: Any, _a: Any) -> None:
            self.macs = 0

        def post(_m: Any, _a: Any, _o: Any) -> None:
            if self.on:
                self.per_call.append(self.macs)

        transformer.register_forward_pre_hook(pre)
        transformer.register_forward_hook(post)

    def start(self) -> None:
        """Count from now on (the measured generation), forgetting the warm-up's calls."""
        self.on, self.per_call = True, []


def counts_from_linears(
    result: Result, per_call: list[int], full_macs_per_call: int, calls_per_generation: int, batches: int
) -> None:
    """Full evaluations (calls whose block-Linear MACs reach a full call's) and the MACs fraction."""
    result.full_evals_per_gen = sum(1 for m in per_call if m >= full_macs_per_call) / batches
    result.macs_frac = sum(per_call) / (full_macs_per_call * calls_per_generation * batches)
    result.count_source = "Linear counters (eager)"
    if len(per_call) != calls_per_generation * batches:
        result.extra["warning"] = (
            f"{len(per_call)} transformer calls counted, expected {calls_per_generation * batches}"
        )


def counts_from_reports(result: Result, reports: list[Any], calls_per_generation: int, batches: int) -> None:
    """Full evaluations from one ``sc_compile.report`` per batch, and the last batch's step pattern."""
    fulls = [sum(len(s.full_steps) for s in rep.streams) for rep in reports]
    calls = [rep.num_steps * len(rep.streams) for rep in reports]
    result.full_evals_per_gen = sum(fulls) / len(reports)
    result.macs_frac = sum(fulls) / sum(calls)
    result.count_source = "sc_compile.report"
    rep = reports[-1]
    result.extra.update(
        steps="".join("F" if s in rep.full_steps else "." for s in range(rep.num_steps)),
        alpha_source=rep.alpha_source,
        num_points=rep.num_points,
        buffer_bytes=rep.buffer_bytes,
        report_calls=sum(calls) / len(reports),
    )
    if sum(calls) != calls_per_generation * batches:
        result.extra["warning"] = f"report covers {sum(calls)} calls, expected {calls_per_generation * batches}"


def adopt_twin_counts(result: Result, twin: Result, max_abs_diff: float) -> None:
    """A compiled peer (no Linear counters under compile) takes its eager twin's counts; how far
    the two outputs differ is recorded so that a changed decision would show."""
    result.twin_max_abs_diff = max_abs_diff
    if result.full_evals_per_gen is None:
        result.full_evals_per_gen, result.macs_frac = twin.full_evals_per_gen, twin.macs_frac
        result.count_source = f"eager twin (outputs differ by {max_abs_diff:.1e})"


# --------------------------------------------------------------------------- Dynamo


def dynamo_snapshot() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["ok"]),
        "breaks": int(sum(counters["graph_break"].values())),
    }


def dynamo_delta(before: dict[str, int]) -> dict[str, int]:
    after = dynamo_snapshot()
    return {k: after[k] - before[k] for k in after}


# --------------------------------------------------------------------------- time


def summarize_times(result: Result, time_stat: str) -> None:
    """``time_s`` (the ``time_stat`` of the timed generations), the min and median beside it, and
    the compile time (warm-up generation minus ``time_s``)."""
    result.time_s = (min if time_stat == "min" else statistics.median)(result.time_all)
    result.extra["time_median_s"] = statistics.median(result.time_all)
    result.extra["time_min_s"] = min(result.time_all)
    if result.warmup_s is not None:
        result.compile_s = max(0.0, result.warmup_s - result.time_s)


def set_speedups(results: list[Result]) -> None:
    """Speed-ups against the uncached compiled run (×ind) and the uncached eager run."""
    compiled = next((r for r in results if r.kind == "uncached" and r.variant != "eager"), None)
    eager = next((r for r in results if r.kind == "uncached" and r.variant == "eager"), None)
    for r in results:
        if r.time_s:
            r.speedup_vs_inductor = compiled.time_s / r.time_s if compiled and compiled.time_s else None
            r.speedup_vs_eager = eager.time_s / r.time_s if eager and eager.time_s else None


# --------------------------------------------------------------------------- fidelity


def fidelity(result: Result, output: Any, reference: Any, reference_features: list[Any] | None) -> None:
    """PSNR, SSIM and (given the reference's features) the feature distance against ``reference``."""
    import sc_compile.metrics as metrics

    result.psnr = metrics.psnr(output, reference)
    result.ssim = metrics.ssim(output, reference)
    if reference_features is not None:
        from .perceptual import feature_distance

        result.perceptual = feature_distance(output, reference, reference_features)
