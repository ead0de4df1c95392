"""Lowering: specialise the cond-guarded graph into a full-step and a cached-step graph.

Inductor could lower ``torch.cond`` itself, but on CPU and CUDA that becomes a host ``pred.item()``
with the branches outside CUDA graphs, keeps the embedders in the cached step, and on Wan meets a
stride bug in ``ir.Conditional``. So the predicate is fixed before Inductor: every cond is replaced
by the inlined body of one branch, dead code is eliminated (the cached-step graph loses the blocks,
embedders and text projections no output needs) while every mutation a live value can observe is
kept (``dead_code.py``), and unused inputs are pruned. Each graph records
which of the cond graph's inputs it takes.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from sc_compile.contract import IS_FULL
from sc_compile.passes.dead_code import eliminate_dead_code
from sc_compile.passes.insert_cache_conds import UNPREDICTED_META_KEY
from sc_compile.passes.pass_manager import copy_graph_module


@dataclasses.dataclass
class SpecializedGraph:
    """A graph with the predicate fixed, and the positions it reads in
    :func:`sc_compile.contract.step_inputs` (the cond graph's inputs without ``sc_is_full``)."""

    graph_module: torch.fx.GraphModule
    input_indices: list[int]

    @property
    def num_compute_nodes(self) -> int:
        return sum(1 for n in self.graph_module.graph.nodes if n.op in ("call_function", "call_method"))


def _inline_cond(gm: torch.fx.GraphModule, cond: torch.fx.Node, take_full: bool) -> None:
    graph = gm.graph
    _, true_attr, false_attr, operands = cond.args
    assert isinstance(true_attr, torch.fx.Node) and isinstance(false_attr, torch.fx.Node)
    assert isinstance(operands, tuple | list)
    branch_attr = true_attr if take_full else false_attr
    branch: torch.fx.GraphModule = getattr(gm, str(branch_attr.target))
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in branch.graph.nodes if n.op == "placeholder"]
    for placeholder, operand in zip(placeholders, operands, strict=True):
        env[placeholder] = operand
    results: tuple = ()
    with graph.inserting_before(cond):
        for node in branch.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                outputs = node.args[0]
                assert isinstance(outputs, tuple | list)
                results = tuple(env[r] for r in outputs)  # type: ignore[index]
                continue
            env[node] = graph.node_copy(node, lambda n: env[n])
    for user in list(cond.users):
        assert user.op == "call_function" and user.target is operator.getitem, user
        index = user.args[1]
        assert isinstance(index, int)
        user.replace_all_uses_with(results[index])
        graph.erase_node(user)
    graph.erase_node(cond)
    for attr in (true_attr, false_attr):
        if not attr.users:
            graph.erase_node(attr)


def specialize_cache_conds(cond_gm: torch.fx.GraphModule, *, full: bool) -> SpecializedGraph:
    """The full-step (``full=True``) or cached-step graph of a cond-guarded graph."""
    gm = copy_graph_module(cond_gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.higher_order.cond:
            _inline_cond(gm, node, full)
    # FX's own DCE drops in-place methods whose result is unused (it takes call_method as pure).
    eliminate_dead_code(gm.graph)
    # Indices into sc_compile.contract.step_inputs: every placeholder but sc_is_full, in order.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept: list[int] = []
    for index, node in enumerate(n for n in placeholders if n.name != IS_FULL):
        if node.users:
            kept.append(index)
        else:
            gm.graph.erase_node(node)
    for node in placeholders:
        if node.name == IS_FULL:
            assert not node.users, "the predicate is fixed: nothing reads sc_is_full"
            gm.graph.erase_node(node)
    unpredicted = sorted({n.meta[UNPREDICTED_META_KEY] for n in gm.graph.nodes if UNPREDICTED_META_KEY in n.meta})
    if unpredicted:
        # The pass sketches only points no cached step reads; reaching here is a bug of ours.
        raise RuntimeError(
            f"the cached-step graph reads cache point(s) {unpredicted}, whose buffers hold only a sketch: "
            "please report this; options={'statistic': 'full'} keeps full buffers for every point"
        )
    # The branch submodules are no longer referenced (other attributes may be: a graph traced
    # without lifting parameters reads them through get_attr).
    referenced = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_children()):
        if name not in referenced:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return SpecializedGraph(gm, kept)
