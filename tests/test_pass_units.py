"""Each pass on a small hand-built graph: the ops and marks it must leave, the case where it must
not fire, and the pass manager naming a pass that fails.

The graphs come from ``torch.fx`` tracing of tiny modules (every ``nn`` module traced through, so
``nn_module_stack`` names the owning module of each node as Dynamo's does) with fake values
propagated; no diffusers model, no Dynamo, no compilation.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.infra.pass_base import PassResult

import sc_compile.contract
from sc_compile.backends.lowering import specialize_cache_conds
from sc_compile.contract import COEF, REFRESH, STAT_COLUMNS, STATS, state_input_names, step_inputs
from sc_compile.passes.choose_cache_points import choose_cache_points
from sc_compile.passes.find_blocks import NoBlocksFoundError, UnsupportedGraphError, find_blocks
from sc_compile.passes.find_residual_outputs import find_residual_outputs
from sc_compile.passes.find_timestep_input import (
    TIMESTEP_INPUTS,
    find_timestep_input,
    mark_timestep_input,
    register_timestep_input,
)
from sc_compile.passes.insert_cache_conds import UNPREDICTED_META_KEY, insert_cache_conds
from sc_compile.passes.layout import (
    BLOCK_META_KEY,
    CACHE_POINT_META_KEY,
    POINT_SPEC_META_KEY,
    RESIDUAL_OUTPUT_META_KEY,
    TIMESTEP_META_KEY,
    blocks_of,
)
from sc_compile.passes.pass_manager import (
    CACHE_PASSES,
    PassFailedError,
    analysis_passes,
    run_cache_passes,
    run_passes,
)


# -- tiny models ----------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """Two residual modules on one stream: ``x + a(x)`` then ``x + temb * b(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = x + self.a(x)
        return x + temb * self.b(x)


class ParallelBlock(nn.Module):
    """An add of two branches of the block input: no operand is the other's skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) * temb


class TinyDiT(nn.Module):
    def __init__(self, block: type[nn.Module] = ResidualBlock, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 4)
        self.blocks = nn.ModuleList(block() for _ in range(depth))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        # x: [B, S, 4], timestep: [B]
        temb = self.embed(timestep.reshape(-1, 1)).unsqueeze(1)  # [B, 1, 4]
        for block in self.blocks:
            x = block(x, temb)
        return x * 2.0


class NoBlocks(nn.Module):
    """A numbered group of single layers (a projection), not of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 4))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * timestep


class _TraceThrough(torch.fx.Tracer):
    """Trace into every module, as Dynamo does (no call_module nodes)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return False


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])


def _graph(model: nn.Module, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` traced, with the fake value of every node in ``node.meta``."""
    gm = torch.fx.GraphModule(model, _TraceThrough().trace(model))
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*(inputs or _inputs()))
    return gm


def _calls(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _analysed(model: nn.Module, granularity: str = "block") -> torch.fx.GraphModule:
    return run_passes(_graph(model), analysis_passes("TinyDiT", granularity), model_class="TinyDiT")


# -- find_blocks ----------------------------------------------------------------------------------
def test_find_blocks_marks_the_members_of_each_block_and_nothing_else():
    gm = _graph(TinyDiT())
    result = find_blocks(gm, model_class="TinyDiT")
    assert isinstance(result, PassResult) and result.graph_module is gm
    blocks = blocks_of(gm)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]
    marked = {n.name: n.meta[BLOCK_META_KEY] for n in gm.graph.nodes if BLOCK_META_KEY in n.meta}
    # The embedder, the head and the parameters (hoisted: they become block inputs) are not members.
    assert {"linear", "unsqueeze", "mul_2", "blocks_0_a_weight"}.isdisjoint(marked)
    assert marked["linear_1"] == "blocks.0" and marked["linear_3"] == "blocks.1"
    # Each block's one output is its last add; the second block reads the first one's.
    assert [n.name for n in blocks[0].outputs] == ["add_1"]
    assert [n.name for n in blocks[1].outputs] == ["add_3"]
    assert blocks[0].outputs[0] in blocks[1].inputs
    assert "sc_compile.layout" not in gm.meta and not any(isinstance(v, torch.fx.Node) for v in gm.meta.values())


def test_find_blocks_refuses_a_model_without_blocks():
    with pytest.raises(NoBlocksFoundError, match=r"NoBlocks: found no transformer blocks"):
        find_blocks(_graph(NoBlocks()), model_class="NoBlocks")


