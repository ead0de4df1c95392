"""Runs the configurations of one benchmark on one workload, in one process.

Phase 1, per configuration: build it on a fresh copy of the transformer, a warm-up (compile)
generation, then the measured generation (counts, outputs, memory, Dynamo counters). Phase 2:
interleaved timing rounds, every configuration once per round in an order shuffled with a fixed
seed. Then the derived measurements: timing statistic, speed-ups, fidelity against the eager
uncached outputs, compiled peers' counts from their eager twins.

Isolation in one process: each configuration has its own copy of the transformer with a private
``forward`` code object (``private_forward``) and its own backend object (``Backend``), so Dynamo
never reuses another configuration's graphs or per-code state.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import random
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from . import measurements
from .measurements import LinearCounter, PeakRSS, Result, dynamo_delta, dynamo_snapshot
from .peers import Method, calibrate_magcache, configurations
from .rendering import fmt
from .settings import Settings
from .workloads import load


def log(message: str) -> None:
    print(message, flush=True)


class Backend:
    """A registered Dynamo backend behind an object of its own: Dynamo matches cached graphs to the
    backend by identity, so configurations never reuse each other's compiled graphs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inner = torch._dynamo.lookup_backend(name)

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        return self.inner(gm, example_inputs)


def private_forward(transformer: Any) -> None:
    """Give this transformer a private copy of its ``forward`` code object.

    Dynamo keeps its per-code state (cache entries, "skip this frame" marks after an unhandled graph
    break, recompile limits) on the code object, which every copy of the model shares. Without this,
    one configuration that makes Dynamo skip ``FluxTransformer2DModel.forward`` (cache-dit's
    ``unittest.mock.patch`` inside an ``ExitStack``) would change how every other compiled
    configuration in the process is traced.
    """
    fn = type(transformer).forward
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{id(transformer):x}")
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__wrapped__ = getattr(fn, "__wrapped__", fn)
    transformer.forward = types.MethodType(clone, transformer)


