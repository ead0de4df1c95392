"""Full steps keep every in-place op of Dynamo's graph; dead mutations still go from the cached step.

FX's DCE takes ``call_method`` nodes as pure, so an in-place method whose result nobody reads was
dropped by the lowering and the tensor it fills was read unfilled. Each kind of in-place op below
sits where diffusers models have them: a positional table filled by ``copy_`` in the patch
embedding, an attention mask by ``masked_fill_``, item assignment, a write through a view, and an
in-place add on a block's intermediate.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sc_compile
from sc_compile.passes.dead_code import eliminate_dead_code, mutated_inputs


class InplaceBlock(nn.Module):
    def __init__(self, width: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B, S, D], temb: [B, 1, D]
        update = self.proj(hidden_states + temb)
        if self.kind == "masked_fill_":
            mask = torch.zeros(hidden_states.shape[1], 1)
            mask.masked_fill_(torch.arange(hidden_states.shape[1]).unsqueeze(1) % 2 == 0, 1.0)
            update = update * mask
        elif self.kind == "setitem":
            scale = torch.ones(hidden_states.shape[1], 1)
            scale[0] = 0.25
            update = update * scale
        elif self.kind == "view_fill_":
            scale = torch.ones(hidden_states.shape[1], 1)
            scale.narrow(0, 1, 2).fill_(3.0)
            update = update * scale
        elif self.kind == "add_":
            update.add_(1.0)
        return hidden_states + 0.1 * update


class InplaceDiT(nn.Module):
    """A DiT whose glue and blocks use in-place ops whose results are never read."""

    def __init__(self, kind: str, width: int = 8):
        super().__init__()
        self.kind = kind
        self.pos = nn.Parameter(torch.randn(4, width))
        self.time = nn.Linear(1, width)
        self.blocks = nn.ModuleList(InplaceBlock(width, kind) for _ in range(2))
        self.head = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.kind == "copy_":
            # A positional table at a size other than the parameter's, filled in place.
            table = hidden_states.new_zeros(hidden_states.shape[1], hidden_states.shape[2])
            table.copy_(self.pos.repeat(hidden_states.shape[1] // 4, 1))
            hidden_states = hidden_states + table
        temb = self.time(timestep.reshape(-1, 1, 1))
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return self.head(hidden_states)


KINDS = ["copy_", "masked_fill_", "setitem", "view_fill_", "add_"]


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_steps_equal_eager(kind, compiler):
    torch.manual_seed(0)
    model = InplaceDiT(kind)
    latents = torch.randn(1, 8, 8)
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": compiler, "warmup_steps": 2, "alpha": "ones"}
    )
    with torch.no_grad():
        for step, t in enumerate((1.0, 0.9, 0.8, 0.7, 0.6)):
            timestep = torch.tensor([t])
            ours, reference = compiled(latents, timestep), model(latents, timestep)
            if step in sc_compile.report(model).full_steps:
                torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
            latents = latents - 0.05 * reference
    assert sc_compile.report(model).full_steps[:2] == (0, 1)


def test_cached_step_drops_a_mutation_only_the_blocks_read():
    """The positional table feeds the blocks only: the cached-step graph has no ``copy_`` of it."""
    explanation = sc_compile.explain(InplaceDiT("copy_"), torch.randn(1, 8, 8), torch.tensor([1.0]))
    assert ".copy_(" in explanation.full_step_graph
    assert ".copy_(" not in explanation.cached_step_graph
    assert "repeat" not in explanation.cached_step_graph


def test_mutation_without_aliasing_information_is_kept():
    def fn(x):
        t = torch.zeros_like(x)
        t.fill_(2.0)  # result unused; t is never read afterwards either
        return x + 1

    # symbolic_trace records no fake tensors: aliasing is unknown, so every mutation must stay.
    gm = torch.fx.symbolic_trace(fn)
    eliminate_dead_code(gm.graph)
    assert any(n.target == "fill_" for n in gm.graph.nodes)
    torch.fx.Graph.eliminate_dead_code(gm.graph)
    assert not any(n.target == "fill_" for n in gm.graph.nodes), "FX's own DCE drops it (the bug)"


def test_dead_mutation_with_aliasing_information_is_removed():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def fn(x):
        t = torch.zeros_like(x)
        t.fill_(2.0)
        u = torch.zeros_like(x)
        u.narrow(0, 0, 1).fill_(5.0)  # through a view: u is read below
        return x + u

    gm = torch.fx.symbolic_trace(fn)
    FakeTensorProp(gm, FakeTensorMode()).propagate(torch.ones(3))
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.get("val")
    eliminate_dead_code(gm.graph)
    gm.recompile()
    fills = [n for n in gm.graph.nodes if n.target == "fill_"]
    assert len(fills) == 1 and fills[0].args[1] == 5.0
    torch.testing.assert_close(gm(torch.ones(3)), fn(torch.ones(3)))


def test_mutated_inputs_kinds():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    nodes = [
        graph.call_method("copy_", (x, y)),
        graph.call_function(torch.ops.aten.add_.Tensor, (x, y)),
        graph.call_function(torch.add, (x, y), {"out": y}),
        graph.call_function(__import__("operator").setitem, (x, 0, y)),
        graph.call_function(torch.Tensor.mul_, (x, 2.0)),
        graph.call_method("add", (x, y)),
    ]
    assert [mutated_inputs(n) for n in nodes] == [[x], [x], [y], [x], [x], []]