def test_find_blocks_clears_the_marks_of_an_earlier_run():
    gm = _graph(TinyDiT())
    stale = next(n for n in gm.graph.nodes if n.name == "mul_2")  # the output head
    stale.meta[BLOCK_META_KEY] = "blocks.7"
    find_blocks(gm, model_class="TinyDiT")
    assert BLOCK_META_KEY not in stale.meta
    assert [b.name for b in blocks_of(gm)] == ["blocks.0", "blocks.1"]


# -- find_residual_outputs ------------------------------------------------------------------------
def test_find_residual_outputs_marks_the_residual_adds():
    gm = _graph(TinyDiT())
    find_blocks(gm, model_class="TinyDiT")
    assert find_residual_outputs(gm).modified is False
    marked = [n.name for n in gm.graph.nodes if n.meta.get(RESIDUAL_OUTPUT_META_KEY)]
    assert marked == ["add", "add_1", "add_2", "add_3"]
    assert [[n.name for n in b.residual_outputs] for b in blocks_of(gm)] == [["add", "add_1"], ["add_2", "add_3"]]


def test_find_residual_outputs_does_not_take_an_add_of_two_branches():
    gm = _graph(TinyDiT(ParallelBlock))
    find_blocks(gm, model_class="TinyDiT")
    find_residual_outputs(gm)
    adds = [n for n in gm.graph.nodes if n.target is operator.add]
    assert len(adds) == 2  # one per block, both block outputs
    assert not any(n.meta.get(RESIDUAL_OUTPUT_META_KEY) for n in gm.graph.nodes)


# -- choose_cache_points --------------------------------------------------------------------------
def test_choose_cache_points_block_granularity_takes_the_block_outputs():
    gm = _analysed(TinyDiT(), "block")
    assert [n.name for n in gm.graph.nodes if n.meta.get(CACHE_POINT_META_KEY)] == ["add_1", "add_3"]


def test_choose_cache_points_module_granularity_takes_every_residual_output():
    gm = _analysed(TinyDiT(), "module")
    assert [n.name for n in gm.graph.nodes if n.meta.get(CACHE_POINT_META_KEY)] == ["add", "add_1", "add_2", "add_3"]


def test_choose_cache_points_module_granularity_keeps_an_output_without_residual_adds():
    gm = _analysed(TinyDiT(ParallelBlock), "module")
    assert [[n.name for n in b.cache_points] for b in blocks_of(gm)] == [["add"], ["add_1"]]


def test_choose_cache_points_refuses_an_unknown_granularity():
    gm = _graph(TinyDiT())
    find_blocks(gm, model_class="TinyDiT")
    with pytest.raises(ValueError, match="granularity must be 'block' or 'module', but got 'layer'"):
        choose_cache_points(gm, granularity="layer")


# -- find_timestep_input --------------------------------------------------------------------------
class _Inputs(nn.Module):
    """A model whose inputs are only named: which one is the timestep?"""

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, noise_level: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        return x * (t.sum() + noise_level + timestep)


def _named_inputs(t_elements: int = 1) -> torch.fx.GraphModule:
    return _graph(_Inputs(), torch.ones(2, 4), torch.ones(t_elements), torch.ones(1), torch.ones(1))


def test_timestep_is_found_by_the_generic_rule():
    assert find_timestep_input(_named_inputs(), "_Inputs") == 1  # ``t``, the first generic name
    # A large input is no timestep, whatever its name.
    assert find_timestep_input(_named_inputs(t_elements=8192), "_Inputs") == 3


def test_timestep_is_found_by_the_registered_name(monkeypatch):
    monkeypatch.setitem(TIMESTEP_INPUTS, "_Inputs", TIMESTEP_INPUTS["FluxTransformer2DModel"])
    assert find_timestep_input(_named_inputs(), "_Inputs") == 3  # ``timestep``, not the earlier ``t``
    register_timestep_input("_Inputs", ["Noise_Level"])
    assert find_timestep_input(_named_inputs(), "_Inputs") == 2
    assert TIMESTEP_INPUTS["ZImageTransformer2DModel"].names == ("t",)


