"""Full buffers at every cache point vs. the default subsample: held-out evidence on the demo models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/statistic_ablation.py --model demo-flux --steps 50

The points no cached step reads keep, by default, a strided subsample of their elements
(``statistic="subsample"``, at most 2 % of one hidden state's bytes) instead of two full buffers
(``statistic="full"``, what every point kept before). For each statistic the script calibrates a
table on classes 0-4 × seeds 1000-1001 (each table is fitted on what its runtime measures), then
measures on the two held-out sets of ``calibration_ablation.py`` (classes 0-4 × seeds 2000+;
classes 5-9 × seeds 3000+):

* **ē**: the change per step of generations that run every step in full (so both statistics see
  the same trajectory): the largest relative difference of the subsample's ē from the exact one;
* **schedule**: the full steps the default dynamic schedule takes, and whether they are the same;
* **PSNR** against the uncached output of the same seed, for the dynamic schedule and a budget of
  N/3 full steps, and the cache bytes per stream.

Eager inner compiler (the decisions and outputs are the Inductor build's). Writes
``benchmarks/results/statistic_<model>_<steps>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from cachebench.samples import generate, generate_cached, sample_call
from cachebench.workloads import load
from calibration_ablation import CALIBRATION, GUIDANCE, held_out_sets

import sc_compile
import sc_compile.contract
from sc_compile.demo.sampling import demo_size
from sc_compile.metrics import psnr
from sc_compile.runtime.dispatch import latest_runtime

STATISTICS = ("full", "subsample")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo-flux", "demo-wan"], default="demo-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-set", type=int, default=2, help="samples per held-out set (at most 5)")
    parser.add_argument(
        "--min-elements",
        type=int,
        default=None,
        help="ablation only: override sc_compile.contract.MIN_SKETCH_ELEMENTS (the sketch's floor) for this run",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.min_elements is not None:
        sc_compile.contract.MIN_SKETCH_ELEMENTS = args.min_elements
    torch.set_num_threads(1)
    held_out = held_out_sets(min(args.per_set, 5))
    started = time.perf_counter()
    workload, embeddings = load(args.model)
    pipe = workload.build_pipeline(workload.transformer)
    transformer = workload.transformer
    size = demo_size(type(transformer).__name__)
    n = args.steps

    def kwargs(label: int, seed: int) -> dict[str, Any]:
        return sample_call(embeddings, size, label, seed, n, GUIDANCE)

    tables = {}
    for statistic in STATISTICS:
        print(f"calibrating with statistic={statistic!r} on {len(CALIBRATION)} samples, {n} steps", flush=True)
        tables[statistic] = sc_compile.calibrate(
            pipe, [kwargs(c, s) for c, s in CALIBRATION], progress=False, statistic=statistic
        )

    rows: list[dict[str, Any]] = []
    sketched: list[Any] = []
    for group, samples in held_out.items():
        for label, seed in samples:
            reference = generate(pipe, kwargs(label, seed))
            row: dict[str, Any] = {"set": group, "class": label, "seed": seed}
            # ē on one trajectory: every step full, measured by each statistic.
            changes = {}
            for statistic in STATISTICS:
                _, report = generate_cached(
                    pipe, kwargs(label, seed), {"alpha": tables[statistic], "statistic": statistic, "warmup_steps": n}
                )
                changes[statistic] = [
                    statistics.mean(c for c in step if c is not None) if any(c is not None for c in step) else None
                    for step in zip(*(s.changes for s in report.streams), strict=True)
                ]
                row[f"bytes_{statistic}"] = report.buffer_bytes // max(len(report.streams), 1)
                if statistic == "subsample":
                    sketched = [p for p in latest_runtime(transformer).layout.points if p.sketch is not None]
            pairs = [
                (a, b)
                for a, b in zip(changes["full"], changes["subsample"], strict=True)
                if a is not None and b is not None and a > 0
            ]
            row["change_max_rel_diff"] = max(abs(b - a) / a for a, b in pairs)
            row["change_mean_rel_diff"] = statistics.mean(abs(b - a) / a for a, b in pairs)
            for schedule, extra in (("dynamic", {}), (f"full_steps={round(n / 3)}", {"full_steps": round(n / 3)})):
                for statistic in STATISTICS:
                    images, report = generate_cached(
                        pipe, kwargs(label, seed), {"alpha": tables[statistic], "statistic": statistic, **extra}
                    )
                    row[f"{schedule}/{statistic}"] = {
                        "psnr": psnr(images, reference),
                        "full_steps": list(report.full_steps),
                    }
            rows.append(row)
            dyn = [row[f"dynamic/{s}"] for s in STATISTICS]
            print(
                f"{group:>14} class {label} seed {seed}: ē max rel diff {row['change_max_rel_diff']:.3%}; dynamic "
                f"{dyn[0]['psnr']:.2f} dB @ {len(dyn[0]['full_steps'])} (full) vs {dyn[1]['psnr']:.2f} dB @ "
                f"{len(dyn[1]['full_steps'])} (subsample), same schedule: "
                f"{dyn[0]['full_steps'] == dyn[1]['full_steps']}",
                flush=True,
            )

    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"statistic_{args.model.replace('-', '_')}_{n}" + (
        f"_min{args.min_elements}" if args.min_elements is not None else ""
    )
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "steps": n,
                "calibration": CALIBRATION,
                "held_out": held_out,
                "guidance": GUIDANCE,
                "tables": {k: repr(v) for k, v in tables.items()},
                "rows": rows,
                "seconds": elapsed,
            },
            indent=2,
        )
    )
    schedules = ["dynamic", f"full_steps={round(n / 3)}"]
    lines = [
        f"# Cache statistic ablation — {workload.title}, {n} steps",
        "",
        "Points no cached step reads keep full buffers (`statistic='full'`) or a strided subsample "
        "(`statistic='subsample'`, the default); each statistic calibrated its own table on classes 0-4 × seeds "
        "1000-1001. Held-out samples: classes 0-4 × seeds 2000+ and classes 5-9 × seeds 3000+, "
        f"{len(held_out['seeds'])} "
        f"per set. ē: every step full, both statistics on the same trajectory. Run in {elapsed:.0f} s with",
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/statistic_ablation.py --model {args.model} --steps {n}"
        + (f" --per-set {args.per_set}" if args.per_set != 2 else "")
        + (f" --min-elements {args.min_elements}" if args.min_elements is not None else "")
        + "`. Sketch floor: "
        f"{sc_compile.contract.MIN_SKETCH_ELEMENTS} elements; sketched points: "
        + ", ".join(f"{p.node_name} {p.sketch.elements}/{p.numel}" for p in sketched)
        + ".",
        "",
        f"Cache bytes per stream: full {rows[0]['bytes_full']:,}, subsample {rows[0]['bytes_subsample']:,}.",
        "",
        "| set | class | seed | ē max / mean rel. diff | "
        + " | ".join(f"{s}: PSNR full / subsample (dB) | full steps | same steps" for s in schedules)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in schedules) + " |",
    ]
    for r in rows:
        cells = [
            r["set"],
            str(r["class"]),
            str(r["seed"]),
            f"{r['change_max_rel_diff']:.2%} / {r['change_mean_rel_diff']:.2%}",
        ]
        for s in schedules:
            a, b = r[f"{s}/full"], r[f"{s}/subsample"]
            cells += [
                f"{a['psnr']:.2f} / {b['psnr']:.2f}",
                f"{len(a['full_steps'])} / {len(b['full_steps'])}",
                "yes" if a["full_steps"] == b["full_steps"] else "no",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for s in schedules:
        diff = [r[f"{s}/subsample"]["psnr"] - r[f"{s}/full"]["psnr"] for r in rows]
        lines.append("")
        lines.append(
            f"{s}: PSNR subsample − full, mean {statistics.mean(diff):+.2f} dB, "
            f"range {min(diff):+.2f} … {max(diff):+.2f} dB over {len(diff)} held-out samples."
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / f'{stem}.md'} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
