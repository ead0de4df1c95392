"""The peers on our held-out samples (issue 22's targets): each peer swept densely enough to have a
configuration at or just below every budget N/2, N/3, N/4, N/5 full evaluations.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers_heldout.py --model demo-flux --steps 50 --per-set 4

The samples are those of ``schedule_ablation.py --plans``: classes 5.. with seeds 3000.. (one each),
guidance 3.0 as the workload runs it, PSNR against the uncached output of the same sample. Every
peer runs eager, built by its ``cachebench.peers`` dataclass on a fresh copy of the transformer per
sample, and is counted as the harness counts it: a transformer call is a full evaluation when every
block Linear ran. Full evaluations are given per step (full calls / calls per step), the unit of
``full_steps`` and ``report.num_full_steps``, so that a peer at B full evaluations and ours at
``full_steps=B`` did the same work.

* TaylorSeerCache (attention outputs) and its lite mode (the whole model), Taylor order 1 and 2: for
  each budget and cache interval, the most initial full steps the budget allows
  (diffusers' schedule: steps 0 … W−1, then W+1, W+1+I, …).
* FirstBlockCache, MagCache (its own calibration on class 0, seed 0; the harness's setting
  ``retention_ratio=0.2, max_skip_steps=3`` and ``0.1, 10``, which reaches N/5), cache-dit DBCache and
  DBCache+TaylorSeer (F1B0, 4 warm-up steps): a geometric grid of thresholds, then bisection between
  the two thresholds around each budget until a configuration lands within half a full evaluation
  below it.

A peer that cannot run on the model (diffusers' hook caches on ``SD3Transformer2DModel``) is
reported with its error. Writes ``benchmarks/results/peers_heldout_<model>_<steps>.{md,json}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from cachebench.cli import parse_args as harness_args  # noqa: E402
from cachebench.harness import Harness  # noqa: E402
from cachebench.peers import (  # noqa: E402
    DBCache,
    DBCacheTaylorSeer,
    FirstBlockCache,
    MagCache,
    Method,
    Peer,
    TaylorSeerCache,
    TaylorSeerCacheLite,
    Uncached,
    calibrate_magcache,
    taylorseer_identifiers,
)
from cachebench.rendering import best_within  # noqa: E402
from cachebench.samples import HELD_OUT_SEED, generate, held_out_samples, held_out_suffix, sample_call  # noqa: E402

from sc_compile.demo.sampling import demo_size  # noqa: E402
from sc_compile.metrics import psnr  # noqa: E402

GUIDANCE = 3.0
MAGCACHE_VARIANTS = ((0.2, 3), (0.1, 10))  # (retention_ratio, max_skip_steps)
DBCACHE_WARMUP = 4
INTERVALS = range(2, 11)


class Runner:
    """The held-out samples, their uncached references, and one configuration's measurement."""

    def __init__(self, model: str, steps: int, per_set: int, seed: int = HELD_OUT_SEED) -> None:
        # The harness builds every peer (``prepare``); its own samples (class 0, seed 0) only serve
        # MagCache's calibration, so nothing is fitted on the held-out samples.
        _, settings = harness_args(
            ["--model", model, "--steps", str(steps), "--samples", "1", "--batch", "1", "--seed", "0"]
            + ["--guidance", str(GUIDANCE), "--no-perceptual"]
        )
        self.harness = Harness(settings)
        self.steps = steps
        self.calls_per_step = self.harness.calls_per_generation // steps
        size = demo_size(type(self.harness.base).__name__)
        self.samples = held_out_samples(per_set, seed)
        self.calls = [sample_call(self.harness.embeddings, size, c, s, steps, GUIDANCE) for c, s in self.samples]
        self.references: list[torch.Tensor] = []
        self.full_macs = 0
        self.module_names = [n for n, _ in self.harness.base.named_modules()]

    def references_and_full_macs(self) -> None:
        for call in self.calls:
            prepared = Uncached().prepare(self.harness)
            assert prepared.linear_counter is not None
            prepared.linear_counter.start()
            self.references.append(generate(prepared.pipe, call))
            self.full_macs = max(self.full_macs, *prepared.linear_counter.per_call)

    def measure(self, method: Method) -> dict[str, Any]:
        """Each sample on a freshly prepared configuration: PSNR and full evaluations per step."""
        psnrs, fulls, macs = [], [], []
        for call, reference in zip(self.calls, self.references, strict=True):
            prepared = method.prepare(self.harness)
            counter = prepared.linear_counter
            assert counter is not None, f"{method.name}: an eager peer is counted by its Linears"
            counter.start()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                images = generate(prepared.pipe, call)
            if len(counter.per_call) != self.harness.calls_per_generation:
                raise RuntimeError(
                    f"{method.name}: {len(counter.per_call)} transformer calls counted, expected "
                    f"{self.harness.calls_per_generation}"
                )
            psnrs.append(psnr(images, reference))
            fulls.append(sum(m >= self.full_macs for m in counter.per_call) / self.calls_per_step)
            macs.append(sum(counter.per_call) / (self.full_macs * len(counter.per_call)))
        return {
            "psnr": statistics.mean(psnrs),
            "full": statistics.mean(fulls),
            "macs": statistics.mean(macs),
            "each_psnr": psnrs,
            "each_full": fulls,
        }


