"""Find the residual-module outputs on each block's residual stream.

A residual module writes ``y = x + gate * f(x)``. Walking back from a block's outputs through
stream-preserving ops (casts, views, slices, ``cat``) we meet such adds; of an add's two operands the
skip connection is the one whose in-block ancestors are a subset of the other's (``x`` versus
``gate * f(x)``, whichever side of the ``+`` it is written on). An add followed only by a cast
(``(x.float() + a * g).type_as(x)``) is recorded at the cast, so its buffer has the model's dtype.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.passes.layout import RESIDUAL_OUTPUT_META_KEY, BlockInfo, blocks_of, tensor_meta

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor}
_CAST_METHODS = {"to", "float", "half", "bfloat16", "type_as", "type", "contiguous", "clone"}
_STREAM_METHODS = _CAST_METHODS | {"view", "reshape", "clip", "clamp", "unflatten", "flatten"}
_STREAM_FUNCTIONS = {operator.getitem, torch.cat, torch.clip, torch.clamp, torch.reshape}


def is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target in ("add", "add_", "__add__")


def is_cast(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target in _CAST_METHODS


def stream_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs through which a stream-preserving op carries the residual stream."""
    if node.op == "call_method" and node.target in _STREAM_METHODS:
        first = node.args[0]
        return [first] if isinstance(first, torch.fx.Node) else []
    if node.op == "call_function" and node.target in _STREAM_FUNCTIONS:
        first = node.args[0]
        if node.target is torch.cat and isinstance(first, (list, tuple)):
            return [a for a in first if isinstance(a, torch.fx.Node)]
        return [first] if isinstance(first, torch.fx.Node) else []
    return []


def _ancestors(node: torch.fx.Node, members: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Everything ``node`` reads inside the block, and the block inputs those read."""
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for arg in current.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                if arg in members:
                    stack.append(arg)
    return seen


def skip_operand(add: torch.fx.Node, members: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The skip connection ``x`` of ``x + g * f(x)``: the operand the other one is computed from.

    It must also carry the add's full shape: a bias or a gate broadcast into an add is no stream.
    """
    operands = [a for a in add.args[:2] if isinstance(a, torch.fx.Node)]
    out_meta = tensor_meta(add)
    if len(operands) != 2 or out_meta is None:
        return None
    left, right = operands
    for skip, branch in ((left, right), (right, left)):
        skip_meta = tensor_meta(skip)
        if skip_meta is None or tuple(skip_meta.shape) != tuple(out_meta.shape):
            continue
        # Casts are traced anew at every use (``x.float()`` in the norm and in the residual add
        # are two nodes), so the branch is compared against the value before the casts.
        if _strip_casts(skip, members) in _ancestors(branch, members):
            return skip
    return None


def _strip_casts(node: torch.fx.Node, members: set[torch.fx.Node]) -> torch.fx.Node:
    """The value before the block's own casts of it (never past the block's inputs)."""
    while node in members and is_cast(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def bias_add_carrier(add: torch.fx.Node, members: set[torch.fx.Node]) -> torch.fx.Node | None:
    """For ``stream + bias`` (a smaller, broadcast operand that does not read the stream), the
    stream operand: the residual stream passes through such an add unchanged in shape."""
    operands = [a for a in add.args[:2] if isinstance(a, torch.fx.Node)]
    out_meta = tensor_meta(add)
    if len(operands) != 2 or out_meta is None:
        return None
    full = [a for a in operands if (m := tensor_meta(a)) is not None and tuple(m.shape) == tuple(out_meta.shape)]
    if len(full) != 1:
        return None
    (carrier,) = full
    (other,) = [a for a in operands if a is not carrier]
    return None if carrier in _ancestors(other, members) else carrier


def _through_casts(node: torch.fx.Node) -> torch.fx.Node:
    while len(node.users) == 1:
        (user,) = node.users
        if not is_cast(user):
            break
        node = user
    return node


def residual_outputs_of(block: BlockInfo) -> list[torch.fx.Node]:
    """Residual-add outputs on ``block``'s residual stream, in graph order."""
    members = set(block.members)
    found: set[torch.fx.Node] = set()
    visited: set[torch.fx.Node] = set()
    stack = list(block.outputs)
    while stack:
        node = stack.pop()
        if node in visited or node not in members:
            continue
        visited.add(node)
        if is_add(node):
            skip = skip_operand(node, members)
            if skip is not None:
                found.add(_through_casts(node))
                stack.append(skip)
                continue
            carrier = bias_add_carrier(node, members)
            if carrier is not None:
                stack.append(carrier)
                continue
        stack.extend(stream_inputs(node))
    return [n for n in block.members if n in found]


def find_residual_outputs(gm: torch.fx.GraphModule) -> PassResult:
    """Mark every block's residual outputs (``node.meta[RESIDUAL_OUTPUT_META_KEY]``; an analysis:
    the graph is unchanged). Reads the blocks ``find_blocks`` marked."""
    blocks = blocks_of(gm)
    for node in gm.graph.nodes:
        node.meta.pop(RESIDUAL_OUTPUT_META_KEY, None)
    for block in blocks:
        for node in residual_outputs_of(block):
            node.meta[RESIDUAL_OUTPUT_META_KEY] = True
    return PassResult(gm, False)
