"""The ``scalingcache`` torch.compile backend.

``torch.compile(model, backend="scalingcache", options={...})`` resolves here through the
``torch_dynamo_backends`` entry point. The backend is thin: validate the options, run the cache
passes on a copy of Dynamo's graph, lower the cond-guarded graph into a full-step and a cached-step
graph, compile both with the inner compiler (Inductor by default, with every Inductor option and
``mode`` the user gave), and return the runtime that picks one per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from sc_compile.alpha import AlphaTable, resolve_alpha_source
from sc_compile.backends.block_graphs import build_block_graph_runtime, build_outside_blocks_runtime
from sc_compile.backends.capture_check import (
    BlockGraph,
    GraphPiece,
    OutsideBlocksGraph,
    check_whole_model,
)
from sc_compile.backends.lowering import SpecializedGraph, specialize_cache_conds
from sc_compile.config import Fallback, InnerCompiler, ScalingCacheConfig, split_options
from sc_compile.contract import step_inputs
from sc_compile.memory import cache_bytes_limit, refusal
from sc_compile.passes import run_cache_passes
from sc_compile.passes.find_blocks import (
    NoBlocksFoundError,
    UnsupportedGraphError,
    input_size_symbols,
)
from sc_compile.passes.layout import CacheLayout, required_tensor_meta, tensor_meta
from sc_compile.runtime import CompiledStep, GraphPieceRuntime, PointLayout, ScalingCacheRuntime

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


def static_fake_mode() -> Any:
    """A fake mode of our own whose shape environment gives the graph's data-dependent values
    (``nonzero``, boolean-mask indexing, ``.item()``) symbols of their own, as Dynamo's did when it
    captured them. Without one, re-tracing a graph Dynamo captured whole fails on the first such op
    (``DynamicOutputShapeException``, ``DataDependentOutputException``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True, allow_dynamic_output_shape_ops=True))


def fake_inputs(mode: Any, inputs: Sequence[Any]) -> list[Any]:
    """``inputs`` as fake tensors of ``mode`` with static sizes (other values as they are)."""
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]


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
    matches, and symbols added to its shape environment would break Dynamo's guards. Their inputs
    are fakes of static size in a mode whose own shape environment takes the graph's
    data-dependent ops. Dynamo's own graph (the uncached fallback) is compiled in Dynamo's
    context, as any backend does.
    """
    if compiler is InnerCompiler.EAGER:
        return gm
    if not own_tracing_context:
        return _compile_with(gm, list(inputs), compiler, config_patches)
    for node in gm.graph.nodes:
        # Bindings of data-dependent values to the symbols of Dynamo's shape environment: the
        # re-trace below makes its own in its own environment (keeping Dynamo's names collides).
        node.meta.pop("unbacked_bindings", None)
    mode = static_fake_mode()
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        return _compile_with(gm, fake_inputs(mode, inputs), compiler, config_patches)


def _compile_with(gm, inputs: list[Any], compiler: InnerCompiler, config_patches: Mapping[str, Any]) -> Callable[..., Any]:
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)  # type: ignore[return-value]
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, inputs, config_patches=dict(config_patches))  # type: ignore[return-value]


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
    """Where the shipped α tables are searched: the installed ``sc_compile.assets``."""
    from sc_compile.resources import assets_dir

    return [assets_dir()]


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
    piece: GraphPiece | None = None,
):
    """Passes, lowering, inner compilation and the runtime for one Dynamo graph.

    ``piece``: the graph is one of several Dynamo compiled for the model's forward (split at a
    graph break). A piece that holds blocks is cached as any graph, with the clock and the
    decisions it shares with the other pieces; a piece without blocks (the output head after a
    break) runs as it is, compiled by the inner compiler.
    """
    model_class = type(module).__name__ if module is not None else "the compiled module"
    try:
        cond_gm, layout = run_cache_passes(
            gm,
            model_class=model_class,
            granularity=config.granularity.value,
            prediction=config.prediction.value,
            statistic=config.statistic.value,
        )
        timestep_index = find_timestep_input(gm, model_class) if piece is None else _piece_timestep(gm, model_class)
    except (NoBlocksFoundError, UnsupportedGraphError) as error:
        if piece is not None and isinstance(error, NoBlocksFoundError):
            return _plain_piece(gm, example_inputs, config, config_patches, module, token, piece)
        try:
            # Nothing to cache here may mean that this graph is a piece of the model.
            outside = check_whole_model(module, failed=True)
            if isinstance(outside, OutsideBlocksGraph):
                return build_outside_blocks_runtime(gm, example_inputs, config, config_patches, outside, token)
        except UnsupportedGraphError as cause:
            if config.fallback is Fallback.INDUCTOR:
                return _fallback(gm, example_inputs, config, config_patches, cause)
            raise cause from error
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
    return _lower_and_compile(
        gm, example_inputs, config, config_patches, module, cond_gm, layout, alpha, timestep_index, token, piece
    )


def _piece_timestep(gm: torch.fx.GraphModule, model_class: str) -> int | None:
    """The timestep input of a piece of a split forward, if it has one. A piece after a break
    joins the step of the forward's first piece and needs none; a first piece without it can only
    be placed by the pipeline clock (the runtime says so when it is called without one)."""
    try:
        return find_timestep_input(gm, model_class)
    except UnsupportedGraphError:
        return None


def _plain_piece(gm, example_inputs, config, config_patches, module, token, piece: GraphPiece) -> GraphPieceRuntime:
    """A piece of a split forward that holds no block: compiled as it is, in Dynamo's tracing
    context as any backend's graph. It runs at every step, full or cached."""
    log.info("ScalingCache: %s: a piece without blocks after a %s runs uncached", type(piece.module).__name__, piece.where)
    fn = compile_graph(gm, example_inputs, config.compiler, config_patches, own_tracing_context=False)
    return GraphPieceRuntime(fn, piece=piece, compile_token=token)


