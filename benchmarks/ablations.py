"""Ablations of ScalingCache's own choices on the trained Flux demo model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablations.py [--samples 8] [--steps 28]

One process, fixed seeds, every configuration on the same samples (batch 1, guidance 3.0 as
separate cond/uncond calls) with the eager inner compiler: decisions and outputs are those of the
Inductor build, and this script measures fidelity at a full-evaluation count, not time. Writes
``benchmarks/results/ablations.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import sc_compile
from sc_compile.alpha import AlphaTable
from sc_compile.demo.models import assets_dir, load_flux_demo
from sc_compile.metrics import psnr, ssim

GUIDANCE = 3.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    pipe, embeddings = load_flux_demo()
    transformer = pipe.transformer
    steps, warmup = args.steps, args.warmup

    def call_kwargs(label: int, seed: int) -> dict[str, Any]:
        return {**embeddings.pipeline_kwargs([label], guidance_scale=GUIDANCE), "height": 28, "width": 28,
                "num_inference_steps": steps, "seed": seed, "output_type": "pt"}

    def generate(label: int, seed: int) -> torch.Tensor:
        kwargs = call_kwargs(label, seed)
        generator = torch.Generator().manual_seed(kwargs.pop("seed"))
        with torch.no_grad():
            return pipe(**kwargs, generator=generator).images

    samples = [(i % 10, 100 + i) for i in range(args.samples)]  # (label, seed), not the calibration seeds
    references = [generate(label, seed) for label, seed in samples]
    shipped = AlphaTable.load(assets_dir() / "demo_flux" / "alpha_flux_28steps.safetensors")
    print("calibrating a module-granularity table (10 classes x 2 seeds) ...", flush=True)
    module_table = sc_compile.calibrate(
        pipe, [call_kwargs(c, 1000 + s) for s in range(2) for c in range(10)], granularity="module", progress=False
    )

    rows: list[dict[str, Any]] = []

    def run(name: str, group: str, options: dict[str, Any], per_sample_alpha: bool = False) -> dict[str, Any]:
        psnrs, ssims, fulls = [], [], []
        for (label, seed), reference in zip(samples, references, strict=True):
            alpha = options.get("alpha")
            if per_sample_alpha:
                alpha = sc_compile.calibrate(pipe, [call_kwargs(label, seed)], progress=False)
            torch._dynamo.reset()
            pipe.transformer = torch.compile(
                transformer, backend="scalingcache",
                options={"compiler": "eager", "num_inference_steps": steps, **options, "alpha": alpha},
            )
            try:
                images = generate(label, seed)
            finally:
                pipe.transformer = transformer
            report = sc_compile.report(transformer)
            psnrs.append(psnr(images, reference))
            ssims.append(ssim(images, reference))
            fulls.append(report.num_full_steps)
        row = {"group": group, "config": name, "full_steps": statistics.mean(fulls), "steps": steps,
               "psnr": statistics.mean(psnrs), "ssim": statistics.mean(ssims)}
        rows.append(row)
        print(f"{group:>12} | {name:<44} | full {row['full_steps']:5.2f}/{steps} | PSNR {row['psnr']:6.2f} | SSIM {row['ssim']:.4f}", flush=True)
        return row

    base = {"warmup_steps": warmup}
    dynamic = run(f"calibrated α table, dynamic, S={warmup}", "alpha", {**base, "alpha": shipped})
    run(f"α = 1, dynamic, S={warmup}", "alpha", {**base, "alpha": "ones"})
    run(f"per-sample α (calibrated on the sample itself), S={warmup}", "alpha", {**base}, per_sample_alpha=True)
    # Static interval at (about) the dynamic run's full-step count.
    cached_budget = steps - warmup
    full_after_warmup = max(1.0, dynamic["full_steps"] - warmup)
    interval = max(1, round(cached_budget / full_after_warmup))
    run(f"static interval {interval}, calibrated α, S={warmup}", "interval", {**base, "alpha": shipped, "static_interval": interval})
    for k in sorted({max(1, interval - 1), interval + 1} - {interval}):
        run(f"static interval {k}, calibrated α, S={warmup}", "interval", {**base, "alpha": shipped, "static_interval": k})
    run(f"module granularity, its own α table, S={warmup}", "granularity", {**base, "alpha": module_table, "granularity": "module"})
    run(f"module granularity, α = 1, S={warmup}", "granularity", {**base, "alpha": "ones", "granularity": "module"})
    run(f"ē over the output points only, S={warmup}", "change", {**base, "alpha": shipped, "change_points": "output"})
    for s in (4, 8):
        run(f"calibrated α table, dynamic, S={s}", "warm-up", {"warmup_steps": s, "alpha": shipped})

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps({"samples": args.samples, "steps": steps, "guidance": GUIDANCE, "rows": rows}, indent=2))
    lines = [
        f"# Ablations — Flux demo, {steps} steps, {args.samples} samples (batch 1), guidance {GUIDANCE} as separate calls",
        "",
        f"Fidelity against the uncached images of the same seeds; full steps averaged over samples. Run in {time.perf_counter() - started:.0f} s with",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablations.py`.",
        "",
        "| group | configuration | full steps | PSNR dB | SSIM |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['group']} | {r['config']} | {r['full_steps']:.2f} / {steps} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows]
    (args.out / "ablations.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ablations.md'}")


if __name__ == "__main__":
    main()