def test_the_timestep_pass_marks_the_input_and_refuses_a_graph_without_one():
    gm = _graph(TinyDiT())
    assert mark_timestep_input(gm, model_class="TinyDiT").modified is False
    assert [n.name for n in gm.graph.nodes if n.meta.get(TIMESTEP_META_KEY)] == ["timestep"]

    no_timestep = _graph(NoBlocks(), torch.ones(1, 3, 4), torch.ones(1))
    no_timestep.graph.find_nodes(op="placeholder")[1].name = "scale"
    with pytest.raises(
        UnsupportedGraphError,
        match=r"NoBlocks: could not find the timestep input among the graph inputs \['x', 'scale'",
    ):
        mark_timestep_input(no_timestep, model_class="NoBlocks")
    # Not required (a piece of a split forward after a break): nothing is marked, nothing raised.
    assert mark_timestep_input(no_timestep, model_class="NoBlocks", required=False).modified is False
    assert not any(n.meta.get(TIMESTEP_META_KEY) for n in no_timestep.graph.nodes)


# -- insert_cache_conds ---------------------------------------------------------------------------
def test_insert_cache_conds_puts_each_block_under_a_cond_over_the_state_inputs():
    gm = _analysed(TinyDiT())
    linears_before = len(_calls(gm, torch._C._nn.linear))
    result = insert_cache_conds(gm, statistic="full")
    assert result.modified is True
    conds = _calls(gm, torch.ops.higher_order.cond)
    assert len(conds) == 2
    # The blocks' linears moved into the branches; only the embedder's is left outside.
    assert linears_before == 5 and len(_calls(gm, torch._C._nn.linear)) == 1
    for cond in conds:
        full_branch = getattr(gm, cond.args[1].target)
        cached_branch = getattr(gm, cond.args[2].target)
        assert len(_calls(full_branch, torch._C._nn.linear)) == 2
        assert len(_calls(full_branch, torch.ops.aten.copy_.default)) == 3  # stats row, dy, y_full
        assert not _calls(cached_branch, torch._C._nn.linear)  # the prediction runs no block
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["x", "timestep", *state_input_names(2)]
    stats = next(n for n in placeholders if n.name == STATS)
    assert tuple(stats.meta["val"].shape) == (2, len(STAT_COLUMNS))
    specs = [n.meta[POINT_SPEC_META_KEY] for n in placeholders if POINT_SPEC_META_KEY in n.meta]
    assert [(s.index, s.block, s.node_name, s.shape, s.feeds_output, s.sketch) for s in specs] == [
        (0, "blocks.0", "add_1", (1, 3, 4), False, None),
        (1, "blocks.1", "add_3", (1, 3, 4), True, None),
    ]
    # The analyses' marks are consumed, on the graph and in the branches.
    marks = (BLOCK_META_KEY, RESIDUAL_OUTPUT_META_KEY, CACHE_POINT_META_KEY)
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            assert not [n for n in module.graph.nodes if any(k in n.meta for k in marks)]


def test_a_sketched_point_predicts_a_stand_in_that_no_cached_step_keeps(monkeypatch):
    monkeypatch.setattr(sc_compile.contract, "MIN_SKETCH_ELEMENTS", 2)
    cond_gm, layout = run_cache_passes(_graph(TinyDiT()), model_class="TinyDiT")
    first, last = layout.cache_points
    assert first.sketch is not None and not first.feeds_output  # only the head reads the last block
    assert last.sketch is None and last.feeds_output
    stand_ins = {
        name: [n.meta[UNPREDICTED_META_KEY] for n in sub.graph.nodes if UNPREDICTED_META_KEY in n.meta]
        for name, sub in cond_gm.named_children()
        if name.startswith("sc_")
    }
    assert stand_ins == {
        "sc_full_blocks_0": [],
        "sc_cached_blocks_0": [0],
        "sc_full_blocks_1": [],
        "sc_cached_blocks_1": [],
    }
    cached = specialize_cache_conds(cond_gm, full=False).graph_module
    assert not [n for n in cached.graph.nodes if UNPREDICTED_META_KEY in n.meta]


def test_insert_cache_conds_does_not_fire_on_a_graph_without_marked_blocks():
    gm = _graph(TinyDiT())
    code_before = gm.code
    with pytest.raises(RuntimeError, match="no cache point is marked"):
        insert_cache_conds(gm)
    assert gm.code == code_before and not _calls(gm, torch.ops.higher_order.cond)


