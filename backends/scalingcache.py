"""The ``scalingcache`` torch.compile backend.

``torch.compile(model, backend="scalingcache", options={...})`` resolves here through the
``torch_dynamo_backends`` entry point. The backend is the pipeline and nothing else:

1. options: :func:`~sc_compile.config.split_options` (ScalingCache's keys and Inductor's);
2. passes: :func:`~sc_compile.passes.run_cache_passes` on a copy of Dynamo's graph (blocks,
   residual outputs, cache points, the timestep input, the cond rewrite);
3. lowering: a full-step and a cached-step graph (:mod:`~sc_compile.backends.lowering`), each
   compiled by the inner compiler with every Inductor option and ``mode`` the user gave
   (:mod:`~sc_compile.backends.inner_compiler`); a graph with symbolic sizes is first specialised
   per input size (:mod:`~sc_compile.backends.shape_specialization`);
4. runtime: :class:`~sc_compile.runtime.dispatch.ScalingCacheRuntime`, which picks one graph per call.

What Dynamo is compiling and diffusers' private state are read in
:mod:`~sc_compile.backends.integration`; whether the graph is the whole model, in
:mod:`~sc_compile.backends.capture_check`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from sc_compile.backends.block_graphs import build_block_graph_runtime, build_outside_blocks_runtime
from sc_compile.backends.capture_check import (
    BlockGraph,
    GraphPiece,
    OutsideBlocksGraph,
    check_whole_model,
)
from sc_compile.backends.inner_compiler import compile_graph, compile_inner
from sc_compile.backends.integration import (
    compile_token,
    context_parallel_group,
    identity_input,
    traced_module,
)
from sc_compile.backends.lowering import specialize_cache_conds
from sc_compile.backends.shape_specialization import ShapeSpecializingRuntime, has_symbolic_shapes
from sc_compile.calibration.table import AlphaTable, resolve_alpha_source
from sc_compile.config import Fallback, InnerCompiler, ScalingCacheConfig, split_options
from sc_compile.contract import step_inputs
from sc_compile.decision.coefficients import second_order_in_use
from sc_compile.errors import NoBlocksFoundError, UnsupportedGraphError
from sc_compile.memory import cache_bytes_limit, refusal
from sc_compile.passes import run_cache_passes
from sc_compile.passes.layout import CacheLayout
from sc_compile.reporting.report import describe_alpha
from sc_compile.resources import assets_dir
from sc_compile.runtime.cuda_graphs import CAPTURES, CUDAGRAPHS_OPTION, CudaGraphStep, GraphPool, cudagraphs_requested
from sc_compile.runtime.dispatch import (
    CompiledStep,
    GraphPieceRuntime,
    PointLayout,
    ScalingCacheRuntime,
    StreamState,
)

log = logging.getLogger(__name__)


def _fallback(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: ScalingCacheConfig,
    patches: Mapping[str, Any],
    error: Exception,
) -> Callable[..., Any]:
    log.warning(
        "ScalingCache: %s; falling back to uncached %s as options={'fallback': 'inductor'} asks.",
        error,
        config.compiler,
    )
    return compile_graph(gm, example_inputs, config.compiler, patches, own_tracing_context=False)


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What one Dynamo graph is compiled with, from the passes to the runtime."""

    gm: torch.fx.GraphModule
    """Dynamo's graph (never edited: the passes work on a copy)."""
    example_inputs: Sequence[Any]
    config: ScalingCacheConfig
    config_patches: Mapping[str, Any]
    """Inductor options and ``mode``'s options, for the inner compiler."""
    module: torch.nn.Module | None
    """The module Dynamo is compiling (``None`` when it cannot be told)."""
    token: object | None
    """The compilation this graph belongs to (:func:`~sc_compile.backends.integration.compile_token`)."""
    piece: GraphPiece | None
    """The graph is one of several Dynamo compiled for the model's forward (split at a graph break)."""

    @property
    def model_class(self) -> str:
        return type(self.module).__name__ if self.module is not None else "the compiled module"

    def fallback(self, error: Exception) -> Callable[..., Any]:
        return _fallback(self.gm, self.example_inputs, self.config, self.config_patches, error)


