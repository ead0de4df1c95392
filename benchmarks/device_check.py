"""One device check (issue 23): ScalingCache with CUDA graphs on one GPU, in at most 8 minutes.

    .venv/bin/python benchmarks/device_check.py                       # on a CUDA device
    .venv/bin/python benchmarks/device_check.py --cpu-smoke --out DIR  # the same code paths, tiny, on CPU

writes ``device_check.json`` and ``device_check.md`` (default ``benchmarks/results/``). Per model
(FLUX.1-dev geometry at 1024², Wan2.1-1.3B at 480p / 81 frames; random weights, bf16, the first
blocks only unless ``--flux-blocks`` / ``--wan-blocks`` say otherwise: per-block figures are
extrapolated to the whole model and the JSON says so):

* correctness: on the trajectory of plain ``torch.compile(backend="inductor")``, each of our full
  steps against Inductor's output for the same input (relative L2 error, bf16 tolerance) and each
  cached step's relative error; the same generation with the step graphs captured and uncaptured
  (equal); ``torch.cuda.set_sync_debug_mode("error")`` around every cached call of a warm
  generation under the planned schedule (``speedup=2.5``, which reads no statistics);
* step times (CUDA events, synchronised before each call, warm, median): Inductor's full step,
  our full step, our cached step replayed as a CUDA graph and run uncaptured;
* generations of 28 and 50 steps (CUDA events, warm, median of ``--repeats``): plain
  ``torch.compile``, ours (default dynamic schedule and ``speedup=2.5``, ``mode="reduce-overhead"``),
  diffusers' FirstBlockCache and TaylorSeerCache (hooks as ``benchmarks/cachebench/peers.py`` installs
  them, compiled with Inductor) on the same model, through one minimal pipeline loop
  (``FlowMatchEulerDiscreteScheduler``, ``cache_context("cond" | "uncond")``, guidance as separate
  calls for Wan);
* peak memory of our generation over Inductor's, against ``sc_compile.explain``'s buffer bytes
  (and the bytes our CUDA-graph captures hold).

Parts run in order of importance; one that would not fit the time budget (``--budget``, default
450 s, under the 8 minutes) is skipped, and the budget's end interrupts a running part
(``SIGALRM``); both are listed in the JSON under ``skipped``. ``--cpu-smoke`` runs every part at a
tiny size on the CPU (plain and peers with Dynamo's ``eager`` backend, ours with Inductor so the
``reduce-overhead`` path runs) in under a minute; CUDA-only measurements are reported as skipped
with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from memory_model import FLUX_DEV_CONFIG, wan_config  # benchmarks/ is the script's folder

import sc_compile
from sc_compile.memory import graph_memory_bytes
from sc_compile.runtime.cuda_graphs import CudaGraphStep
from sc_compile.runtime.dispatch import latest_runtime

RESULTS = Path(__file__).resolve().parent / "results"
STEP_COUNTS = (28, 50)
SPEEDUP = 2.5
# Relative L2 error of our full step against Inductor's on the same input: bf16 rounding of two
# differently fused graphs (float32: the same arithmetic up to reordering).
FULL_STEP_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


class BudgetExceeded(BaseException):  # noqa: N818 - not an error: no handler of Dynamo or ours may catch it
    """The time budget ran out while a part was running."""


# --------------------------------------------------------------------------- models


@dataclasses.dataclass
class Case:
    """One model: how to build it (random weights), its inputs, its scheduler and guidance."""

    name: str
    geometry: str
    build: Callable[[str | torch.device], torch.nn.Module]  # device -> model (reduced blocks)
    build_full: Callable[[str | torch.device], torch.nn.Module]  # the whole model's geometry
    block_prefixes: tuple[str, ...]
    latents_shape: tuple[int, ...]
    cond: dict[str, Any]  # keyword inputs other than hidden_states and timestep
    uncond: dict[str, Any] | None  # guidance as a second call (None: guidance-distilled)
    timestep_scale: float  # the pipeline feeds t / timestep_scale
    shift: float
    guidance_scale: float = 5.0

    def to(self, device: torch.device, dtype: torch.dtype) -> Case:
        def move(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
            if kwargs is None:
                return None
            return {
                k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
                if isinstance(v, torch.Tensor)
                else v
                for k, v in kwargs.items()
            }

        return dataclasses.replace(self, cond=move(self.cond), uncond=move(self.uncond))


def flux_case(smoke: bool, blocks: tuple[int, int]) -> Case:
    from diffusers import FluxTransformer2DModel

    if smoke:
        config = dict(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        tokens, text, geometry = 16, 8, "tiny Flux (smoke), 16 image + 8 text tokens"
    else:  # FLUX.1-dev
        config = FLUX_DEV_CONFIG
        tokens, text, geometry = 64 * 64, 512, "FLUX.1-dev, 1024x1024 (4096 image + 512 text tokens)"
    reduced = dict(config, num_layers=min(blocks[0], config["num_layers"]))
    reduced["num_single_layers"] = min(blocks[1], config["num_single_layers"])
    generator = torch.Generator().manual_seed(1)
    side = int(tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    cond = dict(
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=generator),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5]),
    )

    def build(device, cfg=reduced):
        with torch.device(device):
            return FluxTransformer2DModel(**cfg).eval()

    return Case(
        name="flux",
        geometry=geometry,
        build=build,
        build_full=lambda device: build(device, config),
        block_prefixes=("transformer_blocks.", "single_transformer_blocks."),
        latents_shape=(1, tokens, config["in_channels"]),
        cond=cond,
        uncond=None,
        timestep_scale=1000.0,
        shift=3.0,
    )


def wan_case(smoke: bool, blocks: int) -> Case:
    from diffusers import WanTransformer3DModel

    if smoke:
        config = dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )
        latents, text, geometry = (1, 4, 3, 8, 8), 8, "tiny Wan (smoke), 3x8x8 latents"
    else:  # Wan2.1-T2V-1.3B
        config = dict(wan_config(heads=12, ffn=8960, layers=30), rope_max_seq_len=1024)
        latents, text = (1, 16, 21, 60, 104), 512
        geometry = "Wan2.1-1.3B, 480x832, 81 frames (21x60x104 latents, 32760 tokens), guidance as two calls"
    reduced = dict(config, num_layers=min(blocks, config["num_layers"]))
    generator = torch.Generator().manual_seed(2)

    def build(device, cfg=reduced):
        with torch.device(device):
            return WanTransformer3DModel(**cfg).eval()

    return Case(
        name="wan",
        geometry=geometry,
        build=build,
        build_full=lambda device: build(device, config),
        block_prefixes=("blocks.",),
        latents_shape=latents,
        cond=dict(encoder_hidden_states=torch.randn(1, text, config["text_dim"], generator=generator)),
        uncond=dict(encoder_hidden_states=torch.randn(1, text, config["text_dim"], generator=generator)),
        timestep_scale=1.0,
        shift=5.0,
    )


def block_parameters(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


# --------------------------------------------------------------------------- the loop


class Timer:
    """Elapsed seconds of a callable: CUDA events on a CUDA device, else the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], sync_before: bool = True) -> tuple[float, Any]:
        if self.cuda:
            if sync_before:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        begin = time.perf_counter()
        out = fn()
        return time.perf_counter() - begin, out


