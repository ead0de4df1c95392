"""The ``scalingcache`` torch.compile backend.

``torch.compile(model, backend="scalingcache", options={...})`` resolves here through the
``torch_dynamo_backends`` entry point. The backend is thin: validate the options, run the cache
passes on a copy of Dynamo's graph, lower the cond-guarded graph into a full-step and a cached-step
graph, compile both with the inner compiler (Inductor by default, with every Inductor option and
``mode`` the user gave), and return the runtime that picks one per call.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from sc_compile.alpha import AlphaTable, resolve_alpha_source
from sc_compile.backends.lowering import SpecializedGraph, specialize_cache_conds
from sc_compile.config import Fallback, InnerCompiler, ScalingCacheConfig, split_options
from sc_compile.passes import run_cache_passes
from sc_compile.passes.find_blocks import NoBlocksFoundError, UnsupportedGraphError
from sc_compile.passes.layout import CacheLayout, required_tensor_meta, tensor_meta
from sc_compile.runtime import CompiledStep, PointLayout, ScalingCacheRuntime

log = logging.getLogger(__name__)

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")


def traced_module() -> torch.nn.Module | None:
    """The ``nn.Module`` whose forward Dynamo is compiling (``self`` of the traced frame)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return None
    for value in tx.f_locals.values():
        if isinstance(value, torch.nn.Module):
            return getattr(value, "_orig_mod", value)
    return None


def compile_token() -> object | None:
    """What identifies the ``torch.compile`` call Dynamo is compiling for (shared by its recompiles)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return None if tx is None else tx.output.compiler_fn


def identity_input(example_inputs: Sequence[Any], module: torch.nn.Module | None) -> int | None:
    """Index of the graph input that is ``module``'s first parameter (it names the module a call runs)."""
    first = next(module.parameters(), None) if module is not None else None
    if first is None:
        return None
    return next((i for i, value in enumerate(example_inputs) if value is first), None)