class Harness:
    """One workload, its samples and batches; builds, generates and measures configurations."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workload, self.embeddings = load(settings.model, settings.random_weights)
        self.base = self.workload.transformer
        self.labels = [i % 10 for i in range(settings.samples)]
        self.batches = [self.labels[i : i + settings.batch] for i in range(0, settings.samples, settings.batch)]
        # one call per step where the pipeline batches cond and uncond (StableDiffusion3Pipeline)
        batched = self.workload.batched_guidance
        self.calls_per_generation = settings.steps if batched else settings.calls_per_generation
        self.full_macs_per_call: int | None = None  # set by the uncached eager run
        self.mag_ratios: list[float] = []
        self.mag_calibration: dict[str, Any] = {}

    # -- building blocks of a configuration
    def fresh_transformer(self, counting: bool) -> tuple[Any, LinearCounter | None]:
        transformer = copy.deepcopy(self.base)
        private_forward(transformer)
        counter = None
        if counting:
            counter = LinearCounter()
            counter.install(transformer)
        return transformer, counter

    def pipeline(self, transformer: Any, isolate_class: bool = False) -> Any:
        pipe = self.workload.build_pipeline(transformer)
        if isolate_class:
            # cache-dit patches ``type(pipe).__call__``: give each cached pipe its own class.
            pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {})
        return pipe

    def compile_uncached(self, transformer: Any, backend: str) -> Any:
        """``torch.compile`` with a backend object of its own (no cache entries shared across configs)."""
        return torch.compile(transformer, backend=Backend(backend))

    def generate_batch(self, pipe: Any, labels: list[int], generator: torch.Generator) -> torch.Tensor:
        s = self.settings
        return self.workload.call(pipe, self.embeddings, labels, s.guidance, s.steps, generator)

    def generate(self, pipe: Any, after_batch: Any = None) -> torch.Tensor:
        """All samples, batch by batch, each batch from its own seed; ``after_batch(pipe)`` after each."""
        outputs = []
        for b, labels in enumerate(self.batches):
            outputs.append(self.generate_batch(pipe, labels, torch.Generator().manual_seed(self.settings.seed + b)))
            if after_batch is not None:
                after_batch(pipe)
        return torch.cat(outputs)

    # -- the run
    def run(self) -> dict[str, Any]:
        """Every configuration of the settings, measured; the results JSON (``setup``, ``results``)."""
        s = self.settings
        if s.perceptual:
            from .perceptual import load_efficientnet_lite0

            load_efficientnet_lite0()  # fail now, not after the run, if the weights package is missing
        mag_ratios: list[float] | None = None
        if s.sweeps.magcache:
            try:
                mag_ratios, self.mag_calibration = calibrate_magcache(self)
                self.mag_ratios = mag_ratios
                log(
                    f"MagCache calibrated ({self.mag_calibration['seconds']:.1f}s): {[round(x, 3) for x in mag_ratios]}"
                )
            except Exception as e:  # noqa: BLE001  (the run goes on without MagCache, and says so)
                log(f"MagCache calibration failed: {e!r}")
                self.mag_calibration = {"error": repr(e)}
        module_names = [n for n, _ in self.base.named_modules()]
        configs = configurations(s, module_names, mag_ratios)
        started = time.perf_counter()
        results, live, outputs = self.measure(configs, started)
        self.time_rounds(results, live, started)
        self.derive(results, live, outputs)
        return self.meta(list(results.values()), time.perf_counter() - started)

    def measure(
        self, configs: list[Method], started: float
    ) -> tuple[dict[str, Result], dict[str, tuple[Method, Any]], dict[str, torch.Tensor]]:
        """Phase 1: build, warm up (compile), measured generation (counts, outputs, memory)."""
        results: dict[str, Result] = {}
        live: dict[str, tuple[Method, Any]] = {}
        outputs: dict[str, torch.Tensor] = {}
        for c in configs:
            key = c.key
            r = Result(c.name, c.label, c.param, c.variant, c.kind, calls_per_gen=self.calls_per_generation)
            results[key] = r
            try:
                prepared = c.prepare(self)
                records: list[Any] = []

                def keep(pipe: Any, prepared: Any = prepared, records: list[Any] = records) -> None:
                    records.append(prepared.record_batch(pipe))

                after_batch = keep if prepared.record_batch is not None else None
                snap = dynamo_snapshot()
                with PeakRSS() as mem, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    first = self.generate(prepared.pipe, after_batch)
                    r.warmup_s = time.perf_counter() - t0
                r.warmup_peak_rss_mib = mem.delta_mib
                d = dynamo_delta(snap)
                r.graphs, r.graph_breaks, r.frames = d["graphs"], d["breaks"], d["frames"]
                records.clear()  # only the measured generation's
                counter = prepared.linear_counter
                if counter is not None:
                    counter.start()
                snap = dynamo_snapshot()
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    out = self.generate(prepared.pipe, after_batch)
                    r.time_all.append(time.perf_counter() - t0)
                r.peak_rss_mib = mem.delta_mib
                d = dynamo_delta(snap)
                r.recompiles += d["frames"]
                r.graphs += d["graphs"]
                r.graph_breaks += d["breaks"]
                r.repeat_max_abs_diff = (out - first).abs().max().item()
                outputs[key] = out
                if counter is not None:
                    calls = counter.per_call
                    if c.kind == "uncached" and calls:
                        self.full_macs_per_call = max(calls)
                    measurements.counts_from_linears(
                        r, calls, self.full_macs_per_call or max(calls), self.calls_per_generation, len(self.batches)
                    )
                c.read_records(r, records, self)
                live[key] = (c, prepared.pipe)
                log(
                    f"[{time.perf_counter() - started:6.0f}s] {key:55s} warm-up {r.warmup_s:6.1f}s  gen "
                    f"{r.time_all[0]:.2f}s  "
                    f"full {fmt(r.full_evals_per_gen)}/{self.calls_per_generation}  graphs {r.graphs} breaks "
                    f"{r.graph_breaks}"
                )
            except Exception as e:  # noqa: BLE001  (recorded in the results: "Did not run")
                r.status = "failed"
                r.error = f"{type(e).__name__}: {e}".strip()[:600]
                r.extra["traceback"] = traceback.format_exc()[-3000:]
                log(f"[{time.perf_counter() - started:6.0f}s] {key:55s} FAILED: {r.error[:300]}")
        return results, live, outputs

    def time_rounds(self, results: dict[str, Result], live: dict[str, tuple[Method, Any]], started: float) -> None:
        """Phase 2: interleaved timing rounds (order shuffled per round with a fixed seed)."""
        rng = random.Random(self.settings.seed)
        keys = list(live)
        for round_index in range(self.settings.rounds):
            order = keys[:]
            rng.shuffle(order)
            for key in order:
                _, pipe = live[key]
                snap = dynamo_snapshot()
                t0 = time.perf_counter()
                try:
                    self.generate(pipe)
                except Exception as e:  # noqa: BLE001  (recorded in the results)
                    results[key].status = "failed"
                    results[key].error = f"timing: {type(e).__name__}: {e}"[:600]
                    results[key].extra["traceback"] = traceback.format_exc()[-3000:]
                    log(f"{key} FAILED in timing: {results[key].error[:300]}")
                    live.pop(key)
                    keys.remove(key)
                    continue
                results[key].time_all.append(time.perf_counter() - t0)
                results[key].recompiles += dynamo_delta(snap)["frames"]
            log(f"[{time.perf_counter() - started:6.0f}s] timing round {round_index + 1}/{self.settings.rounds} done")

    def derive(
        self, results: dict[str, Result], live: dict[str, tuple[Method, Any]], outputs: dict[str, torch.Tensor]
    ) -> None:
        """Timing statistic, fidelity against the eager uncached outputs, twins' counts, speed-ups."""
        s = self.settings
        reference = outputs.get("uncached|eager")
        reference_features = None
        if reference is not None and s.perceptual:
            from .perceptual import normalized_features

            reference_features = normalized_features(reference)
        for key, r in results.items():
            if r.status != "ok":
                continue
            measurements.summarize_times(r, s.time_stat)
            if reference is not None:
                measurements.fidelity(r, outputs[key], reference, reference_features)
            twin = live[key][0].twin
            if twin and twin in outputs:
                diff = (outputs[key] - outputs[twin]).abs().max().item()
                measurements.adopt_twin_counts(r, results[twin], diff)
        measurements.set_speedups(list(results.values()))

    def alpha_files(self) -> list[dict[str, Any]]:
        """Provenance of the α tables shipped next to the weights (what ``alpha='auto'`` can pick)."""
        import hashlib

        directory = Path(self.workload.weights)
        out = []
        if directory.is_dir():
            for f in sorted(directory.glob("*alpha*")):
                out.append(
                    {
                        "path": str(f),
                        "sha256": hashlib.sha256(f.read_bytes()).hexdigest()[:16],
                        "mtime_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.stat().st_mtime)),
                    }
                )
        return out

    def meta(self, results: list[Result], wall: float) -> dict[str, Any]:
        import diffusers

        try:
            import cache_dit
        except ImportError:
            cache_dit = None

        s = self.settings
        w = self.workload
        return {
            "setup": {
                "model": w.description,
                "model_key": w.key,
                "title": w.title,
                "trained": w.trained,
                "pipeline": w.pipeline,
                "weights": w.weights,
                "steps": s.steps,
                "samples": s.samples,
                "batch": s.batch,
                "labels": self.labels,
                "seed": s.seed,
                "guidance": (
                    f"{w.guidance_arg}={s.guidance} "
                    + (
                        "(cond and uncond batched in one call)"
                        if w.batched_guidance
                        else "(cond and uncond as separate calls)"
                    )
                    if s.guidance > 1
                    else "no guidance (one call per step)"
                ),
                "transformer_calls_per_generation": self.calls_per_generation,
                "timing": f"{s.time_stat} of {s.rounds + 1} generations of all {s.samples} samples (1 measured + "
                f"{s.rounds} interleaved rounds)",
                "time_stat": s.time_stat,
                "alpha_files": self.alpha_files(),
                "threads": torch.get_num_threads(),
                "alpha": s.alpha,
                "peer_backend": s.peer_backend,
                "ours_compiler": s.ours_compiler,
                "magcache_calibration": self.mag_calibration,
                "magcache_ratios": self.mag_ratios,
                "versions": {
                    "torch": torch.__version__,
                    "diffusers": diffusers.__version__,
                    "cache_dit": getattr(cache_dit, "__version__", "not installed"),
                    "python": platform.python_version(),
                },
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, load {os.getloadavg()}",
                "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "wall_s": wall,
                "quick": s.quick,
                "argv": list(s.argv),
            },
            "results": [dataclasses.asdict(r) for r in results],
        }
