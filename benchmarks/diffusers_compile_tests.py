"""diffusers' own torch.compile tests, run with ``backend="scalingcache"`` next to plain ``aot_eager``.

Opt-in (not part of the test suite). Needs a checkout of diffusers' repository for its test
configurations (its ``tests/`` folder is not in the wheel):

    git clone https://github.com/huggingface/diffusers /tmp/diffusers-src
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusers_compile_tests.py --diffusers-src /tmp/diffusers-src

For every transformer test configuration in ``tests/models/transformers/test_models_*.py`` (every
``BaseModelTesterConfig`` subclass; its subclass that mixes in ``TorchCompileTesterMixin`` when the
file has one, so that its ``get_dummy_inputs`` and ``different_shapes_for_compilation`` overrides
apply), the script imports the configuration from the checkout at run time, builds the tiny model
from ``get_init_dict()`` and ``get_dummy_inputs()``, and runs:

* the bodies of ``TorchCompileTesterMixin`` (``tests/models/testing_utils/compile.py``, Apache-2.0,
  © HuggingFace), restated below with a ``backend=`` argument: recompilation and graph break,
  repeated blocks, group offloading, different shapes; each once with ``backend="aot_eager"``
  and once with ``backend="scalingcache"`` (``options={"compiler": "aot_eager"}``: Inductor would
  take minutes per model on this CPU). ``test_compile_works_with_aot`` is not run: it exports
  and AOT-compiles with Inductor and involves no ``torch.compile`` backend;
* an 8-step loop under ``sc_compile.generation`` with ``options={"static_interval": 2,
  "warmup_steps": 2}`` (a fixed schedule, so that a model that can be cached must have cached
  steps), the latent updated from the model's output by an Euler step: every full step's output
  is compared with the eager model's on the same inputs, and the report must list cached steps.

Each test is recorded as ``pass``, ``refused`` (our own error; its first line), ``crash`` (any
other exception with sc_compile code on its traceback: type, message and where, the innermost
sc_compile frame), ``fail`` (an exception with none of our code on the way: the model or Dynamo
fails by itself, as the plain ``aot_eager`` column then shows; or a check of the loop: a full step
differs from eager, or **no cached step** with the cache running: "caches nothing") or ``skip``
(the test does not apply, as the mixin skips it). Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import sc_compile

TESTS = ("recompilation_and_graph_break", "repeated_blocks", "group_offloading", "different_shapes")
BACKENDS = ("aot_eager", "scalingcache")
SC_OPTIONS = {"compiler": "aot_eager", "alpha": "ones"}
LOOP_STEPS = 8
LOOP_OPTIONS = {"compiler": "aot_eager", "alpha": "ones", "static_interval": 2, "warmup_steps": 2}
HIDDEN_KEYS = ("hidden_states", "sample", "x", "latents")
TIMESTEP_KEYS = ("timestep", "timesteps", "t")
# Our refusals: errors that name the cause and what to do (the passes re-raise these unwrapped).
REFUSAL_NAMES = {
    "UnsupportedGraphError",
    "GraphBreakError",
    "RegionalCompilationError",
    "ForeignCacheError",
    "NoBlocksFoundError",
    "ClockError",
    "GradEnabledError",
    "StochasticSamplerError",
    "BatchTimestepError",
    "AlphaTableError",
    "BudgetError",
}


class TestTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise TestTimeout(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Outcomes


@dataclasses.dataclass
class Outcome:
    outcome: str  # pass | refused | crash | fail | skip
    detail: str = ""
    where: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (Dynamo's BackendCompilerFailed keeps ``inner_exception``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return seen


def _frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(exc.__traceback__))


def _ours(filename: str) -> bool:
    parts = Path(filename).parts
    if parts[-2:] == ("sc_compile", "__init__.py"):
        return False  # sc_compile.generation's __exit__ re-raises what the loop raised
    return "sc_compile" in parts or any(p in parts for p in ("passes", "backends")) and "torch" not in parts


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("sc_compile", "passes", "backends", "site-packages"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + (anchor == "site-packages") :])
    return "/".join(parts[-2:])


_ROOT = str(Path(__file__).resolve().parents[1])


def sanitize(text: str) -> str:
    """Machine paths out of a message: site-packages/..., the repository root as '.'."""
    text = re.sub(r"[^\s\"'(]*/site-packages/", "site-packages/", text)
    return text.replace(_ROOT + "/", "")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return sanitize(text[0] if text else "")[:400]


def classify(exc: BaseException) -> Outcome:
    chain = _chain(exc)
    ours = [e for e in chain if type(e).__module__.startswith("sc_compile")]
    for e in ours:
        if type(e).__name__ in REFUSAL_NAMES or any(b.__name__ in REFUSAL_NAMES for b in type(e).__mro__):
            return Outcome("refused", f"{type(e).__name__}: {first_line(e)}", _where(e))
    # The innermost exception whose traceback passes through our code, else the innermost one.
    root = chain[-1] if chain else exc
    for e in reversed(chain):
        if any(_ours(f.filename) for f in _frames(e)):
            root = e
            break
    # A crash is ours when our code is on the way; otherwise the model (or Dynamo) fails by itself.
    ours_involved = any(_ours(f.filename) for e in chain for f in _frames(e))
    kind = "crash" if ours_involved else "fail"
    if isinstance(root, TestTimeout):
        return Outcome(kind, f"timeout: {root}", _where(root))
    return Outcome(kind, f"{type(root).__name__}: {first_line(root)}", _where(root))


def _where(exc: BaseException) -> str:
    frames = _frames(exc)
    mine = [f for f in frames if _ours(f.filename)]
    f = (mine or frames or [None])[-1]
    if f is None:
        return ""
    return f"{_short(f.filename)}:{f.lineno} ({f.name})"


# ----------------------------------------------------------------------------------------------
# Configurations from the checkout


@dataclasses.dataclass
class Config:
    name: str  # the configuration class
    module: str
    tester: type  # the class whose get_init_dict / get_dummy_inputs we call
    compile_class: str | None  # diffusers' TorchCompileTesterMixin subclass, if the file has one
    marks: dict[str, str]  # test name -> diffusers' skip/xfail mark on it


def discover(src: Path, only: str | None) -> tuple[list[Config], list[tuple[str, str]]]:
    sys.path.insert(0, str(src))
    from tests.models.testing_utils.common import BaseModelTesterConfig  # type: ignore[import-not-found]
    from tests.models.testing_utils.compile import TorchCompileTesterMixin  # type: ignore[import-not-found]

    configs: list[Config] = []
    unimportable: list[tuple[str, str]] = []
    for path in sorted((src / "tests/models/transformers").glob("test_models_*.py")):
        module_name = "tests.models.transformers." + path.stem
        if only and not re.search(only, path.stem):
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # recorded: the file cannot be imported here
            unimportable.append((path.stem, f"{type(exc).__name__}: {first_line(exc)}"))
            continue
        classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module_name]
        for cfg in classes:
            if not (issubclass(cfg, BaseModelTesterConfig) and cfg.__name__.endswith("TesterConfig")):
                continue
            if any(q in cfg.__name__ for q in ("Quant", "AutoRound", "SDNQ")):
                continue  # quantisation variants (pretrained hub weights) of a configuration listed itself
            compile_classes = [c for c in classes if issubclass(c, TorchCompileTesterMixin) and cfg in c.__bases__]
            tester = compile_classes[0] if compile_classes else type(f"{cfg.__name__}Compile", (cfg,), {})
            marks: dict[str, str] = {}
            for c in compile_classes:
                for test in dir(c):
                    if test.startswith("test_"):
                        for mark in getattr(getattr(c, test), "pytestmark", []):
                            if mark.name in ("skip", "xfail"):
                                marks[test] = f"{mark.name}: {mark.kwargs.get('reason', '')}"
            configs.append(
                Config(cfg.__name__, path.stem, tester, compile_classes[0].__name__ if compile_classes else None, marks)
            )
    return configs, unimportable


def _dummy_inputs(tester: Any, **kwargs: Any) -> dict[str, Any]:
    return tester.get_dummy_inputs(**kwargs)


def _build(cfg: Config) -> tuple[Any, torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    tester = cfg.tester()
    init = tester.get_init_dict()
    inputs = _dummy_inputs(tester)
    model = tester.model_class(**init)
    model.eval()
    return tester, model, inputs


def _compile_kwargs(backend: str) -> dict[str, Any]:
    return {"backend": backend, "options": dict(SC_OPTIONS)} if backend == "scalingcache" else {"backend": backend}


# ----------------------------------------------------------------------------------------------
# The bodies of diffusers' TorchCompileTesterMixin (tests/models/testing_utils/compile.py), with
# backend=. Adapted to this CPU-only machine: no fresh_inductor_cache (no Inductor), group
# offloading with use_stream=False (streams need an accelerator), global Dynamo / FX settings set
# through their patch() contexts instead of assignments.


@torch.no_grad()
def test_recompilation_and_graph_break(cfg: Config, backend: str) -> Outcome:
    tester, model, inputs = _build(cfg)
    model = torch.compile(model, fullgraph=True, **_compile_kwargs(backend))
    with torch._dynamo.config.patch(error_on_recompile=True):
        _ = model(**inputs)
        _ = model(**inputs)
    return Outcome("pass")


@torch.no_grad()
def test_repeated_blocks(cfg: Config, backend: str, recompile_limit: int = 1) -> Outcome:
    if not cfg.tester().model_class._repeated_blocks:
        return Outcome("skip", "the model class has no _repeated_blocks")
    tester, model, inputs = _build(cfg)
    model.compile_repeated_blocks(fullgraph=True, **_compile_kwargs(backend))
    with torch._dynamo.config.patch(recompile_limit=recompile_limit):
        _ = model(**inputs)
        _ = model(**inputs)
    return Outcome("pass")


@torch.no_grad()
def test_group_offloading(cfg: Config, backend: str) -> Outcome:
    if not cfg.tester().model_class._supports_group_offloading:
        return Outcome("skip", "the model does not support group offloading")
    tester, model, inputs = _build(cfg)
    model.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=False,
        non_blocking=False,
    )
    model.compile(**_compile_kwargs(backend))
    with torch._dynamo.config.patch(cache_size_limit=10000):
        _ = model(**inputs)
        _ = model(**inputs)
    return Outcome("pass")


@torch.no_grad()
def test_different_shapes(cfg: Config, backend: str) -> Outcome:
    tester = cfg.tester()
    shapes = getattr(tester, "different_shapes_for_compilation", None)
    if shapes is None:
        return Outcome("skip", "different_shapes_for_compilation is not set")
    tester, model, _ = _build(cfg)
    model = torch.compile(model, fullgraph=True, dynamic=True, **_compile_kwargs(backend))
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for height, width in shapes:
            with torch._dynamo.config.patch(error_on_recompile=True):
                inputs = _dummy_inputs(tester, height=height, width=width)
                _ = model(**inputs)
    return Outcome("pass")


MIXIN_TESTS = {
    "recompilation_and_graph_break": (
        test_recompilation_and_graph_break,
        "test_torch_compile_recompilation_and_graph_break",
    ),
    "repeated_blocks": (test_repeated_blocks, "test_torch_compile_repeated_blocks"),
    "group_offloading": (test_group_offloading, "test_compile_with_group_offloading"),
    "different_shapes": (test_different_shapes, "test_compile_on_different_shapes"),
}


# ----------------------------------------------------------------------------------------------
# The 8-step loop


def _output(result: Any) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)):
        return _output(result[0])
    if isinstance(result, dict):
        return _output(next(iter(result.values())))
    raise TypeError(f"cannot find the output tensor in a {type(result).__name__}")


def _timesteps(like: torch.Tensor) -> list[torch.Tensor]:
    if like.is_floating_point() and float(like.abs().max()) <= 1.0:
        values = torch.linspace(1.0, 1.0 / LOOP_STEPS, LOOP_STEPS)
    else:
        values = torch.linspace(999.0, 999.0 / LOOP_STEPS, LOOP_STEPS)
    if not like.is_floating_point():
        values = values.round()
    return [torch.full_like(like, float(v)) for v in values]


@torch.no_grad()
def test_loop(cfg: Config) -> Outcome:
    tester, model, inputs = _build(cfg)
    t_key = next((k for k in TIMESTEP_KEYS if isinstance(inputs.get(k), torch.Tensor)), None)
    if t_key is None:
        return Outcome("skip", f"no timestep tensor among the inputs ({sorted(inputs)})")
    x_key = next((k for k in HIDDEN_KEYS if isinstance(inputs.get(k), torch.Tensor)), None)
    compiled = torch.compile(model, backend="scalingcache", options=dict(LOOP_OPTIONS))
    x = inputs[x_key] if x_key else None
    diffs: list[float] = []  # per step: max |compiled - eager| / max(1, max |eager|)
    step_seconds: list[float] = []
    euler = True
    with sc_compile.generation(compiled, num_inference_steps=LOOP_STEPS):
        for t in _timesteps(inputs[t_key]):
            step_inputs = dict(inputs, **{t_key: t})
            if x_key:
                step_inputs[x_key] = x
            start = time.perf_counter()
            out = _output(compiled(**step_inputs))
            step_seconds.append(time.perf_counter() - start)
            ref = _output(model(**step_inputs))
            scale = max(1.0, float(ref.abs().max()))
            diffs.append(float((out - ref).abs().max()) / scale)
            if x_key and out.shape == x.shape and out.dtype == x.dtype:
                x = x - out / LOOP_STEPS
            else:
                euler = False
    report = sc_compile.report(compiled)
    torch.compiler.reset()
    try:  # the lowered graphs' sizes: how much a cached step leaves out, independent of machine load
        explanation = sc_compile.explain(model, **inputs)
        nodes = {"full_step_nodes": explanation.full_step_nodes, "cached_step_nodes": explanation.cached_step_nodes}
    except Exception as exc:  # recorded in the row
        nodes = {"explain_error": f"{type(exc).__name__}: {first_line(exc)}"}
    full, cached = set(report.full_steps), set(report.cached_steps)
    full_diffs = [d for i, d in enumerate(diffs) if i in full]
    cached_diffs = [d for i, d in enumerate(diffs) if i in cached]
    t_full = [s for i, s in enumerate(step_seconds) if i in full and i > 0]
    t_cached = [s for i, s in enumerate(step_seconds) if i in cached]
    extra = {
        "full_steps": sorted(full),
        "cached_steps": sorted(cached),
        "num_points": report.num_points,
        "max_full_rel_diff": max(full_diffs, default=None),
        "max_cached_rel_diff": max(cached_diffs, default=None),
        "euler_update": euler,
        "timestep_input": t_key,
        "latent_input": x_key,
        "median_full_step_s": _median(t_full),
        "median_cached_step_s": _median(t_cached),
        **nodes,
    }
    marks = "".join("F" if i in full else "." for i in range(report.num_steps))
    if not cached:
        return Outcome("fail", f"caches nothing: {marks} ({report.num_points} cache points)", extra=extra)
    worst = max(full_diffs, default=0.0)
    if not math.isfinite(worst) or worst > 1e-4:
        return Outcome("fail", f"full steps differ from eager: max rel diff {worst:.2e} ({marks})", extra=extra)
    return Outcome("pass", f"{marks}, full = eager (max rel diff {worst:.1e})", extra=extra)


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


# ----------------------------------------------------------------------------------------------


def run_one(fn, *args, timeout: int) -> Outcome:
    torch.compiler.reset()
    gc.collect()
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            outcome = fn(*args)
    except Exception as exc:  # recorded per test: that is the point of this script
        outcome = classify(exc)
        if args and args[-1] == "aot_eager":  # the plain backend: not ours, a failure of the model
            outcome.outcome = "fail"
        if os.environ.get("SC_DIFFTESTS_TRACEBACK"):
            traceback.print_exc()
    finally:
        torch.compiler.reset()
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome


def _cell(o: dict[str, Any]) -> str:
    if o["outcome"] == "pass":
        return "pass"
    if o["outcome"] == "skip":
        return "–"
    name = o["detail"].split(":", 1)[0]
    return f"**{o['outcome']}** {name}" if o["outcome"] == "crash" else f"{o['outcome']} {name}"


def _loop_cell(o: dict[str, Any]) -> str:
    e = o.get("extra") or {}
    if o["outcome"] == "pass":
        speed = ""
        if e.get("cached_step_nodes") is not None:
            speed += f"; cached step {e['cached_step_nodes']} of {e['full_step_nodes']} nodes"
        if e.get("median_full_step_s") and e.get("median_cached_step_s"):
            speed += f", {e['median_full_step_s'] / e['median_cached_step_s']:.1f}× faster"
        return f"pass `{o['detail'].split(',')[0]}`{speed}"
    return _cell(o) if o["outcome"] != "fail" else f"**fail** {o['detail'].split(':', 1)[0]}"


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    rows = results["configs"]
    lines = [
        '# diffusers\' torch.compile tests with `backend="scalingcache"`',
        "",
        f"Command: `{results['command']}`",
        "",
        f"diffusers tests from commit `{results['diffusers_tests_commit']}`; installed diffusers "
        f"{results['diffusers']}, torch {results['torch']}, {results['machine']}; {results['seconds'] / 60:.1f} min.",
        "",
        'Each cell: plain `backend="aot_eager"` / `backend="scalingcache"` (inner compiler `aot_eager`). '
        "`pass`; `refused X` = our own error X (first lines below); **crash** = any other exception with "
        "our code on its traceback (below, with where); `fail X` = an exception with none of our code on "
        "the way (the model or Dynamo fails by itself), or the loop's check failed; – = not "
        "applicable (the mixin skips it: no `_repeated_blocks`, no group offloading, no "
        "`different_shapes_for_compilation`). *diffusers* = the file has a `TorchCompileTesterMixin` class "
        "(diffusers compile-tests this configuration; marks it skips or xfails are listed below). "
        f"Loop: {LOOP_STEPS} steps, `options={LOOP_OPTIONS}`, F = full, . = cached; full steps must "
        "equal eager (max |Δ| / max(1, max |eager|) ≤ 1e-4); then the compute nodes of the "
        "cached-step graph against the full-step graph (`sc_compile.explain`), and the median full-step time "
        "over the median cached-step time of the compiled model (aot_eager graphs, tiny models, a loaded "
        "machine: an order of magnitude, not a benchmark).",
        "",
        "| configuration | model | diffusers | recompile + graph break | repeated blocks | group offloading | "
        "different shapes | 8-step loop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | – | – | build failed: {r['error']} | | | | |")
            continue
        cells = [f"{_cell(r['tests'][t]['aot_eager'])} / {_cell(r['tests'][t]['scalingcache'])}" for t in TESTS]
        lines.append(
            f"| {r['config'].removesuffix('TesterConfig')} | {r['model_class']} | "
            f"{'yes' if r['compile_class'] else 'no'} | " + " | ".join(cells) + f" | {_loop_cell(r['loop'])} |"
        )
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        if "error" in r:
            continue
        for t in TESTS:
            for b in BACKENDS:
                counts.setdefault(f"{t} ({b})", {}).setdefault(r["tests"][t][b]["outcome"], 0)
                counts[f"{t} ({b})"][r["tests"][t][b]["outcome"]] += 1
        counts.setdefault("8-step loop", {}).setdefault(r["loop"]["outcome"], 0)
        counts["8-step loop"][r["loop"]["outcome"]] += 1
    lines += [
        "",
        "## Counts",
        "",
        "| test | pass | refused | crash | fail | skip |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, c in counts.items():
        lines.append(
            f"| {key} | " + " | ".join(str(c.get(k, 0)) for k in ("pass", "refused", "crash", "fail", "skip")) + " |"
        )
    lines += ["", "## Every outcome other than pass and skip", ""]
    for r in rows:
        if "error" in r:
            continue
        items = [(t, b, r["tests"][t][b]) for t in TESTS for b in BACKENDS] + [
            ("8-step loop", "scalingcache", r["loop"])
        ]
        for t, b, o in items:
            if o["outcome"] in ("pass", "skip"):
                continue
            where = f" — at `{o['where']}`" if o.get("where") else ""
            lines.append(
                f"* {r['config'].removesuffix('TesterConfig')}, {t}, {b}: **{o['outcome']}** "
                f"{sanitize(o['detail'])}{where}"
            )
        for test, mark in r.get("marks", {}).items():
            lines.append(f"* {r['config'].removesuffix('TesterConfig')}: diffusers marks `{test}` {mark}")
    if results["unimportable"]:
        lines += ["", "## Test files that do not import with the installed diffusers", ""]
        lines += [f"* `{name}`: {err}" for name, err in results["unimportable"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--diffusers-src", type=Path, help="a checkout of github.com/huggingface/diffusers (its tests/ folder is read)"
    )
    parser.add_argument(
        "--diffusers-commit", default=None, help="the checkout's commit, when PATH is not a git work tree"
    )
    parser.add_argument("--only", default=None, help="regex on the test file stem (test_models_transformer_flux)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/diffusers_compile_tests"))
    parser.add_argument("--render", type=Path, default=None, help="redo the markdown of an earlier run's JSON")
    args = parser.parse_args()
    if args.render is not None:
        write(json.loads(args.render.read_text()), args.render.with_suffix(""))
        return 0
    if args.diffusers_src is None:
        parser.error("--diffusers-src is required (a checkout of github.com/huggingface/diffusers)")
    torch.set_num_threads(1)

    commit = args.diffusers_commit
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "-C", str(args.diffusers_src), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    import diffusers

    start = time.perf_counter()
    configs, unimportable = discover(args.diffusers_src.resolve(), args.only)
    results: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffusers_compile_tests.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "diffusers_tests_commit": commit,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread",
        "configs": [],
        "unimportable": unimportable,
        "seconds": 0.0,
    }
    for cfg in configs:
        row: dict[str, Any] = {
            "config": cfg.name,
            "file": cfg.module,
            "compile_class": cfg.compile_class,
            "marks": cfg.marks,
        }
        print(f"== {cfg.name} ({cfg.module})", flush=True)
        try:
            row["model_class"] = cfg.tester().model_class.__name__
            row["tests"] = {}
            for test, (fn, _) in MIXIN_TESTS.items():
                row["tests"][test] = {}
                for backend in BACKENDS:
                    o = run_one(fn, cfg, backend, timeout=args.timeout)
                    row["tests"][test][backend] = dataclasses.asdict(o)
                    print(
                        f"   {test:32s} {backend:12s} {o.outcome:8s} {o.seconds:6.1f}s {o.detail} {o.where}", flush=True
                    )
            o = run_one(test_loop, cfg, timeout=args.timeout)
            row["loop"] = dataclasses.asdict(o)
            print(
                f"   {'8-step loop':32s} {'scalingcache':12s} {o.outcome:8s} {o.seconds:6.1f}s {o.detail} {o.where}",
                flush=True,
            )
        except Exception as exc:  # recorded: the configuration itself cannot be built
            row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
            print(f"   build failed: {row['error']}", flush=True)
        results["configs"].append(row)
        results["seconds"] = time.perf_counter() - start
        write(results, args.out)
    print(f"wrote {args.out.with_suffix('.md')} and .json ({results['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
