"""Ablations of ScalingCache's own choices on the trained demo models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablations.py [--model demo-flux|demo-wan] [--samples 8]

One process, fixed seeds, every configuration on the same samples (batch 1, guidance 3.0 as
separate cond/uncond calls, through ``FluxPipeline`` / ``WanPipeline``) with the eager inner
compiler: decisions and outputs are those of the Inductor build, and this script measures fidelity
at a full-evaluation count, not time. Writes ``benchmarks/results/ablations[_demo_wan].md`` and
``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from cachebench.perceptual import feature_distance, normalized_features
from cachebench.samples import generate, generate_cached, sample_call

import sc_compile
from sc_compile.calibration.table import AlphaTable
from sc_compile.demo.models import assets_dir, load_flux_demo, load_wan_demo
from sc_compile.demo.sampling import demo_size
from sc_compile.metrics import psnr, ssim

GUIDANCE = 3.0
MODELS = {
    # model: (loader, α table shipped in assets/, its step count, title)
    "demo-flux": (load_flux_demo, "demo_flux/alpha_flux_28steps.safetensors", 28, "Flux demo"),
    "demo-wan": (load_wan_demo, "demo_wan/alpha_wan_20steps.safetensors", 20, "Wan demo"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="demo-flux")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="default: the shipped α table's step count")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    loader, alpha_file, table_steps, title = MODELS[args.model]
    pipe, embeddings = loader()
    steps, warmup = args.steps or table_steps, args.warmup

    def call_kwargs(label: int, seed: int) -> dict[str, Any]:
        return sample_call(embeddings, demo_size(pipe), label, seed, steps, GUIDANCE)

    samples = [(i % 10, 100 + i) for i in range(args.samples)]  # (label, seed), not the calibration seeds
    references = [generate(pipe, call_kwargs(label, seed)) for label, seed in samples]
    reference_features = [normalized_features(r) for r in references]
    shipped = AlphaTable.load(assets_dir() / alpha_file)
    calibration_samples = [call_kwargs(c, 1000 + s) for s in range(2) for c in range(10)]
    print("calibrating a module-granularity table (10 classes x 2 seeds) ...", flush=True)
    module_table = sc_compile.calibrate(pipe, calibration_samples, granularity="module", progress=False)
    print("calibrating a residual-prediction table (10 classes x 2 seeds) ...", flush=True)
    residual_table = sc_compile.calibrate(pipe, calibration_samples, prediction="residual", progress=False)

    rows: list[dict[str, Any]] = []

    def run(name: str, group: str, options: dict[str, Any], per_sample_alpha: bool = False) -> dict[str, Any]:
        psnrs, ssims, dists, fulls = [], [], [], []
        for (label, seed), reference, features in zip(samples, references, reference_features, strict=True):
            alpha = options.get("alpha")
            if per_sample_alpha:
                alpha = sc_compile.calibrate(
                    pipe, [call_kwargs(label, seed)], prediction=options.get("prediction", "hidden"), progress=False
                )
            images, report = generate_cached(pipe, call_kwargs(label, seed), {**options, "alpha": alpha})
            psnrs.append(psnr(images, reference))
            ssims.append(ssim(images, reference))
            dists.append(feature_distance(images, reference, features))
            fulls.append(report.num_full_steps)
        row = {
            "group": group,
            "config": name,
            "full_steps": statistics.mean(fulls),
            "steps": steps,
            "psnr": statistics.mean(psnrs),
            "ssim": statistics.mean(ssims),
            "feature_distance": statistics.mean(dists),
        }
        rows.append(row)
        print(
            f"{group:>12} | {name:<52} | full {row['full_steps']:5.2f}/{steps} | PSNR {row['psnr']:6.2f} | "
            f"SSIM {row['ssim']:.4f} | feat {row['feature_distance']:.4f}",
            flush=True,
        )
        return row

    base = {"warmup_steps": warmup}
    dynamic = run(f"calibrated α table, dynamic, S={warmup}", "alpha", {**base, "alpha": shipped})
    run(f"α = 1, dynamic, S={warmup}", "alpha", {**base, "alpha": "ones"})
    run(f"per-sample α (calibrated on the sample itself), S={warmup}", "alpha", {**base}, per_sample_alpha=True)
    # Static interval at (about) the dynamic run's full-step count.
    cached_budget = steps - warmup
    full_after_warmup = max(1.0, dynamic["full_steps"] - warmup)
    interval = max(2, round(cached_budget / full_after_warmup))  # 1 would be every step full
    run(
        f"static interval {interval}, calibrated α, S={warmup}",
        "interval",
        {**base, "alpha": shipped, "static_interval": interval},
    )
    for k in sorted({max(2, interval - 1), interval + 1} - {interval}):
        run(
            f"static interval {k}, calibrated α, S={warmup}",
            "interval",
            {**base, "alpha": shipped, "static_interval": k},
        )
    run(
        f"module granularity, its own α table, S={warmup}",
        "granularity",
        {**base, "alpha": module_table, "granularity": "module"},
    )
    run(f"module granularity, α = 1, S={warmup}", "granularity", {**base, "alpha": "ones", "granularity": "module"})
    run(f"ē over the output points only, S={warmup}", "change", {**base, "alpha": shipped, "change_points": "output"})
    for s in (4, 8):
        run(f"calibrated α table, dynamic, S={s}", "warm-up", {"warmup_steps": s, "alpha": shipped})
    # Prediction target: the residual over the current block input, at the same warm-ups as the
    # hidden-state rows above (S=4, 6, 8) so the two can be compared at matched full-step counts.
    for s in (4, warmup, 8):
        run(
            f"residual over the current input, its own α table, S={s}",
            "prediction",
            {"warmup_steps": s, "alpha": residual_table, "prediction": "residual"},
        )
    run(
        f"residual over the current input, α = 1, S={warmup}",
        "prediction",
        {**base, "alpha": "ones", "prediction": "residual"},
    )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "ablations" + ("" if args.model == "demo-flux" else "_" + args.model.replace("-", "_"))
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"model": args.model, "samples": args.samples, "steps": steps, "guidance": GUIDANCE, "rows": rows}, indent=2
        )
    )
    lines = [
        f"# Ablations — {title}, {steps} steps, {args.samples} samples (batch 1), guidance {GUIDANCE} as separate "
        "calls",
        "",
        f"Fidelity against the uncached outputs of the same seeds (Wan: per frame); full steps averaged over samples. "
        f"*feat. dist.*: EfficientNet-Lite0 feature distance (offline perceptual stand-in, not LPIPS; "
        f"`benchmarks/cachebench/perceptual.py`). Run in {time.perf_counter() - started:.0f} s with",
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablations.py --model {args.model}`.",
        "",
        "| group | configuration | full steps | PSNR dB | SSIM | feat. dist. |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['group']} | {r['config']} | {r['full_steps']:.2f} / {steps} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
        f"{r['feature_distance']:.4f} |"
        for r in rows
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'{stem}.md'}")


if __name__ == "__main__":
    main()