class Pipe:
    """A minimal diffusers-style pipeline: scheduler, denoising loop, named guidance calls.

    ``reference``: a second model called on the same inputs at every step; the loop then follows
    the reference's trajectory and records both outputs (correctness). ``call_hook(step, stream,
    call)`` runs each call of ``transformer`` (timing, sync checks)."""

    def __init__(self, transformer: torch.nn.Module, case: Case, reference: torch.nn.Module | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=case.shift)
        self.case = case
        self.reference = reference
        self.call_hook: Callable[[int, str, Callable[[], Any]], Any] | None = None
        self.records: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []

    @property
    def components(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "scheduler": self.scheduler}

    def _call(self, model, step: int, stream: str, latents, timestep, kwargs, hooked: bool):
        def call():
            with model.cache_context(stream):
                return model(hidden_states=latents, timestep=timestep, **kwargs, return_dict=False)[0]

        return self.call_hook(step, stream, call) if hooked and self.call_hook is not None else call()

    def _predict(self, model, step: int, latents, t, hooked: bool):
        timestep = (t / self.case.timestep_scale).expand(latents.shape[0]).float()
        cond = self._call(model, step, "cond", latents, timestep, self.case.cond, hooked)
        if self.case.uncond is None:
            return {"cond": cond}, cond
        uncond = self._call(model, step, "uncond", latents, timestep, self.case.uncond, hooked)
        return {"cond": cond, "uncond": uncond}, uncond + self.case.guidance_scale * (cond - uncond)

    def __call__(self, latents: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        for step, t in enumerate(self.scheduler.timesteps):
            outputs, noise = self._predict(self.transformer, step, latents, t, hooked=True)
            if self.reference is not None:
                references, noise = self._predict(self.reference, step, latents, t, hooked=False)
                for stream, out in outputs.items():
                    self.records.append((step, stream, out.float(), references[stream].float()))
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@contextlib.contextmanager
def uncaptured(model: torch.nn.Module) -> Iterator[None]:
    """Run our step graphs without their CUDA-graph captures (the same compiled code)."""
    runtime = latest_runtime(model)
    steps = [s for s in (runtime.full_step, runtime.cached_step) if isinstance(s.fn, CudaGraphStep)]
    wrappers = [s.fn for s in steps]
    for step, wrapper in zip(steps, wrappers, strict=True):
        step.fn = wrapper.fn
    try:
        yield
    finally:
        for step, wrapper in zip(steps, wrappers, strict=True):
            step.fn = wrapper


# --------------------------------------------------------------------------- the check


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.timer = Timer(self.device)
        self.start = time.monotonic()
        self.budget = args.budget
        self.repeats = 1 if self.smoke else args.repeats
        self.plain_backend = "eager" if self.smoke else "inductor"
        self._compiled: dict[tuple[int, str], torch.nn.Module] = {}
        self.in_part = False
        self.out_of_time = False
        self.result: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "smoke": self.smoke,
            "device": "cpu" if self.smoke else torch.cuda.get_device_name(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
            "budget_s": self.budget,
            "plain_backend": self.plain_backend,
            "models": {},
            "skipped": [],
            "errors": [],
        }

    # -- the budget --------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def part(self, model: str, name: str, estimate: float, fn: Callable[[], Any]) -> Any:
        label = f"{model}: {name}"
        if self.out_of_time or self.remaining() < estimate:
            self.skip(label, f"time budget: {self.remaining():.0f} s left, the part needs about {estimate:.0f} s")
            return None
        begin = time.monotonic()
        print(f"[{time.monotonic() - self.start:6.1f} s] {label}", flush=True)
        self.in_part = True
        try:
            return fn()
        except BudgetExceeded:
            self.skip(label, f"interrupted: the time budget ({self.budget:.0f} s) ran out during it")
            return None
        except Exception as error:  # noqa: BLE001 - a failing part is reported, and the run goes on
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            print(f"  FAILED {label}: {message}", flush=True)
            self.result["errors"].append({"part": label, "error": message})
            return None
        finally:
            self.in_part = False
            self.result.setdefault("part_seconds", {})[label] = round(time.monotonic() - begin, 1)

    def skip(self, label: str, reason: str) -> None:
        print(f"  skipped {label}: {reason}", flush=True)
        self.result["skipped"].append({"part": label, "reason": reason})

    def cuda_only(self, label: str) -> bool:
        if self.device.type != "cuda":
            self.skip(label, "CUDA only (this is the CPU smoke run)")
            return False
        return True

    # -- compiling ----------------------------------------------------------------------------
    def compiled(self, model: torch.nn.Module, which: str) -> torch.nn.Module:
        """One compile per model and method, shared by the parts (Dynamo keeps one entry per backend)."""
        key = (id(model), which)
        if key not in self._compiled:
            if which == "plain":
                self._compiled[key] = torch.compile(model, backend=self.plain_backend)
            else:
                options = {"speedup": SPEEDUP} if which == "ours" else {}
                if self.smoke:  # the CPU has no CUDA graphs to capture: Dynamo's graph as it is, quickly
                    config = sc_compile.ScalingCacheConfig(alpha="ones", compiler="eager", **options)
                    self._compiled[key] = sc_compile.compile(model, config)
                else:
                    config = sc_compile.ScalingCacheConfig(alpha="ones", **options)
                    self._compiled[key] = sc_compile.compile(model, config, mode="reduce-overhead")
        return self._compiled[key]

    def plain(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.compiled(model, "plain")

    def ours(self, model: torch.nn.Module, default: bool = False) -> torch.nn.Module:
        """Ours with the planned schedule (``speedup=2.5``), or the default dynamic schedule."""
        return self.compiled(model, "ours_default" if default else "ours")

    def latents(self, case: Case, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(case.latents_shape, generator=generator).to(self.device, self.dtype)

    def generation_seconds(self, pipe: Pipe, case: Case, steps: int) -> float:
        """Median wall time of warm generations (the first, which compiles and captures, untimed)."""
        with torch.no_grad():
            pipe(self.latents(case), steps)
            times = [self.timer(lambda: pipe(self.latents(case), steps))[0] for _ in range(self.repeats)]
        return statistics.median(times)

    # -- one model ----------------------------------------------------------------------------
    def prepare(self, case: Case) -> tuple[Case, torch.nn.Module, dict[str, Any]]:
        """The model (random weights), its block counts and ``explain``'s figures."""
        out: dict[str, Any] = {"geometry": case.geometry, "generations": []}
        self.result["models"][case.name] = out
        torch.manual_seed(0)
        model = case.build(self.device).to(self.dtype)
        case = case.to(self.device, self.dtype)
        full_geometry = case.build_full("meta")

        def blocks(module: torch.nn.Module) -> int:
            return sum(1 for n, _ in module.named_modules() if n.count(".") == 1 and n.startswith(case.block_prefixes))

        out["blocks"] = {
            "measured": blocks(model),
            "model": blocks(full_geometry),
            "block_parameters_measured": block_parameters(model, case.block_prefixes),
            "block_parameters_model": block_parameters(full_geometry, case.block_prefixes),
        }
        out["explain"] = {"streams": 1 if case.uncond is None else 2}
        out["explain"]["measured_blocks"] = self.part(
            case.name, "explain", 5, lambda: self.explain(case, case.build("meta"))
        )
        return case, model, out

    def core(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        # Memory first: Inductor's generation is measured before any state of ours exists.
        self.part(case.name, "memory", 30, lambda: self.memory(case, model, out))
        self.part(case.name, "correctness", 40, lambda: self.correctness(case, model, out))
        self.part(case.name, "step times", 20, lambda: self.step_times(case, model, out))

    def explain(self, case: Case, module: torch.nn.Module) -> dict[str, Any]:
        """``sc_compile.explain``'s figures for ``module`` (on the meta device: nothing is allocated)."""
        meta = case.to(torch.device("meta"), self.dtype)
        latents = torch.empty(case.latents_shape, device="meta", dtype=self.dtype)
        timestep = torch.ones(1, device="meta", dtype=self.dtype)
        explanation = sc_compile.explain(module.to(self.dtype), hidden_states=latents, timestep=timestep, **meta.cond)
        return {
            "cache_points": len(explanation.cache_points),
            "buffer_bytes_per_stream": explanation.buffer_bytes_per_stream,
            "cached_step_buffer_bytes": explanation.cached_step_buffer_bytes,
        }

    def explain_whole(self, case: Case, out: dict[str, Any]) -> None:
        """The whole model's figures (a longer trace: after the measurements)."""
        if out["blocks"]["measured"] == out["blocks"]["model"]:
            out["explain"]["whole_model"] = out["explain"].get("measured_blocks")
            return
        out["explain"]["whole_model"] = self.explain(case, case.build_full("meta"))

    def correctness(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        plain, ours = self.plain(model), self.ours(model)
        pipe = Pipe(ours, case, reference=plain)
        sc_compile.enable(pipe)
        steps = STEP_COUNTS[0]
        with torch.no_grad():
            pipe(self.latents(case), steps)
        report = sc_compile.report(ours)
        full = {
            (s, name)
            for name, stream in zip(("cond", "uncond"), report.streams, strict=False)
            for s in stream.full_steps
        }
        full_errors = [relative_error(a, b) for s, name, a, b in pipe.records if (s, name) in full]
        cached_errors = [relative_error(a, b) for s, name, a, b in pipe.records if (s, name) not in full]
        tolerance = FULL_STEP_TOLERANCE[self.dtype]
        checks: dict[str, Any] = {
            "steps": steps,
            "full_steps": list(report.full_steps),
            "full_vs_plain_max_rel_error": max(full_errors),
            "full_vs_plain_tolerance": tolerance,
            "full_vs_plain_ok": max(full_errors) <= tolerance,
            "cached_vs_plain_rel_error_median": statistics.median(cached_errors) if cached_errors else None,
            "cached_vs_plain_rel_error_max": max(cached_errors) if cached_errors else None,
        }
        out["correctness"] = checks
        # The same generation (ours' own trajectory) captured and uncaptured.
        pipe = Pipe(ours, case)
        sc_compile.enable(pipe)
        with torch.no_grad():
            captured = pipe(self.latents(case, 1), steps)
            with uncaptured(model):
                plain_run = pipe(self.latents(case, 1), steps)
        runtime = latest_runtime(model)
        checks["captures"] = {
            name: {"captures": step.fn.num_captures, "replays": step.fn.num_replays}
            if isinstance(step.fn, CudaGraphStep)
            else "none (not a CUDA device: the step graphs run uncaptured)"
            for name, step in (("full_step", runtime.full_step), ("cached_step", runtime.cached_step))
        }
        checks["captured_vs_uncaptured_max_abs_diff"] = float((captured.float() - plain_run.float()).abs().max())
        checks["captured_vs_uncaptured_ok"] = bool(torch.allclose(captured.float(), plain_run.float(), rtol=tolerance))
        if self.cuda_only(f"{case.name}: sync check"):
            checks["sync"] = self.sync_check(pipe, case, steps, report)

    def sync_check(self, pipe: Pipe, case: Case, steps: int, report: Any) -> dict[str, Any]:
        """Every cached call of a warm generation under set_sync_debug_mode("error"); full calls
        under "warn", counted (the planned schedule reads no statistics)."""
        cached = set(report.cached_steps)
        full_syncs: list[int] = []

        def hook(step: int, stream: str, call: Callable[[], Any]) -> Any:
            if step in cached:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    full_syncs.append(sum("synchroniz" in str(w.message) for w in caught))

        pipe.call_hook = hook
        error = None
        try:
            with torch.no_grad():
                pipe(self.latents(case, 2), steps)
        except RuntimeError as caught:  # a sync in a cached call: the finding, reported
            error = str(caught).splitlines()[0]
        finally:
            pipe.call_hook = None
        return {
            "cached_calls_checked": len(cached) * (1 if case.uncond is None else 2),
            "cached_calls_sync_free": error is None,
            "error": error,
            "syncs_in_full_calls": sum(full_syncs),
        }

    def step_times(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        plain, ours = self.plain(model), self.ours(model)
        steps = STEP_COUNTS[0]
        times: dict[str, list[float]] = {"plain_full": [], "full": [], "cached": [], "cached_uncaptured": []}

        def timed(pipe: Pipe, label: Callable[[int], str | None]):
            def hook(step: int, stream: str, call: Callable[[], Any]) -> Any:
                seconds, result = self.timer(call)
                key = label(step)
                if key is not None:
                    times[key].append(seconds)
                return result

            pipe.call_hook = hook

        pipe = Pipe(plain, case)
        with torch.no_grad():
            pipe(self.latents(case), steps)  # compiles
            timed(pipe, lambda step: "plain_full")
            for _ in range(self.repeats):
                pipe(self.latents(case), steps)
        pipe = Pipe(ours, case)
        sc_compile.enable(pipe)
        with torch.no_grad():
            pipe(self.latents(case), steps)  # compiles and captures
            cached = set(sc_compile.report(ours).cached_steps)
            timed(pipe, lambda step: "cached" if step in cached else "full")
            for _ in range(self.repeats):
                pipe(self.latents(case), steps)
            timed(pipe, lambda step: "cached_uncaptured" if step in cached else None)
            with uncaptured(model):
                for _ in range(self.repeats):
                    pipe(self.latents(case), steps)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        blocks = out["blocks"]
        scale = blocks["block_parameters_model"] / blocks["block_parameters_measured"]
        # What the blocks cost: a full step less what runs without them (the cached step's graph).
        blocks_ms = ms["plain_full"] - ms["cached"]
        whole = ms["plain_full"] + (scale - 1.0) * blocks_ms
        out["step_ms"] = {
            **{f"{k}_ms": v for k, v in ms.items()},
            "cached_over_full": ms["cached"] / ms["plain_full"],
            "cached_uncaptured_over_full": ms["cached_uncaptured"] / ms["plain_full"],
            "whole_model_full_ms_extrapolated": whole,
            "whole_model_cached_over_full_extrapolated": ms["cached"] / whole,
            "extrapolation": (
                f"{blocks['measured']} of {blocks['model']} blocks measured; the whole model's full step = measured "
                f"full step + (block parameters of the whole model / measured = {scale:.2f} - 1) x (full step - cached "
                "step); the cached step does not depend on the number of blocks"
            ),
        }

    def memory(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        """Peak allocated memory of a warm generation, ours (run uncaptured, so that the activations
        are allocations as in Inductor's) over Inductor's, measured before ours ever ran; the bytes
        the CUDA-graph captures hold besides (their pool's intermediates are never allocations)."""
        if not self.cuda_only(f"{case.name}: peak memory"):
            return
        steps = STEP_COUNTS[0]
        peaks = {}
        for label in ("plain", "ours"):
            compiled = self.plain(model) if label == "plain" else self.ours(model)
            pipe = Pipe(compiled, case)
            if label == "ours":
                sc_compile.enable(pipe)
            with torch.no_grad():
                pipe(self.latents(case), steps)  # compiles (and captures)
                with uncaptured(model) if label == "ours" else contextlib.nullcontext():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    pipe(self.latents(case), steps)
                    torch.cuda.synchronize()
            peaks[label] = torch.cuda.max_memory_allocated()
        graphs = graph_memory_bytes([latest_runtime(model)])
        explain = out["explain"]
        expected = (explain.get("measured_blocks") or {}).get("buffer_bytes_per_stream", 0) * explain["streams"]
        extra = peaks["ours"] - peaks["plain"]
        out["memory"] = {
            "peak_plain_bytes": peaks["plain"],
            "peak_ours_uncaptured_bytes": peaks["ours"],
            "extra_bytes": extra,
            "explain_state_bytes": expected,
            "extra_over_explain": extra / expected if expected else None,
            "cuda_graph_bytes": graphs,
            "note": "peaks of warm generations, Inductor's first (before ours ran), ours uncaptured; "
            "cuda_graph_bytes: what the captures of ours hold besides (pool segments and static inputs, "
            "measured at capture)",
        }

    def generations(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        methods: list[tuple[str, Callable[[], torch.nn.Module], bool]] = [
            ("torch.compile", lambda: self.plain(model), False),
            ("ScalingCache (default)", lambda: self.ours(model, default=True), True),
            (f"ScalingCache (speedup={SPEEDUP})", lambda: self.ours(model), True),
        ]
        for name, make, is_ours in methods:
            self.part(
                case.name,
                f"generations: {name}",
                20,
                lambda name=name, make=make, is_ours=is_ours: self.run_generations(case, name, make, is_ours, out),
            )

    def run_generations(self, case: Case, name: str, make, is_ours: bool, out: dict[str, Any], peer=None) -> None:
        compiled = make()
        pipe = Pipe(compiled, case)
        if is_ours:
            sc_compile.enable(pipe)
        for steps in STEP_COUNTS:
            seconds = self.generation_seconds(pipe, case, steps)
            row: dict[str, Any] = {"method": name, "steps": steps, "wall_ms": seconds * 1e3}
            if is_ours:
                row["full_steps"] = len(sc_compile.report(compiled).full_steps)
            if peer is not None:
                peer._reset_stateful_cache()
            out["generations"].append(row)

    def peers(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

        numbered = any(n.startswith("blocks.") and ".attn" in n for n, _ in model.named_modules())
        peers = [
            ("FirstBlockCache thr=0.08", FirstBlockCacheConfig(threshold=0.08)),
            (
                "TaylorSeerCache interval=3",
                TaylorSeerCacheConfig(
                    cache_interval=3,
                    disable_cache_before_step=3,
                    max_order=1,
                    taylor_factors_dtype=torch.float32,
                    cache_identifiers=[r"^blocks\.\d+\.attn\d+$"] if numbered else None,
                ),
            ),
        ]
        for name, config in peers:
            torch._dynamo.reset()
            model.enable_cache(config)
            try:
                # Compiled as the plain model (the smoke run: eager, the hooks' code path without Dynamo).
                peer = model if self.smoke else torch.compile(model, backend=self.plain_backend)
                self.run_generations(case, name, lambda peer=peer: peer, False, out, peer=model)
            finally:
                model.disable_cache()

    def plain_cudagraphs(self, case: Case, model: torch.nn.Module, out: dict[str, Any]) -> None:
        """Uncached, with Inductor's own CUDA graphs (cudagraph trees): the fastest uncached
        reference there is, where the trees run the loop (guidance as two calls reads the first
        call's output after the second call replayed)."""
        if not self.cuda_only(f"{case.name}: generations: torch.compile reduce-overhead"):
            return
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="inductor", mode="reduce-overhead")
        self.run_generations(case, "torch.compile (reduce-overhead)", lambda: compiled, False, out)

    # -- all ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cases = [
            flux_case(self.smoke, tuple(int(x) for x in self.args.flux_blocks.split(","))),
            wan_case(self.smoke, self.args.wan_blocks),
        ]

        def alarm(signum, frame):
            # The budget ran out: a running part is interrupted, every later part is skipped.
            self.out_of_time = True
            if self.in_part:
                raise BudgetExceeded

        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(int(self.remaining()), 1))
        try:
            # In order of importance: every model's checks and step times, then the generations,
            # then the peers (each part is skipped when it would not fit what is left).
            models = [self.prepare(case) for case in cases]
            for phase in (self.core, self.generations):
                for case, model, out in models:
                    phase(case, model, out)
            for case, _, out in models:
                self.part(case.name, "explain (whole model)", 30, lambda c=case, o=out: self.explain_whole(c, o))
            for case, model, out in models:
                self.part(case.name, "generations: peers", 60, lambda c=case, m=model, o=out: self.peers(c, m, o))
            for case, model, out in models:
                self.part(
                    case.name,
                    "generations: torch.compile reduce-overhead",
                    40,
                    lambda c=case, m=model, o=out: self.plain_cudagraphs(c, m, o),
                )
        finally:
            signal.alarm(0)
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.result["targets"] = targets(self.result)
        if self.smoke:
            self.result["targets"]["note"] = (
                "CPU smoke run: tiny models on the CPU exercise the code paths; not the targets"
            )
        return self.result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from what was measured (None: not measured)."""
    flux = result["models"].get("flux", {})
    found: dict[str, Any] = {
        "flux_cached_step_at_most_0.1pct_of_full_whole_model": None,
        "no_sync_in_cached_steps": None,
        "generation_speedup_at_least_0.95_of_ideal": None,
        "peak_memory_within_5pct_of_explain": None,
    }
    steps = flux.get("step_ms")
    if steps:
        found["flux_cached_step_at_most_0.1pct_of_full_whole_model"] = {
            "value": steps["whole_model_cached_over_full_extrapolated"],
            "met": steps["whole_model_cached_over_full_extrapolated"] <= 1e-3,
        }
    syncs = [m.get("correctness", {}).get("sync") for m in result["models"].values()]
    syncs = [s for s in syncs if s]
    if syncs:
        found["no_sync_in_cached_steps"] = {"met": all(s["cached_calls_sync_free"] for s in syncs)}
    ratios = []
    for model in result["models"].values():
        rows = model.get("generations", [])
        plain = {r["steps"]: r["wall_ms"] for r in rows if r["method"] == "torch.compile"}
        for r in rows:
            if "full_steps" in r and r["steps"] in plain:
                ideal = r["steps"] / r["full_steps"]
                ratios.append((plain[r["steps"]] / r["wall_ms"]) / ideal)
    if ratios:
        found["generation_speedup_at_least_0.95_of_ideal"] = {"worst": min(ratios), "met": min(ratios) >= 0.95}
    memory = [m["memory"]["extra_over_explain"] for m in result["models"].values() if m.get("memory")]
    memory = [m for m in memory if m is not None]
    if memory:
        found["peak_memory_within_5pct_of_explain"] = {
            "worst": max(memory, key=lambda x: abs(x - 1)),
            "met": all(abs(x - 1) <= 0.05 for x in memory),
        }
    return found


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Device check ({'CPU smoke' if result['smoke'] else result['device']})",
        "",
        f"`{result['command']}` — torch {result['torch']}, diffusers {result['diffusers']}, {result['dtype']}, "
        f"{result['elapsed_s']} s of a {result['budget_s']} s budget.",
        "",
    ]
    for name, model in result["models"].items():
        lines += [f"## {name}: {model['geometry']}", ""]
        blocks = model.get("blocks", {})
        lines.append(f"{blocks.get('measured')} of {blocks.get('model')} blocks measured (random weights).")
        lines.append("")
        if model.get("correctness"):
            c = model["correctness"]
            lines += [
                "| check | value |",
                "| --- | --- |",
                f"| full steps vs plain (max rel. L2 error) | {c['full_vs_plain_max_rel_error']:.2e} "
                f"(tolerance {c['full_vs_plain_tolerance']:g}: {'ok' if c['full_vs_plain_ok'] else 'FAILED'}) |",
                f"| cached steps vs plain (median / max rel. error) | {c['cached_vs_plain_rel_error_median']} / "
                f"{c['cached_vs_plain_rel_error_max']} |",
                f"| captured vs uncaptured (max abs diff) | {c['captured_vs_uncaptured_max_abs_diff']:.3g} |",
                f"| captures | {c['captures']} |",
                f"| sync check | {c.get('sync', 'not run')} |",
                "",
            ]
        if model.get("step_ms"):
            s = model["step_ms"]
            lines += ["| step | ms |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.4g} |" for k, v in s.items() if isinstance(v, float)]
            lines += ["", s["extrapolation"], ""]
        if model.get("memory"):
            lines += ["| memory | value |", "| --- | ---: |"]
            lines += [f"| {k} | {v} |" for k, v in model["memory"].items()]
            lines.append("")
        if model.get("generations"):
            lines += ["| method | steps | full steps | wall ms |", "| --- | ---: | ---: | ---: |"]
            for r in model["generations"]:
                lines.append(f"| {r['method']} | {r['steps']} | {r.get('full_steps', '')} | {r['wall_ms']:.1f} |")
            lines.append("")
    lines += ["## Targets", "", "```", json.dumps(result["targets"], indent=1), "```", ""]
    if result["skipped"]:
        lines += ["## Skipped", ""] + [f"* {s['part']}: {s['reason']}" for s in result["skipped"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (the code paths, in < 1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of device_check.{json,md}")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; parts that would not fit are skipped")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement (median)")
    parser.add_argument("--flux-blocks", default="1,2", help="double,single blocks of FLUX measured (of 19,38)")
    parser.add_argument("--wan-blocks", type=int, default=2, help="blocks of Wan2.1-1.3B measured (of 30)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke for the code paths on the CPU")
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    result = Check(args).run()
    for error in result["errors"]:
        print(f"error in {error['part']}: {error['error']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "device_check.md").write_text(markdown(result))
    print(f"wrote {args.out / 'device_check.json'} and device_check.md ({result['elapsed_s']} s)")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