def build_runtime(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: ScalingCacheConfig,
    config_patches: Mapping[str, Any],
    module: torch.nn.Module | None = None,
    token: object | None = None,
    piece: GraphPiece | None = None,
) -> Callable[..., Any]:
    """Passes, lowering, inner compilation and the runtime for one Dynamo graph.

    ``piece``: the graph is one of several Dynamo compiled for the model's forward (split at a
    graph break). A piece that holds blocks is cached as any graph, with the clock and the
    decisions it shares with the other pieces; a piece without blocks (the output head after a
    break) runs as it is, compiled by the inner compiler.
    """
    context = BuildContext(gm, example_inputs, config, config_patches, module, token, piece)

    def rewrite(second_order: bool = False) -> tuple[torch.fx.GraphModule, CacheLayout]:
        return run_cache_passes(
            gm,
            model_class=context.model_class,
            granularity=config.granularity,
            prediction=config.prediction,
            statistic=config.statistic,
            # A piece of a split forward may lack the timestep: one after a break joins the step
            # of the forward's first piece; a first piece without it can only be placed by the
            # pipeline clock (the runtime says so when it is called without one).
            require_timestep=piece is None,
            second_order=second_order,
        )

    try:
        cond_gm, layout = rewrite()
    except (NoBlocksFoundError, UnsupportedGraphError) as error:
        if piece is not None and isinstance(error, NoBlocksFoundError):
            return _plain_piece(context, piece)
        try:
            # Nothing to cache here may mean that this graph is a piece of the model.
            outside = check_whole_model(module, failed=True)
            if isinstance(outside, OutsideBlocksGraph):
                return build_outside_blocks_runtime(gm, example_inputs, config, config_patches, outside, token)
        except UnsupportedGraphError as cause:
            if config.fallback is Fallback.INDUCTOR:
                return context.fallback(cause)
            raise cause from error
        if config.fallback is Fallback.INDUCTOR:
            return context.fallback(error)
        raise
    alpha = resolve_alpha_source(
        config.alpha,
        model_class=context.model_class,
        fingerprint=layout.fingerprint(),
        num_points=layout.num_points,
        granularity=layout.granularity,
        search_dirs=[assets_dir()],
    )
    second_order = second_order_in_use(alpha, config)
    if second_order:
        # The table's two-difference coefficients are in use: the rewrite with a third buffer per
        # point (the first run found the layout the table is checked against; it is the same).
        cond_gm, layout = rewrite(second_order=True)
    return _lower_and_compile(context, cond_gm, layout, alpha, second_order)


def _plain_piece(context: BuildContext, piece: GraphPiece) -> GraphPieceRuntime:
    """A piece of a split forward that holds no block: compiled as it is, in Dynamo's tracing
    context as any backend's graph. It runs at every step, full or cached."""
    log.info(
        "ScalingCache: %s: a piece without blocks after a %s runs uncached", type(piece.module).__name__, piece.where
    )
    config = context.config
    fn = compile_graph(
        context.gm, context.example_inputs, config.compiler, context.config_patches, own_tracing_context=False
    )
    return GraphPieceRuntime(fn, piece=piece, compile_token=context.token)


