"""Ours against the peers on several held-out sets at once: each set alone and all pooled.

Reads what ``schedule_ablation.py --plans`` and ``peers_heldout.py`` wrote for each set (the default
seeds 3000.. and other seed bases, e.g. ``--held-out-seed 5000``) and prints, per budget N/2 … N/5:

* the planned default (the table's end-to-end plan), today's planner and α = 1 on the same plan,
  pooled as the mean over every sample of the sets that ran the row (α = 1 runs with
  ``--same-schedule`` only);
* the best peer configuration at ≤ B full evaluations, pooled as each set's best on its own samples,
  weighted by the set's samples (the peers' sweep chooses on the held-out samples themselves, while
  the table's plans were chosen at calibration).

``--variant second_order`` adds the rows of the ``--plans --second-order`` runs of the same sets.

    .venv/bin/python benchmarks/pool_heldout.py --model demo-flux --sets 3000,5000,7000 [--variant second_order]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cachebench.rendering import best_within
from cachebench.samples import held_out_suffix

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (
    ("end-to-end plan", "planned default (e2e plan)"),
    ("today's planner (ρ=0)", "today's planner"),
    ("α = 1 on the same plan", "α = 1 on the same plan"),
)


def _stem(kind: str, model: str, steps: int, seed: int, variant: str = "") -> Path:
    prefix = f"schedule_plans{'_' + variant if variant else ''}" if kind == "ours" else "peers_heldout"
    return RESULTS / f"{prefix}{held_out_suffix(seed)}_{model.replace('-', '_')}_{steps}.json"


def _each(result: dict, prefix: str, budget: int, steps: int) -> list[float] | None:
    """Each sample's PSNR of the row ``prefix`` at ``budget`` full steps (``None``: the run has no such row)."""
    rows = [r for r in result["held_out"] if r["config"] == f"{prefix}, full_steps={budget} at {steps} steps"]
    return rows[0]["each"] if rows else None  # a run without --same-schedule has no α = 1 rows


def _print_row(
    ours: list[dict], prefix: str, label: str, seeds: list[int], budgets: tuple[int, ...], steps: int
) -> None:
    """One row of ours: per set, the mean per budget, and pooled over every sample of the sets that ran it."""
    # Per set, each sample's PSNR per budget (None: the set did not run the row).
    ran = []
    for result in ours:
        values = [_each(result, prefix, b, steps) for b in budgets]
        ran.append(None if None in values else values)
    if all(values is None for values in ran):
        return  # no set ran the row
    cells = ["-" if values is None else " / ".join(f"{statistics.mean(v):.1f}" for v in values) for values in ran]
    pooled = [
        statistics.mean([v for values in ran if values is not None for v in values[i]]) for i in range(len(budgets))
    ]
    missing = [seed for seed, values in zip(seeds, ran, strict=True) if values is None]
    note = f" (without seeds {', '.join(map(str, missing))}..)" if missing else ""
    cells.append(" / ".join(f"{v:.1f}" for v in pooled) + note)
    print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo-flux", "demo-wan", "demo-sd3"], default="demo-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sets", default="3000,5000,7000", help="the held-out seed bases whose results are pooled")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also the rows of schedule_ablation.py runs of another calibration, by the part of their file name "
        "after schedule_plans_ (second_order: --second-order)",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.sets.split(",")]
    n = args.steps
    budgets = (n // 2, n // 3, n // 4, n // 5)
    peers = [json.loads(_stem("peers", args.model, n, s).read_text()) for s in seeds]
    runs = {}
    for variant in ["", *args.variant]:
        ours = runs[variant] = [json.loads(_stem("ours", args.model, n, s, variant).read_text()) for s in seeds]
        for seed, result in zip(seeds, ours, strict=True):
            # Every set's rows come from the same calibration command, so its plans are the same table's.
            if result["stored"] != ours[0]["stored"]:
                raise SystemExit(
                    f"seeds {seed}.. ran other stored plans than seeds {seeds[0]}..{variant and ' (' + variant + ')'}: "
                    "not one table, not pooled"
                )
        if [r["held_out_samples"] for r in ours] != [r["held_out_samples"] for r in runs[""]]:
            raise SystemExit(f"the {variant} runs held out other samples than the default's: not compared")
    labels = [f"seeds {s}.. ({len(o['held_out_samples'])} samples)" for s, o in zip(seeds, runs[""], strict=True)]
    print(f"{args.model}, {n} steps; PSNR dB at B = {' / '.join(map(str, budgets))} full steps")
    print("| row | " + " | ".join([*labels, "pooled"]) + " |")
    print("| --- |" + " ---: |" * (len(seeds) + 1))

    for variant, ours in runs.items():
        for prefix, label in ROWS:
            if variant and prefix == "today's planner (ρ=0)":
                continue  # the variant's planner row runs the default's predictor: the same row
            _print_row(ours, prefix, f"{label}{f', {variant}' if variant else ''}", seeds, budgets, n)
    cells, bests = [], []
    for result in peers:
        rows = [best_within(result["rows"], b) for b in budgets]
        best = [float("nan") if row is None else row["psnr"] for row in rows]
        bests.append((len(result["samples"]), best))
        cells.append(" / ".join(f"{v:.1f}" for v in best))
    # Pooled: each set's best configuration on its own samples, weighted by its samples (the peers'
    # sweep picks its best on the held-out samples themselves; the table's plans were fixed before).
    total = sum(count for count, _ in bests)
    pooled_best = [sum(count * best[i] for count, best in bests) / total for i in range(len(budgets))]
    cells.append(" / ".join(f"{v:.1f}" for v in pooled_best))
    print("| best peer (≤ B full) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