def test_the_rewritten_graph_computes_the_model_and_predicts_from_the_buffers():
    model, (x, timestep) = TinyDiT(), _inputs()
    cond_gm, layout = run_cache_passes(_graph(model), model_class="TinyDiT", statistic="full", require_timestep=True)
    assert layout.timestep_index == 1 and layout.block_names == ("blocks.0", "blocks.1")
    buffers = [torch.zeros(1, 3, 4) for _ in range(4)]  # y_full, dy per point
    coef, refresh, stats = torch.zeros(2), torch.ones(2), torch.zeros(2, len(STAT_COLUMNS))
    inputs = step_inputs([x, timestep], buffers, coef, refresh, stats)
    full = specialize_cache_conds(cond_gm, full=True)
    with torch.no_grad():
        out = full.graph_module(*[inputs[i] for i in full.input_indices])
        expected = model(x, timestep)
        torch.testing.assert_close(out, expected)
        # y_full of the last point is the last block's output; dy its change over zero buffers.
        torch.testing.assert_close(buffers[2] * 2.0, expected)
        torch.testing.assert_close(buffers[3], buffers[2])
        coef.fill_(0.5)
        cached = specialize_cache_conds(cond_gm, full=False)
        predicted = cached.graph_module(*[inputs[i] for i in cached.input_indices])
    torch.testing.assert_close(predicted, (buffers[2] + 0.5 * buffers[3]) * 2.0)
    assert not _calls(cached.graph_module, torch._C._nn.linear)  # no block, no embedder: the head alone


# -- the pass manager -----------------------------------------------------------------------------
def test_the_pass_manager_names_a_failing_pass_and_the_passes_before_it():
    def broken(gm: torch.fx.GraphModule) -> PassResult:
        raise KeyError("no such node")

    passes = (*analysis_passes("TinyDiT", "block"), ("broken", broken))
    expected = (
        r"TinyDiT: pass 'broken' failed after \['find_blocks', 'find_residual_outputs', 'choose_cache_points'\]: "
        r"'no such node'"
    )
    with pytest.raises(PassFailedError, match=expected):
        run_passes(_graph(TinyDiT()), passes, model_class="TinyDiT")


def test_the_pass_manager_names_a_pass_that_leaves_a_broken_graph():
    def dangling(gm: torch.fx.GraphModule) -> PassResult:
        head = next(n for n in gm.graph.nodes if n.name == "mul_2")
        with gm.graph.inserting_before(head):
            new = gm.graph.call_function(operator.neg, (head,))  # reads a value defined after it
        head.replace_input_with(head.args[0], new)
        return PassResult(gm, True)

    with pytest.raises(PassFailedError, match=r"pass 'dangling' failed after no passes"):
        run_passes(_graph(TinyDiT()), (("dangling", dangling),), model_class="TinyDiT")


def test_user_facing_errors_pass_through_unwrapped():
    with pytest.raises(NoBlocksFoundError):
        run_passes(_graph(NoBlocks()), analysis_passes("NoBlocks", "block"), model_class="NoBlocks")


def test_the_pass_manager_cleans_up_after_a_structural_pass_keeping_mutations():
    def add_dead_code(gm: torch.fx.GraphModule) -> PassResult:
        x, head = next(iter(gm.graph.nodes)), gm.graph.output_node()
        with gm.graph.inserting_before(head):
            gm.graph.call_function(torch.neg, (x,))  # dead
            gm.graph.call_function(torch.ops.aten.copy_.default, (x, x))  # writes a graph input
        return PassResult(gm, True)

    gm = run_passes(_graph(TinyDiT()), (("add_dead_code", add_dead_code),), model_class="TinyDiT")
    assert not _calls(gm, torch.neg)
    assert len(_calls(gm, torch.ops.aten.copy_.default)) == 1
    assert "torch.ops.aten.copy_.default" in gm.code  # recompiled


def test_the_cache_passes_leave_no_node_in_gm_meta_and_a_node_free_layout():
    gm = _graph(TinyDiT())
    gm.meta["from_dynamo"] = 1
    cond_gm, layout = run_cache_passes(gm, model_class="TinyDiT", granularity="module")
    assert CACHE_PASSES == (
        "find_blocks",
        "find_residual_outputs",
        "choose_cache_points",
        "find_timestep_input",
        "insert_cache_conds",
    )
    assert cond_gm.meta == {"from_dynamo": 1}
    assert [p.node_name for p in layout.cache_points] == ["add", "add_1", "add_2", "add_3"]
    assert layout.granularity == "module" and layout.device == torch.device("cpu")
    assert not any(isinstance(getattr(layout, f), torch.fx.Node) for f in layout.__dataclass_fields__)
    assert {COEF, REFRESH} <= {n.name for n in cond_gm.graph.nodes if n.op == "placeholder"}