def setting(method: Method) -> str:
    """The configuration's fields that vary within a sweep."""
    fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
    shown = ("threshold", "interval", "warmup_steps", "retention_ratio", "max_skip_steps", "front_blocks")
    parts = []
    for name in shown:
        if name in fields:
            value = fields[name]
            if name == "front_blocks":
                parts.append(f"F{value}B{fields['back_blocks']}")
            else:
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts)


def peer_name(method: Method) -> str:
    """One column of the summary: the method, and the Taylor order where it has one."""
    order = getattr(method, "max_order", None)
    return method.label + ("" if order is None else f" order {order}")


def taylorseer_full(steps: int, warmup: int, interval: int) -> int:
    """Full steps of diffusers' TaylorSeer schedule: 0 … warmup − 1, then warmup + 1 + j·interval."""
    return warmup + max(0, (steps - 2 - warmup) // interval + 1)


def taylorseer_settings(steps: int, budgets: list[int]) -> list[tuple[int, int]]:
    """(warm-up, interval) pairs: per budget and interval, the most warm-up steps it allows, one pair
    per distinct schedule."""
    schedules: dict[tuple[int, ...], tuple[int, int]] = {}  # full steps -> the first pair giving them
    for budget in budgets:
        for interval in INTERVALS:
            fits = [w for w in range(1, budget + 1) if taylorseer_full(steps, w, interval) <= budget]
            if fits:
                w = max(fits)
                full = tuple(s for s in range(steps) if s < w or (s > w and (s - w - 1) % interval == 0))
                assert len(full) == taylorseer_full(steps, w, interval)
                schedules.setdefault(full, (w, interval))
    return sorted(schedules.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo-flux", "demo-wan", "demo-sd3"], default="demo-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-set", type=int, default=4, help="held-out samples (classes 5.., seeds 3000..)")
    parser.add_argument(
        "--held-out-seed", type=int, default=HELD_OUT_SEED, help="the first held-out seed (another set: 5000)"
    )
    parser.add_argument("--grid", type=int, default=8, help="thresholds in each peer's coarse geometric grid")
    parser.add_argument("--refine", type=int, default=4, help="bisections per budget and threshold sweep")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the markdown of an earlier run")
    args = parser.parse_args()
    if args.render is not None:
        results = json.loads(args.render.read_text())
        command = " ".join(["benchmarks/peers_heldout.py", *results["argv"]])
        args.render.with_suffix(".md").write_text(render(results, command))
        return
    torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    started = time.perf_counter()
    n = args.steps
    budgets = [n // 2, n // 3, n // 4, n // 5]
    runner = Runner(args.model, n, args.per_set, args.held_out_seed)
    runner.references_and_full_macs()
    print(f"{args.model}, {n} steps, {len(runner.samples)} held-out samples, budgets {budgets}", flush=True)
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    peers: dict[str, None] = {}  # in the order they run

    def run(method: Method) -> dict[str, Any] | None:
        name = peer_name(method)
        peers.setdefault(name)
        if name in failed:
            return None
        row: dict[str, Any] = {"peer": name, "setting": setting(method)}
        try:
            row.update(runner.measure(method))
        except Exception as error:  # noqa: BLE001  (a peer that cannot run here is reported, not fatal)
            failed[name] = f"{type(error).__name__}: {error}".strip()[:400]
            print(f"{name:<36} | {row['setting']:<44} | FAILED: {failed[name][:200]}", flush=True)
            return None
        rows.append(row)
        print(f"{name:<36} | {row['setting']:<44} | {row['psnr']:6.2f} dB @ {row['full']:5.2f} full", flush=True)
        return row

    # TaylorSeer, attention outputs and lite mode, order 1 and 2.
    identifiers = taylorseer_identifiers(runner.module_names)
    for order in (1, 2):
        for warmup, interval in taylorseer_settings(n, budgets):
            fixed = dict(interval=interval, warmup_steps=warmup, max_order=order)
            run(TaylorSeerCache(cache_identifiers=identifiers, **fixed))
            run(TaylorSeerCacheLite(**fixed))

    # The threshold peers.
    separate_cfg = not runner.harness.workload.batched_guidance
    dbcache = dict(
        front_blocks=1, back_blocks=0, warmup_steps=DBCACHE_WARMUP, num_inference_steps=n, separate_cfg=separate_cfg
    )
    sweeps: list[tuple[Callable[[float], Peer], float, float]] = [
        (lambda t: FirstBlockCache(threshold=t), 0.01, 2.0),
        (lambda t: DBCache(threshold=t, **dbcache), 0.01, 3.0),
        (lambda t: DBCacheTaylorSeer(threshold=t, **dbcache), 0.01, 3.0),
    ]
    magcache: dict[str, Any] = {}
    try:
        ratios, magcache = calibrate_magcache(runner.harness)
    except Exception as error:  # noqa: BLE001  (reported in the results)
        peers.setdefault("MagCache")
        failed["MagCache"] = f"calibration: {type(error).__name__}: {error}".strip()[:400]
        print(f"MagCache FAILED: {failed['MagCache'][:200]}", flush=True)
    else:
        for retention, max_skip in MAGCACHE_VARIANTS:
            fixed_mag = dict(
                max_skip_steps=max_skip, num_inference_steps=n, mag_ratios=tuple(ratios), retention_ratio=retention
            )
            sweeps.append(((lambda t, fixed_mag=fixed_mag: MagCache(threshold=t, **fixed_mag)), 0.003, 3.0))
    for make, low, high in sweeps:
        threshold_sweep(make, low, high, args.grid, args.refine, budgets, run)

    elapsed = time.perf_counter() - started
    results = {
        "model": args.model,
        "steps": n,
        "samples": runner.samples,
        "guidance": GUIDANCE,
        "calls_per_step": runner.calls_per_step,
        "budgets": budgets,
        "peers": list(peers),
        "rows": rows,
        "failed": failed,
        "magcache_calibration": magcache,
        "seconds": elapsed,
        "argv": sys.argv[1:],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"peers_heldout{held_out_suffix(args.held_out_seed)}_{args.model.replace('-', '_')}_{n}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(render(results, " ".join(["benchmarks/peers_heldout.py", *sys.argv[1:]])))
    print(f"done in {elapsed:.0f} s: {args.out / stem}.md", flush=True)


def threshold_sweep(
    make: Callable[[float], Peer],
    low: float,
    high: float,
    grid: int,
    refine: int,
    budgets: list[int],
    run: Callable[[Method], dict[str, Any] | None],
) -> None:
    """A geometric grid of thresholds from ``low`` to ``high`` (stopping once the full evaluations
    fall below half the smallest budget), then per budget up to ``refine`` bisections between the
    two thresholds that bracket it."""
    measured: dict[float, float] = {}
    for i in range(grid):
        threshold = float(f"{low * (high / low) ** (i / (grid - 1)):.3g}")
        row = run(make(threshold))
        if row is None:
            return
        measured[threshold] = row["full"]
        if row["full"] < min(budgets) / 2:
            break
    for budget in budgets:
        for _ in range(refine):
            below = [t for t, f in measured.items() if f <= budget]
            if not below:
                break
            t_below = min(below)  # the most full evaluations within the budget
            lower = [t for t, f in measured.items() if f > budget and t < t_below]
            if not lower or measured[t_below] >= budget - 0.5:
                break
            t_above = max(lower)
            threshold = float(f"{math.sqrt(t_below * t_above):.3g}")
            if threshold in measured:
                break
            row = run(make(threshold))
            if row is None:
                return
            measured[threshold] = row["full"]


def render(results: dict[str, Any], command: str) -> str:
    """The markdown of one run: every configuration, then the best of each peer within each budget."""
    n = results["steps"]
    lines = [
        f"# Peers on the held-out samples — {results['model']}, {n} steps",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python {command}` ({results['seconds']:.0f} s).",
        "",
        f"Samples (class, seed): {[tuple(s) for s in results['samples']]}, guidance {results['guidance']}; PSNR dB "
        "against the uncached output of the same sample (mean over the samples); full = full evaluations per step "
        f"(calls in which every block Linear ran, divided by {results['calls_per_step']} call(s) per step), mean "
        "over the samples: the unit of `full_steps`. MACs: the fraction of an uncached generation's block-Linear "
        "multiply-adds that ran (a peer that caches part of a step, such as TaylorSeer's attention outputs or "
        "DBCache's blocks after the first, still pays for the rest). Every peer eager, built fresh per sample.",
        "",
    ]
    budgets = results["budgets"]
    peers = list(
        dict.fromkeys(results.get("peers", []) + [r["peer"] for r in results["rows"]] + list(results["failed"]))
    )
    lines += [
        "## Best PSNR of each peer within each budget",
        "",
        "The best mean PSNR among the peer's configurations with mean full evaluations ≤ B (its setting and full "
        "evaluations below).",
        "",
        "| peer | " + " | ".join(f"B = {b} (N/{round(n / b)})" for b in budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
    ]
    for peer in peers:
        cells = []
        for budget in budgets:
            best = best_within([r for r in results["rows"] if r["peer"] == peer], budget)
            if peer in results["failed"] and best is None:
                cells.append("failed")
            elif best is None:
                cells.append("—")
            else:
                cells.append(f"**{best['psnr']:.2f}** ({best['setting']}; {best['full']:.2f})")
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    cells = []
    for budget in budgets:
        best = best_within(results["rows"], budget)
        cells.append(f"**{best['psnr']:.2f}** ({best['peer']})" if best else "—")
    lines.append("| best of the peers | " + " | ".join(cells) + " |")
    if results["failed"]:
        lines += ["", "## Peers that did not run", "", "| peer | error |", "| --- | --- |"]
        for peer, error in results["failed"].items():
            lines.append(f"| {peer} | {error.replace('|', '/').replace(chr(10), ' ')} |")
    lines += [
        "",
        "## Every configuration",
        "",
        "| peer | setting | full | MACs | PSNR | each sample's PSNR |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(results["rows"], key=lambda r: (peers.index(r["peer"]), -r["full"])):
        each = ", ".join(f"{p:.2f}" for p in r["each_psnr"])
        cells = (
            f"{r['full']:.2f} | {r['macs']:.3f} | {r['psnr']:.2f}"
            if "macs" in r
            else f"{r['full']:.2f} | | {r['psnr']:.2f}"
        )
        lines.append(f"| {r['peer']} | {r['setting']} | {cells} | {each} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
