"""Compile a graph Dynamo made of a block on its own (per-block graphs) for ScalingCache.

The graph is compiled as it is by the inner compiler, in Dynamo's tracing context (as any
backend's graph; dynamic sizes need no specialisation), and handed to
:class:`~sc_compile.runtime.per_block.BlockGraphRuntime`, which runs it at full steps and returns the
prediction of its outputs at cached steps. Refused here, before anything runs, with what to do:
options that need the whole model's graph (a calibrated α table, ``granularity="module"``,
``prediction="residual"``), context parallelism, an output a cached step cannot predict (not a
floating tensor), and a graph that writes into one of its inputs (a cached step would skip the
write).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx

from sc_compile.backends.capture_check import BlockGraph, OutsideBlocksGraph, holds_blocks
from sc_compile.config import Granularity, Prediction, ScalingCacheConfig
from sc_compile.errors import BlockGraphError, GraphBreakError
from sc_compile.passes.dead_code import mutated_inputs
from sc_compile.runtime.per_block import BlockGraphRuntime, OutputPlan, OutsideBlocksRuntime
from sc_compile.runtime.registry import REGISTRY

log = logging.getLogger(__name__)


__all__ = ["BlockGraphError", "build_block_graph_runtime", "build_outside_blocks_runtime"]


def _refuse_options(config: ScalingCacheConfig, graph: BlockGraph) -> None:
    where = f"Dynamo compiles the blocks of {type(graph.model).__name__} one by one ({graph.where})"
    fix = (
        "Compile the whole model as one graph (torch.compile(model, backend='scalingcache', fullgraph=True) "
        "reports the break at its source), or drop the option."
    )
    if config.alpha is not None and config.alpha != "ones":
        raise BlockGraphError(
            f"{where}; an α table describes the cache points of the whole model's graph, which per-block graphs "
            f"do not have (they are cached with α = 1). {fix}"
        )
    if config.granularity is not Granularity.BLOCK:
        raise BlockGraphError(
            f"{where}; per-block graphs are cached at their outputs only (granularity='block'). {fix}"
        )
    if config.prediction is not Prediction.HIDDEN:
        raise BlockGraphError(
            f"{where}; prediction='residual' needs the block input under each cache point, which a per-block "
            f"graph does not name. {fix}"
        )
    if getattr(getattr(graph.model, "_parallel_config", None), "context_parallel_config", None) is not None:
        raise BlockGraphError(
            f"{where}; context parallelism with per-block graphs is not supported (the ranks' decisions are "
            f"synchronised only for whole-model graphs). {fix}"
        )


def _view_root(node: torch.fx.Node) -> torch.fx.Node:
    """The value ``node`` is a view of (following its first tensor argument while it is a view)."""
    while node.op != "placeholder":
        value = node.meta.get("example_value")
        if not (isinstance(value, torch.Tensor) and value._is_view()):
            return node
        sources = [a for a in node.all_input_nodes if isinstance(a.meta.get("example_value"), torch.Tensor)]
        if not sources:
            return node
        node = sources[0]
    return node


def plan_outputs(gm: torch.fx.GraphModule, graph: BlockGraph) -> OutputPlan:
    """What a cached step returns for each output of ``gm`` (refuses what it cannot predict)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        for target in mutated_inputs(node):
            root = _view_root(target)
            if root.op == "placeholder":
                raise BlockGraphError(
                    f"{graph.where}: the graph writes into its input {root.name!r} ({node.format_node()}); a cached "
                    "step does not run the graph and would skip the write. Make the block return the value "
                    "instead of writing into its input, or compile the whole model as one graph."
                )
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    values = list(values) if isinstance(values, tuple | list) else [values]
    predicted: list[int] = []
    passthrough: list[tuple[int, int]] = []
    for position, value in enumerate(values):
        if isinstance(value, torch.fx.Node) and value.op == "placeholder":
            passthrough.append((position, placeholders.index(value)))
            continue
        example = value.meta.get("example_value") if isinstance(value, torch.fx.Node) else None
        if not (isinstance(example, torch.Tensor) and example.is_floating_point()):
            raise BlockGraphError(
                f"{graph.where}: output {position} of the graph ({value}) is not a floating-point tensor, so a "
                "cached step cannot predict it. Compile the whole model as one graph (remove the break), or pass "
                "options={'fallback': 'inductor'} to compile it uncached."
            )
        predicted.append(position)
    return OutputPlan(len(values), tuple(predicted), tuple(passthrough))


def build_block_graph_runtime(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: ScalingCacheConfig,
    config_patches: Mapping[str, Any],
    graph: BlockGraph,
    token: object | None,
    module: torch.nn.Module | None,
) -> BlockGraphRuntime:
    """The runtime of one per-block graph (see the module docstring)."""
    from sc_compile.backends.inner_compiler import compile_graph
    from sc_compile.backends.integration import current_translator, identity_input

    _refuse_options(config, graph)
    plan = plan_outputs(gm, graph)
    identity_index = identity_input(example_inputs, module)
    fn = compile_graph(gm, example_inputs, config.compiler, config_patches, own_tracing_context=False)
    tx = current_translator()
    code = tx.f_code if tx is not None else gm
    log.info(
        "ScalingCache: %s: a per-block graph of %r (%s), %d outputs predicted at cached steps",
        type(graph.model).__name__,
        graph.block_path,
        graph.where,
        len(plan.predicted),
    )
    REGISTRY.note_cached_compile(token)
    return BlockGraphRuntime(
        fn,
        model=graph.model,
        label=_label(graph),
        where=graph.where,
        code=code,
        identity_index=identity_index,
        outputs=plan,
        config=config,
        compile_token=token,
    )


def _label(graph: BlockGraph) -> str:
    """What the graph runs, for messages: the blocks of a class (one graph serves all of them)."""
    top = ".".join(graph.block_path.split(".")[:2])
    block = graph.model.get_submodule(top)
    inside = graph.block_path[len(top) + 1 :]
    part = f" ({inside})" if inside else ""
    return f"the {type(block).__name__} blocks{part} of {type(graph.model).__name__}"


def build_outside_blocks_runtime(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: ScalingCacheConfig,
    config_patches: Mapping[str, Any],
    graph: OutsideBlocksGraph,
    token: object | None,
) -> OutsideBlocksRuntime:
    """A graph outside the blocks of a model whose forward runs in Python: it runs as it is at
    every step. Refused when the model holds no blocks (nothing of it would ever be cached)."""
    from sc_compile.backends.inner_compiler import compile_graph

    if graph.model is not None and not holds_blocks(graph.model):
        raise GraphBreakError(graph.refusal)
    fn = compile_graph(gm, example_inputs, config.compiler, config_patches, own_tracing_context=False)
    return OutsideBlocksRuntime(fn)
