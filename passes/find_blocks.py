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

from sc_compile.errors import NoBlocksFoundError, UnsupportedGraphError
from sc_compile.passes.layout import (
    ANALYSIS_META_KEYS,
    BLOCK_META_KEY,
    block_inputs,
    block_outputs,
    example_value,
)
from sc_compile.passes.module_paths import module_classes, numbered_ancestor_of, top_level_block_of

log = logging.getLogger(__name__)


def _is_tensor_valued(node: torch.fx.Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def input_size_symbols(value: object) -> set[object]:
    """Symbols of ``value`` that stand for input sizes (Dynamo's ``s0``). The symbols of
    data-dependent ops (``u0`` of ``nonzero``, boolean-mask indexing or ``.item()``) and of float
    inputs Dynamo does not specialise (``zf0``: a LoRA scale, a norm's eps) are values, not sizes,
    and may stay in a graph the passes rewrite."""
    from torch.fx.experimental.symbolic_shapes import free_symbols
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    return {s for s in free_symbols(value) if symbol_is_type(s, SymT.SIZE)}


def _check_static(node: torch.fx.Node, model_class: str) -> None:
    value = example_value(node)
    if not isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool | torch.Tensor):
        return
    if input_size_symbols(value):
        shown = tuple(value.shape) if isinstance(value, torch.Tensor) else value
        raise UnsupportedGraphError(
            f"{model_class}: {node.name!r} has a symbolic input size ({shown}); the cache passes need "
            "a graph specialised to static sizes. The backend specialises a dynamic-shape graph per "
            "input size before these passes; call the passes on that specialisation, or compile with "
            "dynamic=False."
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
    repeated = _repeated_blocks(owner)
    owner = {node: block for node, block in owner.items() if block in repeated}
    return _first_calls_only(nodes, owner)


# Single layers of torch.nn: a numbered group of them (``nn.Sequential(Linear, Linear)``) is not a
# group of blocks. torch.nn's own blocks (``nn.TransformerEncoderLayer``) are.
_LAYER_TYPES = (
    torch.nn.Linear,
    torch.nn.Identity,
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.modules.conv._ConvNd,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
    torch.nn.Embedding,
)


def _is_layer(cls: object) -> bool:
    return isinstance(cls, type) and (issubclass(cls, _LAYER_TYPES) or cls.__module__ == "torch.nn.modules.activation")


def _repeated_blocks(owner: dict[torch.fx.Node, str]) -> set[str]:
    """The numbered children that are repeated blocks: every ``<name>.<int>`` of one ``<name>``
    is an instance of one class, and not a single layer (``nn.Sequential(Linear, SiLU, Linear)``,
    a timestep or text projection, is a numbered group of layers, not of blocks)."""
    classes: dict[str, set[object]] = {}
    for node, block in owner.items():
        cls = module_classes(node).get(block)
        if cls is not None:
            classes.setdefault(block, set()).add(cls)
    groups: dict[str, set[object]] = {}
    for block, found in classes.items():
        groups.setdefault(block.rsplit(".", 1)[0], set()).update(found)
    dropped = {group for group, found in groups.items() if len(found) != 1 or _is_layer(next(iter(found)))}
    if dropped:
        log.debug("numbered groups that are not repeated blocks: %s", sorted(dropped))
    return {block for block in owner.values() if block.rsplit(".", 1)[0] not in dropped}


def _first_calls_only(nodes: list[torch.fx.Node], owner: dict[torch.fx.Node, str]) -> dict[torch.fx.Node, str]:
    """Keep each block's first call: nodes of a block's modules that run again after the next block
    has started are a later call of a shared submodule, not the block (DiT's output head calls
    ``transformer_blocks[0].norm1.emb`` once more for its own conditioning). They stay outside
    every block, so they run at every step."""
    position = {node: index for index, node in enumerate(nodes)}
    starts: dict[str, int] = {}
    for node, block in owner.items():
        starts[block] = min(starts.get(block, position[node]), position[node])
    ordered = sorted(starts.values())
    cutoff = {}
    for block, start in starts.items():
        later = [s for s in ordered if s > start]
        cutoff[block] = later[0] if later else len(nodes)
    kept = {node: block for node, block in owner.items() if position[node] < cutoff[block]}
    if len(kept) != len(owner):
        log.debug("%d nodes of later calls of block submodules left outside the blocks", len(owner) - len(kept))
    return kept


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


def _where(node: torch.fx.Node) -> str:
    """The user source line of ``node`` as Dynamo recorded it (for error messages)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.splitlines() if line.strip().startswith("File ")]
    return lines[-1] if lines else f"node {node.format_node()}"


def _scalar_chain(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes that compute the non-tensor value ``node`` from tensors and constants, in graph
    order (``scale.item() * 0.5``, ``x.shape[1] // 2``), or ``None`` when a non-tensor graph input
    or a node that mutates something is among them."""
    from sc_compile.passes.dead_code import mutated_inputs

    chain: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in chain or _is_tensor_valued(current):
            continue
        if current.op not in ("call_function", "call_method") or mutated_inputs(current) or current.is_impure():
            return None
        chain.add(current)
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _rematerialize_scalars(
    graph: torch.fx.Graph,
    members: list[torch.fx.Node],
    scalars: list[torch.fx.Node],
    name: str,
    model_class: str,
) -> list[torch.fx.Node]:
    """Recompute, inside the block, the non-tensor values it reads from outside.

    A block's cond operands must be tensors. A float forward argument or attribute that Dynamo
    does not specialise (a LoRA scale after its second value, a norm's ``eps`` under
    ``dynamic=True``) arrives as a 0-d tensor input and ``.item()``; the arithmetic on it that the
    model does once before its blocks is repeated in each block that reads it, so the block
    reads the tensor (a graph input) and the value stays an input of every specialised graph.
    """
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    new_members: list[torch.fx.Node] = []
    first = members[0]
    for scalar in scalars:
        chain = _scalar_chain(scalar)
        if chain is None:
            raise UnsupportedGraphError(
                f"{model_class}: block {name!r} reads a non-tensor value {scalar.name!r} "
                f"({type(example_value(scalar)).__name__}, {_where(scalar)}) that is not computed from "
                "tensors alone (a Python scalar graph input, or a mutation). ScalingCache can only guard "
                "blocks whose inputs are tensors: pass the value as a tensor, or let Dynamo specialise "
                "it (torch._dynamo.config.specialize_float, the default without dynamic=True)."
            )
        for node in chain:
            if node in copies:
                continue
            with graph.inserting_before(first):
                copies[node] = graph.node_copy(node, lambda arg: copies.get(arg, arg))
            new_members.append(copies[node])
    member_set = set(members)
    for member in members:
        for scalar, copy in copies.items():
            if scalar in member.all_input_nodes:
                member.replace_input_with(scalar, copy)
    for node in reversed(list(copies)):
        if not node.users:
            graph.erase_node(node)
    assert all(c not in member_set for c in new_members)
    return new_members + members


def find_blocks(gm: torch.fx.GraphModule, model_class: str = "") -> PassResult:
    """Mark the member nodes of each top-level block of ``gm`` with the block's name
    (``node.meta[BLOCK_META_KEY]``); hoist glue out of block ranges.

    Raises :class:`NoBlocksFoundError` naming ``model_class`` when no block is found.
    """
    model_class = model_class or type(gm).__name__
    graph = gm.graph
    for node in graph.nodes:
        _check_static(node, model_class)
        for key in ANALYSIS_META_KEYS:
            node.meta.pop(key, None)
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
    found: list[str] = []
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
        scalars = [a for a in block_inputs(members) if not _is_tensor_valued(a)]
        if scalars:
            members = _rematerialize_scalars(graph, members, scalars, name, model_class)
            modified = True
            all_nodes = list(graph.nodes)
            order = {node: index for index, node in enumerate(all_nodes)}
        outputs = block_outputs(members)
        for node in outputs:
            if not _is_tensor_valued(node):
                raise UnsupportedGraphError(
                    f"{model_class}: block {name!r} returns a non-tensor value {node.name!r} "
                    f"({type(example_value(node)).__name__}, {_where(node)}) that the rest of the graph "
                    "reads; a cached step could not produce it. ScalingCache can only skip blocks whose "
                    "outputs are tensors: return it as a tensor, or compute it outside the block."
                )
        if not outputs:
            log.debug("block %s has no outputs (dead code); skipped", name)
            continue
        for member in members:
            member.meta[BLOCK_META_KEY] = name
        found.append(name)
    log.debug("%s: found %d blocks: %s", model_class, len(found), found)
    return PassResult(gm, modified)
