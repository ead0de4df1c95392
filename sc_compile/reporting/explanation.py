"""``sc_compile.explain``: what the passes find in a model, and the graphs they emit, as text."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from sc_compile.config import Granularity, Prediction
from sc_compile.contract import CachePointSpec, PointLayout, Statistic


def graph_text(gm: torch.fx.GraphModule) -> str:
    """``print_readable`` of ``gm`` with Dynamo's naming noise normalised (stable across runs)."""
    from torch._dynamo.testing import normalize_gm

    return normalize_gm(gm.print_readable(print_output=False))


@dataclasses.dataclass(frozen=True)
class BlockSummary:
    name: str
    num_nodes: int
    outputs: tuple[str, ...]
    residual_outputs: tuple[str, ...]
    cache_points: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found. Graph texts can be pinned in graph-diff regression tests."""

    model_class: str
    granularity: Granularity
    blocks: tuple[BlockSummary, ...]
    cache_points: tuple[CachePointSpec, ...]
    fingerprint: str
    # Two buffers per cache point (full or a sketch), per stream, plus the statistics table:
    # what one stream of a generation allocates.
    buffer_bytes_per_stream: int
    # Bytes the cached step reads from the buffers (the points that feed the output).
    cached_step_buffer_bytes: int
    # Bytes of one full value of the largest cache point (one "hidden state").
    hidden_state_bytes: int
    graph_before: str
    graph_after: str
    full_step_graph: str
    cached_step_graph: str
    full_step_nodes: int
    cached_step_nodes: int
    # The graphs keep the difference before last (a third buffer per point): the α table given
    # has two-difference coefficients in use.
    second_order: bool = False
    # The points whose fitted second coefficient is nonzero somewhere in that table.
    second_term_points: tuple[int, ...] = ()

    def __str__(self) -> str:
        lines = [
            f"{self.model_class}: {len(self.blocks)} blocks, {len(self.cache_points)} cache points "
            f"({self.granularity} granularity), layout fingerprint {self.fingerprint}",
            f"  buffers: {self.buffer_bytes_per_stream / 2**20:.2f} MiB per stream "
            f"({self.buffer_bytes_per_stream / max(self.hidden_state_bytes, 1):.2f} hidden states); the cached step "
            f"reads {self.cached_step_buffer_bytes / 2**20:.2f} MiB",
            f"  full-step graph {self.full_step_nodes} compute nodes, cached-step graph {self.cached_step_nodes}",
        ]
        if self.second_order:
            lines.append(
                "  predictor: two differences (a third buffer per point); the table's second term is used at "
                f"points {list(self.second_term_points)}"
            )
        for block in self.blocks:
            lines.append(
                f"  {block.name}: {block.num_nodes} nodes, outputs {list(block.outputs)}, "
                f"residual outputs {list(block.residual_outputs)}"
            )
        for point in self.cache_points:
            lines.append(
                f"  point {point.index}: {point.block}/{point.node_name} {list(point.shape)} {point.dtype}"
                f"{' -> output head' if point.feeds_output else ''}"
                f"{' (second term)' if point.index in self.second_term_points else ''}"
                f"{f' (sketch: {point.sketch.elements} elements)' if point.sketch is not None else ''}"
            )
        return "\n".join(lines)


def explain_graph(
    gm: torch.fx.GraphModule,
    model_class: str,
    granularity: Granularity | str = Granularity.BLOCK,
    prediction: Prediction | str = Prediction.HIDDEN,
    statistic: Statistic | str = Statistic.SUBSAMPLE,
    cache_dtype: torch.dtype | None = None,
    alpha: Any = None,
    predictor_order: int | None = None,
) -> Explanation:
    """Run the passes and the lowering on a Dynamo graph and describe the result. ``alpha`` (an
    :class:`~sc_compile.calibration.table.AlphaTable` or a path; ``None``: none) and
    ``predictor_order`` say whether the graphs predict with two differences, as the compile
    options of the same names."""
    granularity, prediction, statistic = Granularity(granularity), Prediction(prediction), Statistic(statistic)
    from sc_compile.backends.lowering import specialize_cache_conds
    from sc_compile.passes import run_cache_passes
    from sc_compile.passes.layout import blocks_of
    from sc_compile.passes.pass_manager import analysis_passes, copy_graph_module, run_passes

    # The analysis alone, on its own copy, to report node names before the rewrite erases them.
    analysis = run_passes(copy_graph_module(gm), analysis_passes(model_class, granularity), model_class=model_class)
    summaries = tuple(
        BlockSummary(
            name=b.name,
            num_nodes=len(b.members),
            outputs=tuple(n.name for n in b.outputs),
            residual_outputs=tuple(n.name for n in b.residual_outputs),
            cache_points=tuple(n.name for n in b.cache_points),
        )
        for b in blocks_of(analysis)
    )
    second_order = False
    second_term_points: tuple[int, ...] = ()
    if alpha is not None:
        from sc_compile.calibration.table import AlphaTable
        from sc_compile.config import ScalingCacheConfig
        from sc_compile.decision.coefficients import second_order_in_use

        table = alpha if isinstance(alpha, AlphaTable) else AlphaTable.load(alpha)
        second_order = second_order_in_use(table, ScalingCacheConfig(alpha=table, predictor_order=predictor_order))
        if second_order and table.fitted is not None and table.fitted.second is not None:
            used = table.fitted.second.uses_second_difference().flatten(0, 3).any(0)  # [P]
            second_term_points = tuple(int(i) for i in used.nonzero().flatten().tolist())
    cond_gm, layout = run_cache_passes(
        gm,
        model_class=model_class,
        granularity=granularity,
        prediction=prediction,
        statistic=statistic,
        second_order=second_order,
    )
    full = specialize_cache_conds(cond_gm, full=True)
    cached = specialize_cache_conds(cond_gm, full=False)
    points = tuple(layout.cache_points)
    point_layout = PointLayout(list(points), torch.device("meta"), layout.fingerprint(), second_order)

    return Explanation(
        model_class=model_class,
        granularity=granularity,
        blocks=summaries,
        cache_points=points,
        fingerprint=layout.fingerprint(),
        buffer_bytes_per_stream=point_layout.stream_nbytes(cache_dtype),
        cached_step_buffer_bytes=sum(p.buffer_nbytes(cache_dtype, second_order) for p in points if p.feeds_output),
        hidden_state_bytes=max(p.numel * p.dtype.itemsize for p in points),
        graph_before=graph_text(gm),
        graph_after=graph_text(cond_gm),
        full_step_graph=graph_text(full.graph_module),
        cached_step_graph=graph_text(cached.graph_module),
        full_step_nodes=full.num_compute_nodes,
        cached_step_nodes=cached.num_compute_nodes,
        second_order=second_order,
        second_term_points=second_term_points,
    )


def _call_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return self.forward(*args, **kwargs)


def _throwaway_forward(module: torch.nn.Module) -> Any:
    """``module.forward`` behind a copy of its code object.

    Dynamo keeps its compiled entries on the code object it compiles; tracing ``module`` directly
    would leave an entry on the model's forward (shared by every model of its class) that counts
    against the user's recompile limit. The copy traces to the same graph, with the same input
    names, as ``torch.compile(module)`` does, and its entries die with it. A forward that diffusers
    hooks replaced by a ``functools.partial`` is reached through a method whose code is copied.
    """
    function = getattr(module.forward, "__func__", None) or _call_forward
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return types.MethodType(copy, module)


def explain(
    model: torch.nn.Module,
    *args: Any,
    granularity: Granularity | str = Granularity.BLOCK,
    prediction: Prediction | str = Prediction.HIDDEN,
    statistic: Statistic | str = Statistic.SUBSAMPLE,
    cache_dtype: torch.dtype | None = None,
    alpha: Any = None,
    predictor_order: int | None = None,
    **kwargs: Any,
) -> Explanation:
    """Trace ``model(*args, **kwargs)`` with Dynamo and describe what ScalingCache would do.

    ``granularity``, ``prediction``, ``statistic`` and ``cache_dtype`` are the compile options of
    the same names; ``buffer_bytes_per_stream`` is what one stream of a generation allocates with
    them (the memory model: the model may live on the ``meta`` device, nothing is allocated).
    ``alpha`` (an α table or its path) and ``predictor_order``: as the compile options; a table
    whose two-difference coefficients are in use gives the graphs and bytes of the second-order
    predictor (a third buffer per point).

    The traced graph runs once, eagerly, to finish Dynamo's call; no generation state is created.
    """
    granularity, prediction, statistic = Granularity(granularity), Prediction(prediction), Statistic(statistic)
    module = getattr(model, "_orig_mod", model)
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        # dynamic=False: the traced code is new each time, so Dynamo's automatic dynamic shapes must
        # not carry sizes over from an earlier explain of another model.
        torch.compile(_throwaway_forward(module), backend=capture, fullgraph=True, dynamic=False)(*args, **kwargs)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one traced graph for {type(module).__name__}, got {len(graphs)}")
    # Analysed outside the backend so that errors reach the caller as they are, not wrapped by Dynamo.
    return explain_graph(
        graphs[0], type(module).__name__, granularity, prediction, statistic, cache_dtype, alpha, predictor_order
    )
