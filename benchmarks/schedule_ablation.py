"""Schedule selection and the two-difference fit: held-out evidence on the trained demo models (issue 22).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/schedule_ablation.py --model demo-flux --steps 50

1. Calibrates one table with the two-difference coefficients (classes 0-4 × seeds 1000-1001).
2. **Open loop, held out**: the relative squared error of the output point's prediction, first
   order against two differences, on the trajectories of held-out samples (calibrated like the
   table, never fitted on), for uniform gaps G (g = h = G, k = 1 … G − 1), summed over τ: the fit's
   held-out value, not a PSNR.
3. **ρ chosen on the calibration samples** by closed-loop rollouts: the budget plans with
   propagation ρ ∈ --rhos at N/3 and N/5, PSNR against the uncached output of calibration samples.
4. **Held out** (classes 5-9, seeds 3000+): budgets N/2 … N/5 planned with ρ = 0 (today's planner)
   and the chosen ρ, the same coefficients with a leave-one-sample-out error table, α = 1's budget
   and both default dynamic schedules. Writes
   ``benchmarks/results/schedule_<model>_<steps>.{md,json}``. The budget rows of the table predict
   with one difference (``predictor_order=1``) unless they say two differences.

With ``--orders`` the held-out rows are only the predictor orders at each budget: the table's first
order (``predictor_order=1``) against its two differences (the default: what the table fitted), the
same plan (ρ = 0); written to ``schedule_<model>_<steps>_orders.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cachebench.samples import (
    CALIBRATION_SAMPLES,
    HELD_OUT_SEED,
    generate,
    generate_cached,
    held_out_samples,
    held_out_suffix,
    sample_call,
)
from cachebench.workloads import load

import sc_compile
import sc_compile.calibration.collect as collect
from sc_compile.calibration.fitting import BandedGram, FittedCoefficients
from sc_compile.demo.sampling import demo_size
from sc_compile.metrics import psnr

GUIDANCE = 3.0
CALIBRATION = CALIBRATION_SAMPLES


def open_loop_errors(fitted: FittedCoefficients, grams: list[BandedGram], gap: int, feeds_output: list[bool]):
    """Σ over τ, k of ‖y_{τ+k} − prediction‖² / Σ ‖y_{τ+k}‖² on the output points, first order and
    two differences, for the uniform schedule of gap ``gap`` (previous gaps ``gap`` too)."""
    assert fitted.second is not None
    out = torch.tensor(feeds_output)
    n = fitted.num_steps
    num, num2, den = 0.0, 0.0, 0.0
    for gram in grams:
        e = gram.entry

        def inner(a, b, c, d, e=e):
            return e(a, c) - e(a, d) - e(b, c) + e(b, d)

        for tau in range(2 * gap, n - 1):
            for k in range(1, gap):
                if tau + k >= n or 2 * gap + k > gram.width - 1:
                    continue
                r = fitted.refresh[tau, gap - 1].double()
                r_before = fitted.refresh[tau - gap, gap - 1].double()
                c1 = fitted.coef[tau, gap - 1, k - 1].double()
                a = c1 * r
                b = fitted.second.coef[tau, gap - 1, gap - 1, k - 1].double()
                a1, a2 = b[:, 0] * r, b[:, 1] * r_before
                t0, t1, t2, t3 = tau + k, tau, tau - gap, tau - 2 * gap
                xx, dg, dh = inner(t0, t1, t0, t1), inner(t0, t1, t1, t2), inner(t0, t1, t2, t3)
                gg, gh, hh = inner(t1, t2, t1, t2), inner(t1, t2, t2, t3), inner(t2, t3, t2, t3)
                first = xx - 2 * a * dg + a * a * gg
                second = xx - 2 * a1 * dg - 2 * a2 * dh + a1 * a1 * gg + 2 * a1 * a2 * gh + a2 * a2 * hh
                num += float(first[out].sum())
                num2 += float(second[out].sum())
                den += float(e(t0, t0)[out].sum())
    return num / den, num2 / den


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo-flux", "demo-wan", "demo-sd3"], default="demo-flux")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-set", type=int, default=2, help="held-out samples (classes 5.., seeds 3000..)")
    parser.add_argument("--rhos", default="0,1,3", help="propagation gains tried on the calibration samples")
    parser.add_argument("--budgets", default="", help="held-out budgets (default N/2, N/3, N/4, N/5)")
    parser.add_argument("--transfer", default="", help="other step counts to run the table at, e.g. 25,100")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the default dynamic rows")
    parser.add_argument(
        "--orders", action="store_true", help="held-out rows: first order against two differences per budget only"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--plans",
        action="store_true",
        help="end-to-end schedule choice: calibrate with plan_samples, then today's planner against the stored plans "
        "at each budget and the planned default against the dynamic default at 50 and --transfer steps",
    )
    parser.add_argument("--plan-refine", type=int, default=0, help="with --plans: calibrate's plan_refine sweeps")
    parser.add_argument(
        "--plan-samples", type=int, default=None, help="with --plans: calibrate's plan_samples (default: its default)"
    )
    parser.add_argument(
        "--shrink-rule",
        choices=["sum", "worst"],
        default="sum",
        help="with --plans: the fit's shrinkage rule (sc_compile.calibration.fitting.fit_gap_coefficients)",
    )
    parser.add_argument(
        "--held-out-seed",
        type=int,
        default=HELD_OUT_SEED,
        help="the first held-out seed (another set of held-out samples: 5000)",
    )
    parser.add_argument("--save-table", type=Path, default=None, help="with --plans: write the calibrated table here")
    parser.add_argument(
        "--same-schedule",
        action="store_true",
        help="with --plans: also α = 1 on each budget's stored plan, and the table against α = 1 at static k = 2, 3, 4 "
        "(the same full steps for both)",
    )
    parser.add_argument(
        "--second-order",
        action="store_true",
        help="with --plans: calibrate with second_order=True (the plans are then chosen with two differences)",
    )
    args = parser.parse_args()
    if args.plans:
        plans_main(args)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    workload, embeddings = load(args.model)
    pipe = workload.build_pipeline(workload.transformer)
    size = demo_size(type(workload.transformer).__name__)
    n = args.steps

    def call(label: int, seed: int) -> dict[str, Any]:
        return sample_call(embeddings, size, label, seed, n, GUIDANCE)

    captured: list[tuple[list[BandedGram], list[bool]]] = []
    original_fit = collect.fit_gap_coefficients

    def capturing_fit(trajectories, max_gap, feeds_output, *rest, **kwargs):
        captured.append((trajectories, list(feeds_output)))
        return original_fit(trajectories, max_gap, feeds_output, *rest, **kwargs)

    collect.fit_gap_coefficients = capturing_fit  # type: ignore[assignment]
    print(f"calibrating on {len(CALIBRATION)} samples, {n} steps, with two differences", flush=True)
    table = sc_compile.calibrate(pipe, [call(c, s) for c, s in CALIBRATION], progress=False, second_order=True)
    held_out = held_out_samples(args.per_set, args.held_out_seed)
    sc_compile.calibrate(pipe, [call(c, s) for c, s in held_out], progress=False)  # held-out trajectories
    collect.fit_gap_coefficients = original_fit  # type: ignore[assignment]
    fitted = table.fitted
    assert fitted is not None and fitted.second is not None
    print(f"  {table!r}", flush=True)
    used = fitted.second.uses_second_difference()
    print(f"  two differences taken at {float(used.double().mean()) * 100:.1f}% of (τ, g, h, k, point)", flush=True)
    results: dict[str, Any] = {"model": args.model, "steps": n, "open_loop": [], "rho_selection": [], "held_out": []}
    out_points = captured[0][1]
    for gap in (2, 3, 4, 5):
        first, second = open_loop_errors(fitted, captured[1][0], gap, out_points)
        calib_first, calib_second = open_loop_errors(fitted, captured[0][0], gap, out_points)
        results["open_loop"].append(
            {"gap": gap, "held_out": [first, second], "calibration": [calib_first, calib_second]}
        )
        print(
            f"  open loop, uniform gap {gap}: held-out rel. sq. error first {first:.3e}  two differences "
            f"{second:.3e}  (calibration samples {calib_first:.3e} / {calib_second:.3e})",
            flush=True,
        )

    references: dict[tuple[int, ...], torch.Tensor] = {}

    def measure(samples: list[tuple[int, int]], options: dict[str, Any]) -> dict[str, Any]:
        psnrs, fulls = [], []
        for label, seed in samples:
            if (label, seed) not in references:
                references[(label, seed)] = generate(pipe, call(label, seed))
            try:
                images, report = generate_cached(pipe, call(label, seed), options)
            except ValueError as error:
                return {"error": str(error)}
            psnrs.append(psnr(images, references[(label, seed)]))
            fulls.append(report.num_full_steps)
        return {"psnr": statistics.mean(psnrs), "full_steps": statistics.mean(fulls), "each": psnrs}

    def show(kind: str, name: str, row: dict[str, Any]) -> None:
        cell = f"{row['psnr']:6.2f} dB @ {row['full_steps']:5.2f} full" if "psnr" in row else row["error"][:80]
        print(f"{kind:>12} | {name:<36} | {cell}", flush=True)

    rhos = [float(r) for r in args.rhos.split(",")]
    selection_samples = CALIBRATION[:2]
    scores: dict[float, float] = {}
    for rho in rhos if len(rhos) > 1 else ():
        total = []
        for budget in (round(n / 3), round(n / 5)):
            row = measure(
                selection_samples, {"alpha": table, "full_steps": budget, "propagation": rho, "predictor_order": 1}
            )
            row.update(rho=rho, budget=budget)
            results["rho_selection"].append(row)
            show("calibration", f"ρ={rho:g}, full_steps={budget}", row)
            total.append(row.get("psnr", float("-inf")))
        scores[rho] = statistics.mean(total)
    chosen = max(scores, key=lambda r: scores[r]) if scores else rhos[0]
    results["chosen_rho"] = chosen
    print(f"  chosen on the calibration samples: ρ = {chosen:g}", flush=True)

    def held(name: str, options: dict[str, Any]) -> None:
        row = measure(held_out, options)
        row["config"] = name
        results["held_out"].append(row)
        show("held out", name, row)

    # The same coefficients with the error table measured leave-one-sample-out.
    trajectories, feeds = captured[0]
    loo = original_fit(trajectories, fitted.max_gap_limit, feeds, held_out_error=True)
    loo_table = dataclasses.replace(table, fitted=dataclasses.replace(fitted, error=loo.error, max_gap=loo.max_gap))
    torch.testing.assert_close(loo.coef, fitted.coef)
    # Control: the same coefficients, full steps placed without the error table (cost k per cached
    # step times the sampler's step size, as α = 1's plan).
    gaps = torch.arange(1, fitted.max_gap_limit + 1, dtype=torch.float32)
    even = dataclasses.replace(fitted, error=(gaps * gaps).expand_as(fitted.error).contiguous())
    even_table = dataclasses.replace(table, fitted=even)
    if not args.no_dynamic:
        held("fitted, default dynamic", {"alpha": table})
        held("α = 1, default dynamic", {"alpha": "ones"})
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [n // 2, n // 3, n // 4, n // 5]
    first_order = {"predictor_order": 1}
    for budget in budgets if args.orders else ():
        held(f"fitted, one difference, full_steps={budget}", {"alpha": table, "full_steps": budget, **first_order})
        held(f"fitted, two differences, full_steps={budget}", {"alpha": table, "full_steps": budget})
    for budget in budgets if not args.orders else ():
        held(f"fitted ρ=0 (today), full_steps={budget}", {"alpha": table, "full_steps": budget, **first_order})
        if chosen != 0.0:
            held(
                f"fitted ρ={chosen:g}, full_steps={budget}",
                {"alpha": table, "full_steps": budget, "propagation": chosen, **first_order},
            )
        held(f"fitted, held-out errors, full_steps={budget}", {"alpha": loo_table, "full_steps": budget, **first_order})
        held(
            f"fitted, placed without errors, full_steps={budget}",
            {"alpha": even_table, "full_steps": budget, **first_order},
        )
        held(f"α = 1, full_steps={budget}", {"alpha": "ones", "full_steps": budget})
    for steps in [int(x) for x in args.transfer.split(",")] if args.transfer else ():
        # The table at another step count: the dynamic default against a budget at its count.
        def at(name: str, options: dict[str, Any], steps: int = steps) -> dict[str, Any]:
            rows = []
            for label, seed in held_out:
                key = (label, seed, steps)
                sample = sample_call(embeddings, size, label, seed, steps, GUIDANCE)
                if key not in references:
                    references[key] = generate(pipe, sample)
                images, report = generate_cached(pipe, sample, options)
                rows.append((psnr(images, references[key]), report.num_full_steps))
            row = {
                "config": f"{name} at {steps} steps",
                "psnr": statistics.mean(r[0] for r in rows),
                "full_steps": statistics.mean(r[1] for r in rows),
            }
            results["held_out"].append(row)
            show("transfer", row["config"], row)
            return row

        dynamic = at("fitted, default dynamic", {"alpha": table})
        count = round(dynamic["full_steps"])
        at(f"fitted, full_steps={count}", {"alpha": table, "full_steps": count})
        ones = at("α = 1, default dynamic", {"alpha": "ones"})
        at(f"α = 1, full_steps={round(ones['full_steps'])}", {"alpha": "ones", "full_steps": round(ones["full_steps"])})
    elapsed = time.perf_counter() - started
    results["seconds"] = elapsed
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"schedule_{args.model.replace('-', '_')}_{n}" + ("_orders" if args.orders else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(render(results, " ".join(["benchmarks/schedule_ablation.py", *sys.argv[1:]])))
    print(f"done in {elapsed:.0f} s", flush=True)


def plans_main(args: argparse.Namespace) -> None:
    """Issue 22 items 2-3: schedules chosen end to end at calibration, and the planned default."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    workload, embeddings = load(args.model)
    pipe = workload.build_pipeline(workload.transformer)
    size = demo_size(type(workload.transformer).__name__)
    n = args.steps
    chosen_on = "calibrate's default number of" if args.plan_samples is None else f"the first {args.plan_samples}"
    print(f"calibrating on {len(CALIBRATION)} samples, {n} steps, choosing schedules on {chosen_on}", flush=True)
    calibration_started = time.perf_counter()
    if args.shrink_rule != "sum":
        collect.fit_gap_coefficients = functools.partial(collect.fit_gap_coefficients, shrink_rule=args.shrink_rule)
    table = sc_compile.calibrate(
        pipe,
        [sample_call(embeddings, size, c, s, n, GUIDANCE) for c, s in CALIBRATION],
        progress=False,
        plan_samples=args.plan_samples,
        plan_refine=args.plan_refine,
        second_order=args.second_order,
    )
    calibration_seconds = time.perf_counter() - calibration_started
    if args.save_table is not None:
        table.save(args.save_table)
    plans = table.plans
    assert plans is not None
    print(f"  {table!r} in {calibration_seconds:.0f} s (choosing schedules: {table.extra['plan_seconds']} s)")
    stored = [
        {"full_steps": c, "error_db": float(e), "source": plans.source(i), "steps": list(plans.steps(i))}
        for i, (c, e) in enumerate(zip(plans.counts(), plans.error.tolist(), strict=True))
    ]
    for row in stored:
        print(f"  stored plan: {row['full_steps']} full, {row['error_db']:.2f} dB ({row['source']}) {row['steps']}")
    print(f"  dynamic rule: {plans.reference_error:.2f} dB at {plans.reference_full_steps:.1f} full", flush=True)
    if table.finer is not None:
        print(f"  finer-grid check: {table.finer.describe()}", flush=True)
    today = dataclasses.replace(table, plans=None)
    held_out = held_out_samples(args.per_set, args.held_out_seed)
    results: dict[str, Any] = {
        "model": args.model,
        "steps": n,
        "calibration_seconds": calibration_seconds,
        "plan_seconds": float(table.extra["plan_seconds"]),
        "stored": stored,
        "dynamic_calibrated": [plans.reference_error, plans.reference_full_steps],
        "finer_check": None if table.finer is None else table.finer.to_json(),
        "finer_check_text": None if table.finer is None else table.finer.describe(),
        "held_out": [],
        "held_out_samples": held_out,
    }
    references: dict[tuple[int, int, int], torch.Tensor] = {}

    def held(name: str, options: dict[str, Any], steps: int = n) -> dict[str, Any]:
        psnrs, fulls, schedule = [], [], ""
        for label, seed in held_out:
            sample = sample_call(embeddings, size, label, seed, steps, GUIDANCE)
            if (label, seed, steps) not in references:
                references[(label, seed, steps)] = generate(pipe, sample)
            images, report = generate_cached(pipe, sample, options)
            psnrs.append(psnr(images, references[(label, seed, steps)]))
            fulls.append(report.num_full_steps)
            schedule = report.schedule
        row = {
            "config": f"{name} at {steps} steps",
            "psnr": statistics.mean(psnrs),
            "full_steps": statistics.mean(fulls),
            "each": psnrs,
            "schedule": schedule,
        }
        results["held_out"].append(row)
        cell = f"{row['psnr']:6.2f} dB @ {row['full_steps']:5.2f} full"
        print(f"{'held out':>12} | {row['config']:<44} | {cell}", flush=True)
        print(f"{'':>12} |   {schedule}", flush=True)
        return row

    first_order = {"predictor_order": 1} if args.second_order else {}
    # α = 1 (one difference, no fit) that runs the table's stored plans: the same full steps as the table's rows.
    ones_same_plans = dataclasses.replace(table, alpha=torch.ones_like(table.alpha), fitted=None, finer=None)
    # The table's coefficients mapped to every step count, whatever its finer-grid check found (before the check).
    unchecked = dataclasses.replace(table, finer=None)
    for budget in [int(b) for b in args.budgets.split(",")] if args.budgets else (n // 2, n // 3, n // 4, n // 5):
        held(f"today's planner (ρ=0), full_steps={budget}", {"alpha": today, "full_steps": budget, **first_order})
        held(f"end-to-end plan, full_steps={budget}", {"alpha": table, "full_steps": budget})
        if args.same_schedule:
            held(f"α = 1 on the same plan, full_steps={budget}", {"alpha": ones_same_plans, "full_steps": budget})
    for interval in (2, 3, 4) if args.same_schedule else ():
        held(f"table, static k={interval}", {"alpha": table, "static_interval": interval})
        held(f"α = 1, static k={interval}", {"alpha": "ones", "static_interval": interval})
    for steps in [] if args.no_dynamic else [n, *[int(x) for x in args.transfer.split(",") if x]]:
        held("planned default", {"alpha": table, "schedule": "planned"}, steps)
        if table.finer is not None and steps > n:
            held(
                "planned default, mapped coefficients (no finer-grid check)",
                {"alpha": unchecked, "schedule": "planned"},
                steps,
            )
        held("dynamic rule", {"alpha": table, "schedule": "dynamic"}, steps)
        held("α = 1 default", {"alpha": "ones"}, steps)
        if args.same_schedule:
            held("α = 1 on the planned default's schedule", {"alpha": ones_same_plans, "schedule": "planned"}, steps)
    elapsed = time.perf_counter() - started
    results["seconds"] = elapsed
    args.out.mkdir(parents=True, exist_ok=True)
    refined = f"_refine{args.plan_refine}" if args.plan_refine else ""
    refined += "_second_order" if args.second_order else ""
    refined += f"_samples{args.plan_samples}" if args.plan_samples is not None else ""
    refined += f"_{args.shrink_rule}" if args.shrink_rule != "sum" else ""
    refined += held_out_suffix(args.held_out_seed)
    stem = f"schedule_plans{refined}_{args.model.replace('-', '_')}_{n}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    command = " ".join(["benchmarks/schedule_ablation.py", *sys.argv[1:]])
    (args.out / f"{stem}.md").write_text(render_plans(results, command))
    print(f"done in {elapsed:.0f} s", flush=True)


def render_plans(results: dict[str, Any], command: str) -> str:
    lines = [
        f"# End-to-end schedules and the planned default — {results['model']}, {results['steps']} steps",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python {command}` ({results['seconds']:.0f} s; calibration with the schedule "
        f"choice {results['calibration_seconds']:.0f} s, of which choosing schedules {results['plan_seconds']:.0f} s).",
        "",
        "Stored plans (calibration samples: error = 10·log10 of the relative squared error of the output, lower is "
        f"better; the dynamic rule: {results['dynamic_calibrated'][0]:.2f} dB at "
        f"{results['dynamic_calibrated'][1]:.1f} full):",
        "",
        "| full | calibrated error dB | candidate | full steps |",
        "| ---: | ---: | --- | --- |",
    ]
    for row in results["stored"]:
        lines.append(f"| {row['full_steps']} | {row['error_db']:.2f} | {row['source']} | {row['steps']} |")
    if results.get("finer_check_text"):
        check = results["finer_check"]
        lines += [
            "",
            f"Finer-grid check: {results['finer_check_text']} (per rollout sample, dB: table "
            + " / ".join(f"{e:.2f}" for e in check["table_errors"])
            + ", α = 1 "
            + " / ".join(f"{e:.2f}" for e in check["ones_errors"])
            + ").",
        ]
    samples = ", ".join(f"({c}, {s})" for c, s in results.get("held_out_samples", ())) or "classes 5.., seeds 3000.."
    lines += ["", f"Held out ((class, seed): {samples}; PSNR dB against the uncached output; full steps):", ""]
    lines += ["| configuration | PSNR mean | each sample | full | schedule (report) |"]
    lines += ["| --- | ---: | --- | ---: | --- |"]
    for row in results["held_out"]:
        each = " / ".join(f"{v:.1f}" for v in row["each"])
        lines.append(f"| {row['config']} | {row['psnr']:.2f} | {each} | {row['full_steps']:.1f} | {row['schedule']} |")
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any], command: str) -> str:
    """The markdown of one run."""
    lines = [
        f"# Schedule ablation — {results['model']}, {results['steps']} steps",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python {command}` ({results['seconds']:.0f} s).",
        "",
        "Open loop (relative squared error of the output point's prediction, uniform gap G, summed over τ):",
        "",
        "| G | held out: first order | held out: two differences | calibration: first | calibration: two |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["open_loop"]:
        (a, b), (c, d) = row["held_out"], row["calibration"]
        lines.append(f"| {row['gap']} | {a:.3e} | {b:.3e} | {c:.3e} | {d:.3e} |")
    lines += ["", "Closed loop (PSNR dB against the uncached output of the same seed, mean; full steps):", ""]
    lines += ["| set | configuration | PSNR | full |", "| --- | --- | ---: | ---: |"]
    for row in results["rho_selection"]:
        cell = f"{row['psnr']:.2f} | {row['full_steps']:.1f}" if "psnr" in row else f"refused | {row['error'][:60]}"
        lines.append(f"| calibration | ρ={row['rho']:g}, full_steps={row['budget']} | {cell} |")
    for row in results["held_out"]:
        cell = f"{row['psnr']:.2f} | {row['full_steps']:.1f}" if "psnr" in row else f"refused | {row['error'][:60]}"
        lines.append(f"| held out | {row['config']} | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
