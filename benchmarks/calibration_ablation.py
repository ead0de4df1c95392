"""Which coefficients and which schedule: held-out evidence on the trained demo models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_ablation.py --model demo-flux --steps 50

Calibrates one table (format 2: chained α and per-gap fitted coefficients from the same runs) on
classes 0-4 × seeds 1000-1001, then measures, against the uncached output of the same seeds,
(chained α / fitted per-gap / α = 1) × (dynamic / static interval / budgeted) on two held-out sets:
**held-out seeds** (classes 0-4, seeds 2000+) and **held-out classes and seeds** (classes 5-9,
seeds 3000+). ``--transfer`` adds the table used at half, 2× and 4× its step count. Guidance 3.0
as separate cond / uncond calls, eager inner compiler (decisions and outputs are the Inductor
build's; this measures fidelity at a full-evaluation count, not time). Writes
``benchmarks/results/calibration_<model>_<steps>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from cachebench.samples import CALIBRATION_SAMPLES, generate, generate_cached, held_out_samples, sample_call
from cachebench.workloads import load

import sc_compile
from sc_compile.demo.sampling import demo_size
from sc_compile.metrics import psnr

GUIDANCE = 3.0
CALIBRATION = CALIBRATION_SAMPLES


def held_out_sets(per_set: int) -> dict[str, list[tuple[int, int]]]:
    return {
        "seeds": [(c, 2000 + c) for c in range(per_set)],
        "classes+seeds": held_out_samples(per_set),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo-flux", "demo-wan"], default="demo-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--transfer", action="store_true", help="also run the table at N/2, 2N and 4N steps")
    parser.add_argument("--only-transfer", action="store_true", help="only the runs at N/2, 2N and 4N steps")
    parser.add_argument("--quick", action="store_true", help="fewer configurations (smoke run)")
    parser.add_argument("--per-set", type=int, default=5, help="samples per held-out set (at most 5)")
    parser.add_argument("--transfer-factors", default="0.5,2,4", help="step-count factors of the transfer runs")
    parser.add_argument("--variants", default="chained,fitted,ones", help="which coefficient variants to run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    HELD_OUT = held_out_sets(min(args.per_set, 5))
    started = time.perf_counter()
    workload, embeddings = load(args.model)
    pipe = workload.build_pipeline(workload.transformer)
    transformer = workload.transformer
    size = demo_size(type(transformer).__name__)

    def kwargs(label: int, seed: int, steps: int) -> dict[str, Any]:
        return sample_call(embeddings, size, label, seed, steps, GUIDANCE)

    print(f"calibrating on {len(CALIBRATION)} samples (classes 0-4 x seeds 1000-1001), {args.steps} steps", flush=True)
    table = sc_compile.calibrate(pipe, [kwargs(c, s, args.steps) for c, s in CALIBRATION], progress=False)
    fitted = table.fitted
    assert fitted is not None
    print(f"  {table!r}; K_tau = {fitted.max_gap.tolist()}", flush=True)
    references: dict[tuple[int, int, int], torch.Tensor] = {}

    def reference(label: int, seed: int, steps: int) -> torch.Tensor:
        key = (label, seed, steps)
        if key not in references:
            references[key] = generate(pipe, kwargs(label, seed, steps))
        return references[key]

    rows: list[dict[str, Any]] = []

    def run(group: str, name: str, steps: int, options: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"group": group, "config": name, "steps": steps}
        for held_out, samples in HELD_OUT.items():
            psnrs, fulls = [], []
            for label, seed in samples:
                try:
                    images, report = generate_cached(pipe, kwargs(label, seed, steps), options)
                except ValueError as error:  # a schedule the table refuses: recorded, not hidden
                    row[held_out] = {"error": str(error)}
                    break
                psnrs.append(psnr(images, reference(label, seed, steps)))
                fulls.append(report.num_full_steps)
            else:
                row[held_out] = {"psnr": statistics.mean(psnrs), "full_steps": statistics.mean(fulls)}
        rows.append(row)
        cells = " | ".join(
            f"{k}: "
            + (f"{v['psnr']:6.2f} dB @ {v['full_steps']:5.2f}" if "psnr" in v else "refused: " + v["error"][:60])
            for k, v in ((k, row[k]) for k in HELD_OUT)
        )
        print(f"{group:>10} | {name:<34} | {steps:3d} steps | {cells}", flush=True)
        return row

    all_variants = {
        "chained": ("chained α", {"alpha": table, "coefficients": "chained"}),
        "fitted": ("fitted per-gap", {"alpha": table, "coefficients": "fitted"}),
        "ones": ("α = 1", {"alpha": "ones"}),
    }
    variants = dict(all_variants[v] for v in args.variants.split(","))
    n = args.steps
    budgets = {round(n / 4), round(n / 3), round(n / 2), round(n / 1.5)}
    intervals = (2, 3, 4) if not args.quick else (3,)
    matched: set[int] = set()
    for variant, options in variants.items() if not args.only_transfer else ():
        counts = [run("dynamic", f"{variant}, dynamic", n, options)]
        for k in intervals:
            counts.append(run("static", f"{variant}, static k={k}", n, {**options, "static_interval": k}))
        # A budget at the dynamic run's full-step count too, for a matched comparison.
        matched |= {round(r[h]["full_steps"]) for r in counts[:1] for h in HELD_OUT if "full_steps" in r[h]}
    for variant, options in variants.items() if not args.only_transfer else ():
        for b in sorted(budgets | matched) if not args.quick else sorted(budgets)[:1]:
            run("budget", f"{variant}, full_steps={b}", n, {**options, "full_steps": b})
    if args.transfer or args.only_transfer:
        for steps in (round(n * float(f)) for f in args.transfer_factors.split(",")):
            for variant, options in variants.items():
                run("transfer", f"{variant}, dynamic", steps, options)
                if variant != "chained α":
                    run(
                        "transfer",
                        f"{variant}, full_steps={round(steps / 3)}",
                        steps,
                        {**options, "full_steps": round(steps / 3)},
                    )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"calibration_{args.model.replace('-', '_')}_{n}" + ("_transfer" if args.only_transfer else "")
    if args.variants != "chained,fitted,ones" or args.transfer_factors != "0.5,2,4":
        stem += "_" + args.variants.replace(",", "_") + "_x" + args.transfer_factors.replace(",", "_")
    elapsed = time.perf_counter() - started
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "steps": n,
                "calibration": CALIBRATION,
                "held_out": HELD_OUT,
                "guidance": GUIDANCE,
                "table": repr(table),
                "max_gap": fitted.max_gap.tolist(),
                "rows": rows,
                "seconds": elapsed,
            },
            indent=2,
        )
    )
    lines = [
        f"# Calibration ablation — {workload.title}, calibrated at {n} steps",
        "",
        f"Table calibrated on classes 0-4 × seeds 1000-1001 (10 samples, guidance {GUIDANCE} as separate calls); "
        f"PSNR against the uncached output of the same seed, mean over {len(HELD_OUT['seeds'])} samples per held-out "
        "set, and mean full "
        "steps. *held-out seeds*: classes 0-4, seeds 2000+; *held-out classes+seeds*: classes 5-9, seeds 3000+. "
        f"K_τ of the fitted table: {fitted.max_gap.tolist()}. Run in {elapsed:.0f} s with",
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_ablation.py --model {args.model} --steps {n}"
        + (" --transfer" if args.transfer else "")
        + (" --only-transfer" if args.only_transfer else "")
        + (f" --per-set {args.per_set}" if args.per_set != 5 else "")
        + (f" --variants {args.variants}" if args.variants != "chained,fitted,ones" else "")
        + (f" --transfer-factors {args.transfer_factors}" if args.transfer_factors != "0.5,2,4" else "")
        + "`.",
        "",
        "| group | configuration | steps | held-out seeds: PSNR dB | full | held-out classes+seeds: PSNR dB | full |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = []
        for k in HELD_OUT:
            v = r[k]
            cells += [f"{v['psnr']:.2f}", f"{v['full_steps']:.2f}"] if "psnr" in v else ["refused", "—"]
        lines.append(f"| {r['group']} | {r['config']} | {r['steps']} | " + " | ".join(cells) + " |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'{stem}.md'} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
