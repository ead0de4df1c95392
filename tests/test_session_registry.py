"""One runtime, one registry (issue 24 items 1-2) and the lifetime of cache memory (issue 21 item 5).

* The per-block graphs' eager cache update is the whole-graph FX cache update
  (``passes/insert_cache_conds.py``) on random buffers, coefficients and statistics.
* Pools belong to their compiled module's session and die with it: compile the same module five
  times, run a generation each, delete them: every stream state is freed (the registry's
  live-state accounting), and the registry forgets the module.
* A pool keeps only the last generation's sizes, and its states count against ``max_cache_bytes``.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sc_compile
from sc_compile.backends.lowering import specialize_cache_conds
from sc_compile.contract import step_inputs
from sc_compile.memory import CacheMemoryError
from sc_compile.passes import run_cache_passes
from sc_compile.runtime.generations import sessions_of
from sc_compile.runtime.per_block import eager_update
from sc_compile.runtime.registry import LIVE_STREAM_STATES, REGISTRY
from sc_compile.runtime.state import StreamState

from dummy_dit import DummyBlock, DummyDiT

# 4 steps: a static interval, or the short-schedule rule would cache nothing.
EAGER = {"compiler": "eager", "warmup_steps": 2, "alpha": "ones", "static_interval": 2}
STEPS = (4.0, 3.0, 2.0, 1.0)


def _generation(compiled, tokens: int = 4, streams: int = 1) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=len(STEPS)):
        for t in STEPS:
            for stream in range(streams):
                hidden = torch.ones(1, tokens, 8) * (t + stream)
                outputs.append(compiled(hidden, torch.tensor([t])))
    return outputs


def _live_states() -> int:
    gc.collect()
    return len(LIVE_STREAM_STATES)


def _live_bytes() -> int:
    gc.collect()
    return REGISTRY.live_state_bytes()


# -- the eager update is the FX update ------------------------------------------------------------
def _capture(model: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, list[object]]:
    """Dynamo's graph of ``model`` and its inputs (in the graph's order)."""
    graphs: list[tuple[torch.fx.GraphModule, list[object]]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[object]):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    (captured,) = graphs
    return captured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_per_block_eager_update_equals_the_fx_cache_update(dtype):
    generator = torch.Generator().manual_seed(0)
    model = DummyDiT().to(dtype)
    hidden = torch.randn(1, 6, 8, generator=generator).to(dtype)
    timestep = torch.tensor([700.0], dtype=dtype)
    gm, model_inputs = _capture(model, hidden, timestep)
    cond_gm, layout = run_cache_passes(
        gm, model_class="DummyDiT", granularity="block", prediction="hidden", statistic="full"
    )
    full = specialize_cache_conds(cond_gm, full=True)
    points = layout.cache_points
    assert len(points) == 3 and all(p.sketch is None for p in points)
    state = StreamState(
        sc_compile.contract.PointLayout(points=list(points), device=torch.device("cpu"), fingerprint=""), None
    )
    for buffer in state.buffers:
        buffer.copy_(torch.randn(buffer.shape, generator=generator))
    state.stats.copy_(torch.randn(state.stats.shape, generator=generator))
    coef = torch.randn(len(points), generator=generator)
    refresh = torch.rand(len(points), generator=generator)
    before = [b.clone() for b in state.buffers]
    inputs = step_inputs(model_inputs, state.buffers, coef, refresh, state.stats)
    with torch.no_grad():
        full.graph_module(*[inputs[i] for i in full.input_indices])
    for p in range(len(points)):
        value = state.y_full(p).clone()  # the point's value this full step wrote
        y_full, dy = before[2 * p].clone(), before[2 * p + 1].clone()
        stats = torch.randn(state.stats.shape[1], generator=generator)
        eager_update(y_full, dy, stats, value, coef[p], refresh[p])
        exact = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(y_full, state.y_full(p), **exact)
        torch.testing.assert_close(dy, state.dy(p), **exact)
        torch.testing.assert_close(stats, state.stats[p], rtol=1e-5, atol=1e-5)
    # The update moved the buffers (the comparison is not between untouched tensors).
    assert not torch.equal(before[1], state.dy(0))


# -- lifetime ------------------------------------------------------------------------------------
class BlockWithBreak(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.gain * hidden_states
        torch._dynamo.graph_break()  # per-block graphs
        return hidden_states + temb * 0.0


_FIVE_COMPILES = """
import gc, sys, torch
sys.path.insert(0, {tests!r})
import sc_compile
from sc_compile.runtime.generations import sessions_of
from sc_compile.runtime.registry import LIVE_STREAM_STATES, REGISTRY
from test_session_registry import EAGER, BlockWithBreak, _generation, _live_states
from dummy_dit import DummyDiT

