"""Dead-code elimination that keeps every mutation a live value can observe.

``torch.fx.Graph.eliminate_dead_code`` treats every ``call_method`` as pure, so an in-place method
whose result nobody reads (``table.copy_(x)``, ``mask.masked_fill_(m, v)`` on a fresh tensor, as a
patch embedding or an attention mask builds them) is dropped, and the tensor it should have filled
is read unfilled: a full step that silently differs from eager. The specialised graphs need DCE
(the cached-step graph is cheap only because the blocks and embedders go), so this one decides
each mutation by what can see it.

A node that writes into a tensor ``m`` (an in-place method or ``Tensor`` function whose name ends
in ``_``, ``operator.setitem``, an operator with a mutable schema, an ``out=`` argument) is live if
``m`` shares storage with a graph input or attribute (a side effect outside the graph), or if some
live node after it reads any tensor of ``m``'s storage. Storage sharing comes from the fake
tensors Dynamo recorded in ``node.meta["example_value"]``, which keep the aliasing of views. A
mutation whose storage is unknown is kept. Every other node follows ``Node.is_impure`` and its
users, as in FX's own DCE.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

_INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def mutated_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph values ``node`` writes into (empty for a node that mutates nothing)."""
    mutated: list[torch.fx.Node] = []
    out = node.kwargs.get("out")
    if isinstance(out, torch.fx.Node):
        mutated.append(out)
    elif isinstance(out, tuple | list):
        mutated.extend(o for o in out if isinstance(o, torch.fx.Node))
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_method" and isinstance(node.target, str) and _is_inplace_name(node.target):
        mutated.extend([first] if first is not None else [])
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket):
            target = getattr(target, "default", target)
        if isinstance(target, torch._ops.OpOverload):
            for argument, value in zip(target._schema.arguments, node.args, strict=False):
                if (
                    argument.alias_info is not None
                    and argument.alias_info.is_write
                    and isinstance(value, torch.fx.Node)
                ):
                    mutated.append(value)
            for argument in target._schema.arguments:
                value = node.kwargs.get(argument.name)
                if (
                    argument.alias_info is not None
                    and argument.alias_info.is_write
                    and isinstance(value, torch.fx.Node)
                ):
                    mutated.append(value)
        elif target in _INPLACE_OPERATORS or (
            getattr(target, "__objclass__", None) is torch._C.TensorBase
            and _is_inplace_name(getattr(target, "__name__", ""))
        ):
            mutated.extend([first] if first is not None else [])
    return list(dict.fromkeys(mutated))


def _storage_key(node: torch.fx.Node) -> Hashable | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):
        # Tensors without storage (some subclasses): their aliasing is unknown.
        return None


def eliminate_dead_code(graph: torch.fx.Graph) -> bool:
    """Remove the nodes whose values and side effects no live node can observe.

    Placeholders are kept (the caller prunes unused inputs). Returns whether anything was removed.
    """
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    by_storage: dict[Hashable, list[torch.fx.Node]] = {}
    keys: dict[torch.fx.Node, Hashable | None] = {}
    for node in nodes:
        key = keys[node] = _storage_key(node)
        if key is not None:
            by_storage.setdefault(key, []).append(node)

    live: set[torch.fx.Node] = set()

    def mutation_is_observed(node: torch.fx.Node, targets: list[torch.fx.Node]) -> bool:
        for target in targets:
            key = keys.get(target)
            if key is None:
                return True  # aliasing unknown: keep the write
            family = by_storage[key]
            if any(member.op in ("placeholder", "get_attr") for member in family):
                return True  # a graph input or attribute: visible outside the graph
            for member in family:
                for reader in (member, *member.users):
                    if reader is not node and position[reader] > position[node] and reader in live:
                        return True
        return False

    for node in reversed(nodes):
        if node.op in ("placeholder", "output"):
            live.add(node)
            continue
        if any(user in live for user in node.users):
            live.add(node)
            continue
        targets = mutated_inputs(node)
        if targets:
            if mutation_is_observed(node, targets):
                live.add(node)
        elif node.is_impure():
            live.add(node)
    removed = False
    for node in reversed(nodes):
        if node not in live:
            graph.erase_node(node)
            removed = True
    return removed