def _source_name(node: torch.fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    return source.name if source is not None and hasattr(source, "name") else node.name


def find_timestep_input(gm: torch.fx.GraphModule, model_class: str) -> int:
    """Index of the placeholder carrying the diffusion timestep."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for index, node in enumerate(placeholders):
        name = _source_name(node)
        # Last component of L['kwargs']['timestep'] / L['timestep'].
        leaf = name.replace('"', "'").rstrip("]").split("[")[-1].strip("'") if "[" in name else name
        leaf = leaf.lower()
        meta = tensor_meta(node)
        if leaf in TIMESTEP_NAMES and meta is not None and meta.numel() <= 4096:
            candidates.append(index)
    if not candidates:
        raise UnsupportedGraphError(
            f"{model_class}: could not find the timestep input among the graph inputs "
            f"{[_source_name(p) for p in placeholders if not isinstance(tensor_meta(p), torch.nn.Parameter)][:12]}. "
            "ScalingCache places each call in a generation by the timestep: pass it as a tensor named "
            "'timestep' (diffusers pipelines do)."
        )
    return candidates[0]


def compile_graph(
    gm: torch.fx.GraphModule,
    inputs: Sequence[Any],
    compiler: InnerCompiler,
    config_patches: Mapping[str, Any],
    *,
    own_tracing_context: bool,
) -> Callable[..., Any]:
    """``gm`` compiled by the inner compiler.

    ``own_tracing_context``: compile in a tracing context and fake mode of its own. The
    specialised graphs need it: Dynamo's context holds the metadata and the shape environment of
    the one graph it traced, which neither specialised graph (other inputs, other outputs)
    matches, and symbols added to its shape environment would break Dynamo's guards. Dynamo's own
    graph (the uncached fallback) is compiled in Dynamo's context, as any backend does.
    """
    if compiler is InnerCompiler.EAGER:
        return gm
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, list(inputs))  # type: ignore[return-value]
    from torch._inductor.compile_fx import compile_fx

    if not own_tracing_context:
        return compile_fx(gm, list(inputs), config_patches=dict(config_patches))  # type: ignore[return-value]
    with torch._guards.tracing(torch._guards.TracingContext(None)):
        return compile_fx(gm, list(inputs), config_patches=dict(config_patches))  # type: ignore[return-value]


def compile_inner(
    spec: SpecializedGraph,
    example_inputs: Sequence[Any],
    compiler: InnerCompiler,
    config_patches: Mapping[str, Any],
) -> CompiledStep:
    inputs = [example_inputs[i] for i in spec.input_indices]
    start = time.perf_counter()
    fn = compile_graph(spec.graph_module, inputs, compiler, config_patches, own_tracing_context=True)
    return CompiledStep(fn, spec.input_indices, spec.num_compute_nodes, time.perf_counter() - start)


def context_parallel_group(module: torch.nn.Module | None) -> Any:
    """The process group of diffusers context parallelism (``model.enable_parallelism``), if any."""
    config = getattr(module, "_parallel_config", None)
    cp_config = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp_config, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()


def _asset_dirs() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "assets"
    return [root] if root.is_dir() else []


def _fallback(gm: torch.fx.GraphModule, example_inputs, config, patches, error: Exception):
    log.warning(
        "ScalingCache: %s; falling back to uncached %s as options={'fallback': 'inductor'} asks.",
        error,
        config.compiler.value,
    )
    return compile_graph(gm, example_inputs, config.compiler, patches, own_tracing_context=False)


def build_runtime(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: ScalingCacheConfig,
    config_patches: Mapping[str, Any],
    module: torch.nn.Module | None = None,
    token: object | None = None,
):
    """Passes, lowering, inner compilation and the runtime for one Dynamo graph."""
    model_class = type(module).__name__ if module is not None else "the compiled module"
    try:
        cond_gm, layout = run_cache_passes(
            gm, model_class=model_class, granularity=config.granularity.value, prediction=config.prediction.value
        )
        timestep_index = find_timestep_input(gm, model_class)
    except (NoBlocksFoundError, UnsupportedGraphError) as error:
        if config.fallback is Fallback.INDUCTOR:
            return _fallback(gm, example_inputs, config, config_patches, error)
        raise
    alpha = resolve_alpha_source(
        config.alpha,
        model_class=model_class,
        fingerprint=layout.fingerprint(),
        num_points=layout.num_points,
        granularity=layout.granularity,
        search_dirs=_asset_dirs(),
    )
    return _lower_and_compile(gm, example_inputs, config, config_patches, module, cond_gm, layout, alpha, timestep_index, token)


def _lower_and_compile(gm, example_inputs, config, config_patches, module, cond_gm, layout: CacheLayout, alpha: AlphaTable | None, timestep_index: int, token: object | None):
    points = layout.cache_points
    device = required_tensor_meta(layout.blocks[-1].cache_points[0]).device
    point_layout = PointLayout(
        shapes=[p.shape for p in points],
        dtypes=[p.dtype for p in points],
        device=device,
        feeds_output=[p.feeds_output for p in points],
        fingerprint=layout.fingerprint(),
    )
    full_spec = specialize_cache_conds(cond_gm, full=True)
    cached_spec = specialize_cache_conds(cond_gm, full=False)
    # Example state for compilation: the first stream's buffers.
    from sc_compile.runtime import StreamState

    state = StreamState(point_layout, config.cache_dtype)
    examples = [
        *example_inputs,
        torch.ones((), dtype=torch.bool, device=device),
        *state.buffers,
        torch.zeros(len(points), device=device),
        torch.zeros(len(points), device=device),
        state.stats,
    ]
    full_step = compile_inner(full_spec, examples, config.compiler, config_patches)
    cached_step = compile_inner(cached_spec, examples, config.compiler, config_patches)
    alpha_source = "ones" if alpha is None else (alpha.command or f"table ({alpha.num_steps} steps)")
    runtime = ScalingCacheRuntime(
        model_class=layout.model_class,
        layout=point_layout,
        full_step=full_step,
        cached_step=cached_step,
        config=config,
        alpha=alpha,
        alpha_source=alpha_source,
        timestep_index=timestep_index,
        identity_index=identity_input(example_inputs, module),
        module=module,
        compile_token=token,
        fingerprint=layout.fingerprint(),
        granularity=layout.granularity,
        process_group=context_parallel_group(module),
    )
    log.info(
        "ScalingCache: %s: %d blocks, %d cache points (%s); full step %d nodes (%.1fs), cached step %d nodes (%.1fs)",
        layout.model_class,
        len(layout.blocks),
        len(points),
        layout.granularity,
        full_step.num_compute_nodes,
        full_step.compile_seconds,
        cached_step.num_compute_nodes,
        cached_step.compile_seconds,
    )
    return runtime


def _has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape):
            return True
    return False


_SIZE_ARITHMETIC = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.neg, operator.pow, torch.sym_sum, torch.sym_max, torch.sym_min, torch.sym_int, torch.sym_float,
}


def _is_foldable(node: torch.fx.Node, folded: set[torch.fx.Node]) -> bool:
    """Whether ``node`` is a constant of the specialised graph: a size input, ``x.size()`` or
    ``x.shape[i]``, the value of a global constant tensor, or arithmetic on those."""
    value = node.meta.get("example_value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if node.op == "placeholder":
        return True
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, getattr):
        return True
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and (source in folded or isinstance(source.meta.get("example_value"), torch.Size))
    if node.op == "call_method" and node.target == "item":
        # The value of a global constant tensor (a function default Dynamo lifted as an input),
        # never of a user input or a parameter.
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and source.op == "placeholder" and _source_name(source).startswith("G[")
    if node.op == "call_function" and node.target in _SIZE_ARITHMETIC:
        return all(arg in folded for arg in node.all_input_nodes)
    return False


def specialize_to_inputs(gm: torch.fx.GraphModule, args: Sequence[Any]) -> torch.fx.GraphModule:
    """A copy of a symbolic-size Dynamo graph with every size fixed to those of ``args``.

    The graph runs once on ``args`` to record concrete metadata (sizes can feed data-dependent
    ops such as ``.item()`` on constants, which fake tensors cannot run); size inputs and
    arithmetic on sizes are then folded into constants. Values computed from tensor data are
    never folded.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sc_compile.passes.pass_manager import copy_graph_module

    static = copy_graph_module(gm)
    mode = FakeTensorMode()

    def record(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return mode.from_tensor(value, static_shapes=True)
        if isinstance(value, tuple | list):
            return type(value)(record(v) for v in value)
        return value

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            if node.op != "output":
                node.meta["example_value"] = record(result)
                node.meta.pop("val", None)
            return result

    with torch.no_grad():
        Recorder(static).run(*args)
    folded: set[torch.fx.Node] = set()
    for node in static.graph.nodes:
        if _is_foldable(node, folded):
            folded.add(node)
    for node in folded:
        value = node.meta["example_value"]
        for user in list(node.users):
            user.replace_input_with(node, value)  # type: ignore[arg-type]
    for node in reversed(list(static.graph.nodes)):
        if node in folded and node.op != "placeholder" and not node.users:
            static.graph.erase_node(node)
    static.graph.lint()
    static.recompile()
    return static


class ShapeSpecializingRuntime:
    """ScalingCache for a graph Dynamo traced with dynamic sizes.

    Dynamo marks a size dynamic after it changes (automatic dynamic shapes: a second resolution or
    batch size). The cache buffers need static shapes, so each distinct set of input sizes gets
    its own static specialisation, built on its first call and logged; the Dynamo graph stays one.
    """

    def __init__(self, gm: torch.fx.GraphModule, config: ScalingCacheConfig, patches: Mapping[str, Any], module: torch.nn.Module | None, token: object | None = None):
        self.gm = gm
        self.token = token
        self.config = config
        self.patches = patches
        self.module = module
        self.by_sizes: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a if isinstance(a, int) else None for a in args)
        runtime = self.by_sizes.get(key)
        if runtime is None:
            log.info("ScalingCache: specialising a dynamic-shape graph to sizes %s", [k for k in key if k is not None])
            static = specialize_to_inputs(self.gm, args)
            runtime = build_runtime(static, args, self.config, self.patches, self.module, self.token)
            self.by_sizes[key] = runtime
        return runtime(*args)


def scalingcache(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
    config: ScalingCacheConfig | None = None,
) -> Callable[..., Any]:
    """The torch.compile backend: ``torch.compile(model, backend="scalingcache", options={...})``.

    ``options`` holds ScalingCache's keys (see :class:`~sc_compile.config.ScalingCacheConfig`) and
    any Inductor options; ``mode`` is Inductor's. ``config`` (the Python API) replaces the
    ScalingCache keys of ``options``.
    """
    parsed, patches = split_options(options, mode)
    if config is None:
        config = parsed
    elif options and any(k in ScalingCacheConfig.option_names() for k in options):
        raise ValueError("pass ScalingCache settings either as config= or in options=, not both")
    module = traced_module()
    token = compile_token()
    if _has_symbolic_shapes(gm):
        # dynamic=True, or Dynamo's automatic dynamic shapes after a size changed.
        return ShapeSpecializingRuntime(gm, config, patches, module, token)
    return build_runtime(gm, example_inputs, config, patches, module, token)