def _lower_and_compile(gm, example_inputs, config, config_patches, module, cond_gm, layout: CacheLayout, alpha: AlphaTable | None, timestep_index: int | None, token: object | None, piece: GraphPiece | None = None):
    points = layout.cache_points
    device = required_tensor_meta(layout.blocks[-1].cache_points[0]).device
    point_layout = PointLayout(points=list(points), device=device, fingerprint=layout.fingerprint())
    limit, source = cache_bytes_limit(config.max_cache_bytes, device)
    per_stream = point_layout.stream_nbytes(config.cache_dtype)
    if limit is not None and per_stream > limit:
        raise refusal(
            f"one stream of {layout.model_class}", per_stream, limit, source, point_layout, config.cache_dtype,
            layout.granularity, streams=1, available=limit,
        )
    full_spec = specialize_cache_conds(cond_gm, full=True)
    cached_spec = specialize_cache_conds(cond_gm, full=False)
    # Example state for compilation: the first stream's buffers.
    from sc_compile.runtime import StreamState

    state = StreamState(point_layout, config.cache_dtype)
    coefficients = torch.zeros(len(points), device=device)
    examples = step_inputs(example_inputs, state.buffers, coefficients, coefficients.clone(), state.stats)
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
        piece=piece,
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
    """Whether Dynamo traced ``gm`` with symbolic input sizes (``dynamic=True`` or automatic
    dynamic shapes). The symbols of data-dependent ops (``nonzero``) and of float inputs
    (``.item()`` of a LoRA scale) are not sizes: such a graph is static and needs no
    specialisation."""
    return any(
        input_size_symbols(node.meta.get("example_value")) for node in gm.graph.nodes if node.op == "placeholder"
    )


def _concrete(value: Any, shape_env: Any, bindings: Mapping[Any, int]) -> int | float | bool | None:
    """The value of a symbolic size expression under ``bindings``; ``None`` if it is not fixed by
    the input sizes (a data-dependent value)."""
    if not isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return None
    expr = shape_env.replace(value.node.expr)
    if not expr.free_symbols <= bindings.keys():
        return None
    result = expr.xreplace(dict(bindings))
    if isinstance(value, torch.SymBool):
        return bool(result)
    return int(result) if isinstance(value, torch.SymInt) else float(result)


class _FakePropagator(torch.fx.Interpreter):
    """Records every node's fake value (``example_value``) for fake inputs of static size."""

    def __init__(self, gm: torch.fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, node: torch.fx.Node) -> Any:
        with self.mode:
            result = super().run_node(node)
        if node.op != "output":
            node.meta["example_value"] = result
            node.meta.pop("val", None)
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value