def _lower_and_compile(
    context: BuildContext,
    cond_gm: torch.fx.GraphModule,
    layout: CacheLayout,
    alpha: AlphaTable | None,
    second_order: bool = False,
) -> ScalingCacheRuntime:
    config = context.config
    points = layout.cache_points
    device = layout.device
    point_layout = PointLayout(
        points=list(points), device=device, fingerprint=layout.fingerprint(), second_order=second_order
    )
    limit, source = cache_bytes_limit(config.max_cache_bytes, device)
    per_stream = point_layout.stream_nbytes(config.cache_dtype)
    if limit is not None and per_stream > limit:
        raise refusal(
            f"one stream of {layout.model_class}",
            per_stream,
            limit,
            source,
            point_layout,
            config.cache_dtype,
            layout.granularity,
            streams=1,
            available=limit,
        )
    full_spec = specialize_cache_conds(cond_gm, full=True)
    cached_spec = specialize_cache_conds(cond_gm, full=False)
    # Example state for compilation: the first stream's buffers.
    state = StreamState(point_layout, config.cache_dtype)
    coefficients = torch.zeros(len(points), device=device)
    examples = step_inputs(
        context.example_inputs,
        state.buffers,
        coefficients,
        coefficients.clone(),
        state.stats,
        coefficients.clone() if second_order else None,
    )
    config_patches = context.config_patches
    cudagraphs = config.compiler is InnerCompiler.INDUCTOR and cudagraphs_requested(dict(config_patches))
    if cudagraphs:
        # Our capture replaces Inductor's cudagraph trees for the two step graphs
        # (sc_compile/runtime/cuda_graphs.py says why).
        config_patches = {**config_patches, CUDAGRAPHS_OPTION: False}
    full_step = compile_inner(full_spec, examples, config.compiler, config_patches)
    cached_step = compile_inner(cached_spec, examples, config.compiler, config_patches)
    if cudagraphs:
        full_step, cached_step = _with_cuda_graphs(
            full_step, cached_step, device, len(context.example_inputs) + len(state.buffers), 3 if second_order else 2
        )
    alpha_source = describe_alpha(config.alpha, alpha, config.coefficients, second_order)
    runtime = ScalingCacheRuntime(
        model_class=layout.model_class,
        layout=point_layout,
        full_step=full_step,
        cached_step=cached_step,
        config=config,
        alpha=alpha,
        alpha_source=alpha_source,
        timestep_index=layout.timestep_index,
        identity_index=identity_input(context.example_inputs, context.module),
        module=context.module,
        compile_token=context.token,
        fingerprint=layout.fingerprint(),
        granularity=layout.granularity,
        process_group=context_parallel_group(context.module),
        piece=context.piece,
    )
    log.info(
        "ScalingCache: %s: %d blocks, %d cache points (%s); full step %d nodes (%.1fs), cached step %d nodes (%.1fs)",
        layout.model_class,
        len(layout.block_names),
        len(points),
        layout.granularity,
        full_step.num_compute_nodes,
        full_step.compile_seconds,
        cached_step.num_compute_nodes,
        cached_step.compile_seconds,
    )
    return runtime


def _with_cuda_graphs(
    full_step: CompiledStep,
    cached_step: CompiledStep,
    device: torch.device,
    coefficient_index: int,
    num_coefficients: int = 2,
) -> tuple[CompiledStep, CompiledStep]:
    """Both step graphs replayed as CUDA graphs, in one memory pool; as they are off CUDA."""
    if device.type not in CAPTURES:
        log.info(
            "ScalingCache: CUDA graphs were requested, but the graph runs on %s: the step graphs run uncaptured", device
        )
        return full_step, cached_step
    pool = GraphPool(device)
    # The step's coefficient and refresh vectors (and a second-order layout's coef2; step_inputs:
    # after the model inputs and the buffers) are copied into the captures' static inputs.
    coefficients = set(range(coefficient_index, coefficient_index + num_coefficients))
    wrapped = []
    for name, step in (("full-step", full_step), ("cached-step", cached_step)):
        copied = frozenset(p for p, index in enumerate(step.input_indices) if index in coefficients)
        fn = CudaGraphStep(step.fn, name=name, pool=pool, copied=copied)
        wrapped.append(dataclasses.replace(step, fn=fn))
    return wrapped[0], wrapped[1]


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
            # Dynamo compiles the model's blocks one by one (sc_compile/runtime/per_block.py).
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
    if has_symbolic_shapes(gm):
        # dynamic=True, or Dynamo's automatic dynamic shapes after a size changed: the pipeline
        # runs once per distinct set of input sizes, on the graph specialised to them.
        build = functools.partial(
            build_runtime, config=config, config_patches=patches, module=module, token=token, piece=piece
        )
        return ShapeSpecializingRuntime(gm, build)
    return build_runtime(gm, example_inputs, config, patches, module, token, piece)