torch.set_num_threads(1)
model = DummyDiT()
if {per_block!r}:
    model.blocks[1] = BlockWithBreak(0.5)
for _ in range({compiles}):
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    _generation(compiled)
    report = sc_compile.report(model)
    assert report.cached_steps and report.finished, str(report)
    assert _live_states() > 0  # the pool keeps the finished generation's buffers for the next
    del compiled, report
torch._dynamo.reset()
print("live states", _live_states(), "sessions", len(sessions_of(model)))
del model
gc.collect()
print("registry", len(REGISTRY.sessions), len(REGISTRY.model_of_parameter), len(REGISTRY.holders))
"""


def _compile_and_delete(compiles: int, per_block: bool) -> str:
    """Run as a user's script runs (a fresh process: a test runner's own references to the last
    compiled frame would keep its compile alive)."""
    script = _FIVE_COMPILES.format(tests=str(Path(__file__).parent), per_block=per_block, compiles=compiles)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_five_compiles_of_one_module_free_every_stream_state():
    out = _compile_and_delete(5, per_block=False)
    # Every stream state freed; nothing of the module left in the registry (no entry keyed by
    # the id of a dead object).
    assert "live states 0 sessions 0" in out and "registry 0 0 0" in out, out


def test_per_block_graphs_free_their_stream_states_with_their_compile():
    out = _compile_and_delete(1, per_block=True)
    assert "live states 0 sessions 0" in out and "registry 0 0 0" in out, out
    # Dynamo serves the later compiles with the first compile's block graphs (equal backends) and
    # keeps a graph-break frame's compiled graph in its module's globals after reset(): the
    # session those graphs serve stays, with one generation's buffers (four units), not five.
    out = _compile_and_delete(5, per_block=True)
    assert "live states 4 sessions 1" in out, out


def test_the_pool_keeps_only_the_last_generations_size():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    for tokens in (4, 8, 12, 4):
        _generation(compiled, tokens=tokens)
        # One stream: one state pooled, of the size just run (before: one set per size).
        assert _live_states() == 1, tokens


def test_the_pool_counts_against_max_cache_bytes():
    model = DummyDiT()
    small = sc_compile.explain(model, torch.ones(1, 4, 8), torch.tensor([1.0])).buffer_bytes_per_stream
    large = sc_compile.explain(model, torch.ones(1, 8, 8), torch.tensor([1.0])).buffer_bytes_per_stream
    assert small < large
    limit = small + large - 1  # either size fits; the pooled large set and a small stream do not
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="scalingcache", options={**EAGER, "max_cache_bytes": limit})
    _generation(compiled, tokens=8)
    assert _live_bytes() == large  # pooled
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=len(STEPS)):
        compiled(torch.ones(1, 4, 8), torch.tensor([4.0]))
        # The pooled state was dropped rather than let the total exceed the limit.
        assert _live_bytes() == small <= limit
    # A generation whose own streams exceed the limit is refused before it allocates.
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=len(STEPS)):
        compiled(torch.ones(1, 8, 8), torch.tensor([4.0]))
        with pytest.raises(CacheMemoryError, match=r"stream 1 of this generation .* over the limit"):
            compiled(torch.ones(1, 8, 8) * 2, torch.tensor([4.0]))
    assert _live_bytes() <= limit


def test_reset_forgets_every_session():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=EAGER)
    _generation(compiled)
    assert sessions_of(model)
    sc_compile.runtime.registry.reset()
    assert sessions_of(model) == [] and _live_states() == 0
    with pytest.raises(RuntimeError, match="has not run under backend='scalingcache' yet"):
        sc_compile.report(model)
