"""The ordered pass list and its driver.

The driver copies Dynamo's graph first (editing Dynamo's own GraphModule in place breaks Dynamo),
keeping what Inductor and Dynamo read from it: ``gm.meta``, ``_param_name_to_source`` and each
placeholder's ``_dynamo_source``. The analyses annotate nodes (:mod:`sc_compile.passes.layout`),
so nothing is handed from pass to pass but the graph. After every pass that changed the graph the
driver cleans up: dead-code elimination that keeps every observable mutation, ``lint`` and
``recompile``. A pass that fails, or leaves a graph that does not lint, is named with the passes
that ran before it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.config import Granularity, Prediction
from sc_compile.contract import Statistic
from sc_compile.errors import NoBlocksFoundError, PassFailedError, UnsupportedGraphError
from sc_compile.passes.choose_cache_points import choose_cache_points
from sc_compile.passes.dead_code import eliminate_dead_code
from sc_compile.passes.find_blocks import find_blocks
from sc_compile.passes.find_residual_outputs import find_residual_outputs
from sc_compile.passes.find_timestep_input import mark_timestep_input
from sc_compile.passes.insert_cache_conds import insert_cache_conds
from sc_compile.passes.layout import CacheLayout, cache_layout_of

log = logging.getLogger(__name__)

# Errors that already tell the user what is wrong and what to do: never re-wrapped.
USER_FACING_ERRORS = (NoBlocksFoundError, UnsupportedGraphError, ValueError)

Pass = Callable[[torch.fx.GraphModule], PassResult]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose graph can be edited without touching Dynamo's."""
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output(output)
    for old, new in value_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    copy = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source  # type: ignore[attr-defined]
    return copy


def clean_up(gm: torch.fx.GraphModule) -> None:
    """After a structural edit: dead-code elimination (keeping every mutation a live value or
    the caller can observe), ``lint`` and ``recompile``."""
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()


def analysis_passes(model_class: str, granularity: Granularity) -> tuple[tuple[str, Pass], ...]:
    """The analyses, in order: blocks, their residual outputs and the cache points."""
    return (
        ("find_blocks", functools.partial(find_blocks, model_class=model_class)),
        ("find_residual_outputs", find_residual_outputs),
        ("choose_cache_points", functools.partial(choose_cache_points, granularity=granularity)),
    )


def cache_passes(
    model_class: str,
    granularity: Granularity,
    prediction: Prediction = Prediction.HIDDEN,
    statistic: Statistic = Statistic.SUBSAMPLE,
    require_timestep: bool = False,
    second_order: bool = False,
) -> tuple[tuple[str, Pass], ...]:
    """The passes in their one fixed order.

    The timestep input is looked for after the analyses, so that a graph without blocks is
    refused as such (a piece of a split forward without blocks runs uncached), and before the
    rewrite adds the state inputs.
    """
    return (
        *analysis_passes(model_class, granularity),
        (
            "find_timestep_input",
            functools.partial(mark_timestep_input, model_class=model_class, required=require_timestep),
        ),
        (
            "insert_cache_conds",
            functools.partial(
                insert_cache_conds, prediction=prediction, statistic=statistic, second_order=second_order
            ),
        ),
    )


CACHE_PASSES = tuple(name for name, _ in cache_passes("", Granularity.BLOCK))


def run_passes(
    gm: torch.fx.GraphModule, passes: Sequence[tuple[str, Pass]], *, model_class: str
) -> torch.fx.GraphModule:
    """Run ``passes`` in order on ``gm`` (in place), cleaning up after each that changed it."""
    done: list[str] = []
    for name, fn in passes:
        try:
            result = fn(gm)
            if result.modified:
                clean_up(result.graph_module)
        except USER_FACING_ERRORS:
            raise
        except Exception as error:
            raise PassFailedError(
                f"{model_class}: pass {name!r} failed after {done or 'no passes'}: {error}"
            ) from error
        gm = result.graph_module
        log.debug("pass %s done (modified=%s)", name, result.modified)
        done.append(name)
    return gm


def run_cache_passes(
    gm: torch.fx.GraphModule,
    *,
    model_class: str,
    granularity: Granularity | str = Granularity.BLOCK,
    prediction: Prediction | str = Prediction.HIDDEN,
    statistic: Statistic | str = Statistic.SUBSAMPLE,
    require_timestep: bool = False,
    second_order: bool = False,
) -> tuple[torch.fx.GraphModule, CacheLayout]:
    """Run the cache passes on a copy of ``gm``; returns the cond-guarded copy and its node-free
    layout. ``require_timestep``: refuse a graph without a timestep input (the backend does,
    for a whole model's forward). ``second_order``: each cache point keeps the difference before
    last (``insert_cache_conds``). The options are the config's enums (their values are accepted)."""
    granularity, prediction, statistic = Granularity(granularity), Prediction(prediction), Statistic(statistic)
    passes = cache_passes(model_class, granularity, prediction, statistic, require_timestep, second_order)
    work = run_passes(copy_graph_module(gm), passes, model_class=model_class)
    return work, cache_layout_of(work, model_class=model_class, granularity=granularity, prediction=prediction)
