"""Choose the cache points of every block for the configured granularity.

``block`` granularity caches each block's outputs (for two-stream MMDiT blocks, both streams).
``module`` granularity caches every residual-module output on the stream; a block output that is
not itself such a point is derived from the points at a cached step when only casts, views, slices
and ``cat`` lie between (Flux's single blocks slice the joint stream at their end), and is made a
point of its own otherwise.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.config import Granularity
from sc_compile.passes.find_residual_outputs import stream_inputs
from sc_compile.passes.layout import CACHE_POINT_META_KEY, BlockInfo, blocks_of


def replay_nodes(
    output: torch.fx.Node, points: set[torch.fx.Node], members: set[torch.fx.Node]
) -> list[torch.fx.Node] | None:
    """Stream-preserving member nodes that compute ``output`` from ``points`` (in no set order).

    ``None`` when ``output`` needs anything else from inside the block.
    """
    needed: set[torch.fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in points or node not in members or node in needed:
            continue
        carried = stream_inputs(node)
        if not carried:
            return None
        other_member_inputs = [a for a in node.all_input_nodes if a in members and a not in carried and a not in points]
        if other_member_inputs:
            return None
        needed.add(node)
        stack.extend(a for a in node.all_input_nodes if a in members)
    return list(needed)


def _points_for(block: BlockInfo, granularity: Granularity) -> list[torch.fx.Node]:
    if granularity is Granularity.BLOCK:
        return list(block.outputs)
    points = set(block.residual_outputs)
    members = set(block.members)
    for output in block.outputs:
        if output not in points and replay_nodes(output, points, members) is None:
            points.add(output)
    return [n for n in block.members if n in points]


def choose_cache_points(gm: torch.fx.GraphModule, granularity: Granularity | str = Granularity.BLOCK) -> PassResult:
    """Mark the cache points of every block (``node.meta[CACHE_POINT_META_KEY]``; an analysis:
    the graph is unchanged). Reads the blocks and residual outputs the earlier analyses marked."""
    if granularity not in ("block", "module"):
        raise ValueError(f"granularity must be 'block' or 'module', but got {granularity!r}")
    granularity = Granularity(granularity)
    blocks = blocks_of(gm)
    for node in gm.graph.nodes:
        node.meta.pop(CACHE_POINT_META_KEY, None)
    for block in blocks:
        for node in _points_for(block, granularity):
            node.meta[CACHE_POINT_META_KEY] = True
    return PassResult(gm, False)
