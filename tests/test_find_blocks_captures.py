"""find_blocks on small Dynamo graphs: what it must and must not take as blocks and block inputs."""

from __future__ import annotations

import operator

import torch
from torch import nn

from sc_compile.passes.find_blocks import find_blocks
from sc_compile.passes.layout import blocks_of
from sc_compile.passes.pass_manager import copy_graph_module


def _capture(model: nn.Module, *calls: tuple) -> torch.fx.GraphModule:
    """The last graph Dynamo traces for ``model`` over ``calls``."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for args in calls:
            compiled(*args)
    return copy_graph_module(graphs[-1])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return x + scale * self.proj(self.norm(x))


class Model(nn.Module):
    def __init__(self, head_reuses_block: bool = False) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head_reuses_block = head_reuses_block

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, scale * 0.5)
        if self.head_reuses_block:
            x = self.blocks[0].norm(x)  # a later call of a block's submodule
        return x * 2.0


def _blocks(gm: torch.fx.GraphModule):
    find_blocks(gm, "Model")
    return blocks_of(gm)


def test_a_float_input_is_recomputed_inside_each_block_that_reads_it():
    x = torch.randn(1, 4, 8)
    gm = _capture(Model(), (x, 1.0), (x, 0.5))  # the second value makes the float a graph input
    items = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert len(items) == 1  # Dynamo reads the 0-d tensor once, before the blocks
    blocks = _blocks(gm)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]
    for block in blocks:
        assert all(isinstance(i.meta["example_value"], torch.Tensor) for i in block.inputs)
        recomputed = [m for m in block.members if m.op == "call_method" and m.target == "item"]
        assert len(recomputed) == 1 and recomputed[0].args[0].op == "placeholder"
        assert any(m.target is operator.mul and recomputed[0] in m.args for m in block.members)
    # The copy outside the blocks had no other reader and is gone.
    assert sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "item") == 2


def test_a_specialised_float_adds_nothing_to_the_blocks():
    gm = _capture(Model(), (torch.randn(1, 4, 8), 1.0))
    blocks = _blocks(gm)
    assert not any(n.op == "call_method" and n.target == "item" for n in gm.graph.nodes)
    assert all(isinstance(i.meta["example_value"], torch.Tensor) for b in blocks for i in b.inputs)


def test_a_numbered_sequential_of_layers_is_not_a_block_group():
    blocks = _blocks(_capture(Model(), (torch.randn(1, 4, 8), 1.0)))
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]  # not embed.0 / embed.2


def test_torch_nn_blocks_are_blocks():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True) for _ in range(2)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    blocks = _blocks(_capture(Encoder().eval(), (torch.randn(1, 4, 8),)))
    assert [b.name for b in blocks] == ["layers.0", "layers.1"]


def test_a_later_call_of_a_block_submodule_stays_outside_the_block():
    gm = _capture(Model(head_reuses_block=True), (torch.randn(1, 4, 8), 1.0))
    blocks = _blocks(gm)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_of_second = min(order[m] for m in blocks[1].members)
    assert all(order[m] < first_of_second for m in blocks[0].members)
    # The head's layer norm is still in the graph, after the last block, in no block.
    members = {m for b in blocks for m in b.members}
    late_norms = [n for n in gm.graph.nodes if "layer_norm" in str(n.target) and n not in members]
    assert late_norms and all(order[n] > max(order[m] for m in blocks[1].members) for n in late_norms)
