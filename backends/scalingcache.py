"""The ``scalingcache`` torch.compile backend.

``torch.compile(model, backend="scalingcache", options={...})`` resolves here through the
``torch_dynamo_backends`` entry point. The backend is thin: validate the options, run the cache
passes on a copy of Dynamo's graph, lower the cond-guarded graph into a full-step and a cached-step
graph, compile both with the inner compiler (Inductor by default, with every Inductor option and
``mode`` the user gave), and return the runtime that picks one per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from sc_compile.alpha import AlphaTable, resolve_alpha_source
from sc_compile.backends.capture_check import GraphPiece, check_whole_model
from sc_compile.backends.inner_compiler import compile_graph, compile_inner
from sc_compile.backends.integration import (
    compile_token,
    context_parallel_group,
    identity_input,
    traced_module,
)
from sc_compile.backends.lowering import specialize_cache_conds
from sc_compile.backends.shape_specialization import _has_symbolic_shapes, specialize_to_inputs
from sc_compile.config import Fallback, ScalingCacheConfig, split_options
from sc_compile.contract import step_inputs
from sc_compile.memory import cache_bytes_limit, refusal
from sc_compile.passes import run_cache_passes
from sc_compile.passes.find_blocks import NoBlocksFoundError, UnsupportedGraphError
from sc_compile.passes.layout import CacheLayout
from sc_compile.runtime import GraphPieceRuntime, PointLayout, ScalingCacheRuntime

log = logging.getLogger(__name__)


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
            # A piece of a split forward may lack the timestep: one after a break joins the step
            # of the forward's first piece; a first piece without it can only be placed by the
            # pipeline clock (the runtime says so when it is called without one).
            require_timestep=piece is None,
        )
    except (NoBlocksFoundError, UnsupportedGraphError) as error:
        if piece is not None and isinstance(error, NoBlocksFoundError):
            return _plain_piece(gm, example_inputs, config, config_patches, module, token, piece)
        try:
            # Nothing to cache here may mean that this graph is a piece of the model.
            check_whole_model(module, failed=True)
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
        gm, example_inputs, config, config_patches, module, cond_gm, layout, alpha, layout.timestep_index, token, piece
    )


def _plain_piece(gm, example_inputs, config, config_patches, module, token, piece: GraphPiece) -> GraphPieceRuntime:
    """A piece of a split forward that holds no block: compiled as it is, in Dynamo's tracing
    context as any backend's graph. It runs at every step, full or cached."""
    log.info("ScalingCache: %s: a piece without blocks after a %s runs uncached", type(piece.module).__name__, piece.where)
    fn = compile_graph(gm, example_inputs, config.compiler, config_patches, own_tracing_context=False)
    return GraphPieceRuntime(fn, piece=piece, compile_token=token)


def _lower_and_compile(gm, example_inputs, config, config_patches, module, cond_gm, layout: CacheLayout, alpha: AlphaTable | None, timestep_index: int | None, token: object | None, piece: GraphPiece | None = None):
    points = layout.cache_points
    device = layout.device
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
        len(layout.block_names),
        len(points),
        layout.granularity,
        full_step.num_compute_nodes,
        full_step.compile_seconds,
        cached_step.num_compute_nodes,
        cached_step.compile_seconds,
    )
    return runtime


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
    try:
        piece = check_whole_model(module)
    except UnsupportedGraphError as error:
        if config.fallback is Fallback.INDUCTOR:
            return _fallback(gm, example_inputs, config, patches, error)
        raise
    if piece is not None:
        # A resume function's frame need not hold ``self``: the piece names the model.
        module = piece.module
    token = compile_token()
    if _has_symbolic_shapes(gm):
        # dynamic=True, or Dynamo's automatic dynamic shapes after a size changed.
        return ShapeSpecializingRuntime(gm, config, patches, module, token, piece)
    return build_runtime(gm, example_inputs, config, patches, module, token, piece)