def specialize_to_inputs(gm: torch.fx.GraphModule, args: Sequence[Any]) -> torch.fx.GraphModule:
    """A copy of a symbolic-size Dynamo graph with every size fixed to those of ``args``.

    Symbols are bound to the sizes of ``args`` with Dynamo's shape environment; every size input
    and every size expression they fix is folded into a constant, and so is ``.item()`` of a
    global constant tensor (a function default Dynamo lifted as an input, such as RoPE's theta).
    Values computed from tensor data (the unbacked symbols of ``nonzero`` or ``.item()`` on a
    float input, a LoRA scale, a norm's eps) are never folded. The metadata is then propagated
    anew with fake inputs of static size in a fake mode of our own; no tensor data is computed
    (a real run cannot record every view: ``view_as_complex`` of a reshaped view fails to fake).
    """
    from sc_compile.passes.pass_manager import copy_graph_module

    static = copy_graph_module(gm)
    placeholders = [n for n in static.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise RuntimeError(f"the graph has {len(placeholders)} inputs but was called with {len(args)}")
    values = [n.meta.get("example_value") for n in placeholders]
    shape_env = next(
        (s.node.shape_env for v in values for s in _symbolic_parts(v)),
        None,
    )
    assert shape_env is not None, "specialize_to_inputs needs a graph with symbolic input sizes"
    bindings = shape_env.bind_symbols([v if isinstance(v, torch.Tensor | torch.SymInt) else None for v in values], args)
    argument = dict(zip(placeholders, args, strict=True))
    folded: dict[torch.fx.Node, Any] = {}
    for node in static.graph.nodes:
        value = node.meta.get("example_value")
        concrete = _concrete(value, shape_env, bindings)
        if concrete is None and _is_global_constant_item(node):
            concrete = argument[node.args[0]].item()  # type: ignore[index]
        if concrete is not None:
            folded[node] = concrete
    for node, concrete in folded.items():
        for user in list(node.users):
            user.replace_input_with(node, concrete)  # type: ignore[arg-type]
    for node in reversed(list(static.graph.nodes)):
        if node in folded and node.op != "placeholder" and not node.users:
            static.graph.erase_node(node)
    static.graph.lint()
    static.recompile()
    mode = static_fake_mode()
    with torch.no_grad():
        _FakePropagator(static, mode).run(*fake_inputs(mode, args))
    return static


def _symbolic_parts(value: Any) -> list[Any]:
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return [value]
    if isinstance(value, torch.Tensor):
        return [s for s in (*value.shape, *value.stride()) if isinstance(s, torch.SymInt)]
    return []


def _is_global_constant_item(node: torch.fx.Node) -> bool:
    """``.item()`` of a global constant tensor (a function default Dynamo lifted as an input),
    never of a user input, a module attribute or a parameter."""
    if not (node.op == "call_method" and node.target == "item"):
        return False
    source = node.args[0]
    return isinstance(source, torch.fx.Node) and source.op == "placeholder" and _source_name(source).startswith("G[")


class ShapeSpecializingRuntime:
    """ScalingCache for a graph Dynamo traced with dynamic sizes.

    Dynamo marks a size dynamic after it changes (automatic dynamic shapes: a second resolution or
    batch size). The cache buffers need static shapes, so each distinct set of input sizes gets
    its own static specialisation, built on its first call and logged; the Dynamo graph stays one.
    """

    def __init__(self, gm: torch.fx.GraphModule, config: ScalingCacheConfig, patches: Mapping[str, Any], module: torch.nn.Module | None, token: object | None = None, piece: GraphPiece | None = None):
        self.gm = gm
        self.piece = piece
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
            runtime = build_runtime(static, args, self.config, self.patches, self.module, self.token, self.piece)
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
    try:
        piece = check_whole_model(module)
        if isinstance(piece, BlockGraph):
            # Dynamo compiles the model's blocks one by one (sc_compile/block_graphs.py).
            return build_block_graph_runtime(gm, example_inputs, config, patches, piece, token, module)
    except UnsupportedGraphError as error:
        if config.fallback is Fallback.INDUCTOR:
            return _fallback(gm, example_inputs, config, patches, error)
        raise
    if isinstance(piece, OutsideBlocksGraph):
        return build_outside_blocks_runtime(gm, example_inputs, config, patches, piece, token)
    if piece is not None:
        # A resume function's frame need not hold ``self``: the piece names the model.
        module = piece.module
    if _has_symbolic_shapes(gm):
        # dynamic=True, or Dynamo's automatic dynamic shapes after a size changed.
        return ShapeSpecializingRuntime(gm, config, patches, module, token, piece)
    return build_runtime(gm, example_inputs, config, patches, module, token, piece)
