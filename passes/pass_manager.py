"""The ordered pass list and its driver.

The driver copies Dynamo's graph first (editing Dynamo's own GraphModule in place breaks Dynamo),
keeping what Inductor and Dynamo read from it: ``gm.meta``, ``_param_name_to_source`` and each
placeholder's ``_dynamo_source``. After every structural edit the graph is linted and recompiled.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.passes.choose_cache_points import choose_cache_points
from sc_compile.passes.find_blocks import NoBlocksFoundError, UnsupportedGraphError, find_blocks
from sc_compile.passes.find_residual_outputs import find_residual_outputs
from sc_compile.passes.insert_cache_conds import insert_cache_conds
from sc_compile.passes.layout import CacheLayout

log = logging.getLogger(__name__)

LAYOUT_META_KEY = "sc_compile.layout"

# Errors that already tell the user what is wrong and what to do: never re-wrapped.
USER_FACING_ERRORS = (NoBlocksFoundError, UnsupportedGraphError, ValueError)


class PassFailedError(RuntimeError):
    """A pass raised an unexpected error; the message names it and the passes that ran before."""


def layout_of(gm: torch.fx.GraphModule) -> CacheLayout:
    try:
        return gm.meta[LAYOUT_META_KEY]
    except KeyError:
        raise RuntimeError("find_blocks must run before this pass (no layout in gm.meta)") from None


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


def cache_passes(
    model_class: str, granularity: str, prediction: str = "hidden", statistic: str = "subsample"
) -> tuple[tuple[str, Callable[[torch.fx.GraphModule], PassResult]], ...]:
    """The passes in their one fixed order."""
    return (
        ("find_blocks", functools.partial(find_blocks, model_class=model_class)),
        ("find_residual_outputs", find_residual_outputs),
        ("choose_cache_points", functools.partial(choose_cache_points, granularity=granularity)),
        ("insert_cache_conds", functools.partial(insert_cache_conds, prediction=prediction, statistic=statistic)),
    )


CACHE_PASSES = tuple(name for name, _ in cache_passes("", "block"))


def run_cache_passes(
    gm: torch.fx.GraphModule,
    *,
    model_class: str,
    granularity: str = "block",
    prediction: str = "hidden",
    statistic: str = "subsample",
) -> tuple[torch.fx.GraphModule, CacheLayout]:
    """Run the cache passes on a copy of ``gm``; returns the cond-guarded copy and its layout."""
    work = copy_graph_module(gm)
    done: list[str] = []
    for name, fn in cache_passes(model_class, granularity, prediction, statistic):
        try:
            result = fn(work)
        except USER_FACING_ERRORS:
            raise
        except Exception as error:
            raise PassFailedError(
                f"{model_class}: pass {name!r} failed after {done or 'no passes'}: {error}"
            ) from error
        work = result.graph_module
        if result.modified:
            work.graph.lint()
            work.recompile()
        log.debug("pass %s done (modified=%s)", name, result.modified)
        done.append(name)
    return work, layout_of(work)
