"""Find the top-level transformer blocks of a Dynamo graph and the nodes that belong to each.

A node belongs to block ``transformer_blocks.3`` when its ``nn_module_stack`` says so. Nodes that
Dynamo placed between a block's first and last node without a module of their own join the block
when they depend on it, and are hoisted in front of it otherwise (they are glue the block does not
need to own). Placeholders are never members; the block's inputs must be tensors.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.passes.layout import BlockInfo, CacheLayout, example_value
from sc_compile.passes.module_paths import numbered_ancestor_of, top_level_block_of

log = logging.getLogger(__name__)


class NoBlocksFoundError(RuntimeError):
    """The graph has no ``<name>.<int>`` top-level blocks that ScalingCache could cache."""


class UnsupportedGraphError(RuntimeError):
    """The blocks exist but the graph around them cannot be rewritten safely."""


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def _check_static(node: torch.fx.Node, model_class: str) -> None:
    value = example_value(node)
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        raise UnsupportedGraphError(
            f"{model_class}: node {node.name!r} is a symbolic size; ScalingCache needs static shapes. "
            "Compile with dynamic=False (the default for a first compile); a new resolution then "
            "recompiles once for that shape."
        )
    if isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape):
        raise UnsupportedGraphError(
            f"{model_class}: tensor {node.name!r} has symbolic shape {tuple(value.shape)}; "
            "ScalingCache needs static shapes. Compile with dynamic=False."
        )


def _attributed_blocks(graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    prefixes = {found[0] for n in nodes if (found := numbered_ancestor_of(n)) is not None}
    if not prefixes:
        return {}
    root = min(prefixes, key=lambda p: (p.count(".") + bool(p), p))
    owner: dict[torch.fx.Node, str] = {}
    for node in nodes:
        block = top_level_block_of(node, root)
        if block is not None:
            owner[node] = block
    return owner


def _collect_block(
    nodes: list[torch.fx.Node],
    name: str,
    owner: dict[torch.fx.Node, str],
    model_class: str,
) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """Split the nodes between a block's first and last node into members and hoisted glue."""
    forced_out: set[torch.fx.Node] = set()
    while True:
        members: list[torch.fx.Node] = []
        member_set: set[torch.fx.Node] = set()
        hoisted: list[torch.fx.Node] = []
        for node in nodes:
            block = owner.get(node)
            if block is not None and block != name:
                raise UnsupportedGraphError(
                    f"{model_class}: blocks {name!r} and {block!r} interleave in the traced graph "
                    f"(node {node.name!r}); ScalingCache needs one block to finish before the next starts."
                )
            if node.op in ("placeholder", "get_attr") or node in forced_out:
                hoisted.append(node)
                continue
            depends_on_block = any(arg in member_set for arg in node.all_input_nodes)
            if block == name or depends_on_block:
                members.append(node)
                member_set.add(node)
            else:
                hoisted.append(node)
        # A member reading a tuple from outside (``chunk`` in the prologue, ``getitem`` in the block)
        # would make a non-tensor cond operand: compute such ``getitem`` outside instead.
        newly_forced = {
            node
            for node in members
            if node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(node.args[0], torch.fx.Node)
            and node.args[0] not in member_set
            and not _is_tensor_valued(node.args[0])
        }
        if not newly_forced - forced_out:
            return members, hoisted
        forced_out |= newly_forced


def find_blocks(gm: torch.fx.GraphModule, model_class: str = "") -> PassResult:
    """Record the top-level blocks of ``gm`` in ``gm.meta``; hoist glue out of block ranges.

    Raises :class:`NoBlocksFoundError` naming ``model_class`` when no block is found.
    """
    from sc_compile.passes.pass_manager import LAYOUT_META_KEY

    model_class = model_class or type(gm).__name__
    graph = gm.graph
    for node in graph.nodes:
        _check_static(node, model_class)
    owner = _attributed_blocks(graph)
    if not owner:
        raise NoBlocksFoundError(
            f"{model_class}: found no transformer blocks. ScalingCache looks for repeated top-level "
            "blocks, children named '<name>.<index>' of the model (for example "
            "'transformer_blocks.0') in the traced graph's nn_module_stack. This module has none, so "
            "there is nothing to cache; compile it with backend='inductor' instead, or pass "
            "options={'fallback': 'inductor'} to fall back with a warning."
        )
    order = {node: index for index, node in enumerate(graph.nodes)}
    spans: dict[str, list[torch.fx.Node]] = {}
    for node, block in owner.items():
        spans.setdefault(block, []).append(node)
    block_names = sorted(spans, key=lambda b: order[spans[b][0]])
    all_nodes = list(graph.nodes)
    modified = False
    blocks: list[BlockInfo] = []
    for name in block_names:
        first, last = order[spans[name][0]], order[spans[name][-1]]
        members, hoisted = _collect_block(all_nodes[first : last + 1], name, owner, model_class)
        first_member = members[0]
        for node in hoisted:
            if order[node] > order[first_member]:
                first_member.prepend(node)
                modified = True
        all_nodes = list(graph.nodes)
        order = {node: index for index, node in enumerate(all_nodes)}
        member_set = set(members)
        inputs: list[torch.fx.Node] = []
        seen: set[torch.fx.Node] = set()
        for node in members:
            for arg in node.all_input_nodes:
                if arg not in member_set and arg not in seen:
                    seen.add(arg)
                    inputs.append(arg)
        outputs = [n for n in members if any(user not in member_set for user in n.users)]
        for node in inputs + outputs:
            if not _is_tensor_valued(node):
                raise UnsupportedGraphError(
                    f"{model_class}: block {name!r} exchanges a non-tensor value {node.name!r} "
                    f"({type(example_value(node)).__name__}) with the rest of the graph; ScalingCache "
                    "can only guard blocks whose inputs and outputs are tensors."
                )
        if not outputs:
            log.debug("block %s has no outputs (dead code); skipped", name)
            continue
        blocks.append(BlockInfo(name=name, members=members, inputs=inputs, outputs=outputs))
    if modified:
        graph.lint()
        gm.recompile()
    gm.meta[LAYOUT_META_KEY] = CacheLayout(model_class=model_class, blocks=blocks)
    log.debug("%s: found %d blocks: %s", model_class, len(blocks), [b.name for b in blocks])
    return PassResult(gm, modified)
