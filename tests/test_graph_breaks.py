"""A forward that Dynamo splits at graph breaks is cached across its graphs.

Dynamo compiles the model's forward as several graphs when it breaks between blocks or before the
output head and resumes in the same forward. Every graph that holds blocks is cached; all of them
run in the step and stream the forward's first graph was placed in, and take one full-or-cached
verdict per step (the graph whose blocks feed the output decides). The dummy DiT has exact
arithmetic: with ``hidden_states = s_t * ones`` and ``s_t`` linear in the step, α = 1 predicts every
cache point exactly, so cached steps must equal eager too.
"""

from __future__ import annotations

import pytest
import torch

import sc_compile
from sc_compile.clock.step_clock import ClockError
from sc_compile.runtime.dispatch import UncacheableSplitError, runtimes_of

from dummy_dit import DummyBlock, DummyDiT, NotADiT

STEPS = 8
# After the warm-up (steps 0, 1), every third step is full: 2, 5 full; 3, 4, 6, 7 cached.
OPTIONS = {"compiler": "eager", "warmup_steps": 2, "static_interval": 3}
EXPECTED_FULL = (0, 1, 2, 5)


class BreakBeforeHead(DummyDiT):
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        torch._dynamo.graph_break()
        return hidden_states * 2.0


class BreakBetweenBlocks(DummyDiT):
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        hidden_states = self.blocks[0](hidden_states, temb)
        torch._dynamo.graph_break()
        for block in self.blocks[1:]:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2.0


class TwoBreaks(DummyDiT):
    """Three pieces: block 0; block 1 (resumes, breaks again); block 2 and the head."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        hidden_states = self.blocks[0](hidden_states, temb)
        torch._dynamo.graph_break()
        hidden_states = self.blocks[1](hidden_states, temb)
        torch._dynamo.graph_break()
        hidden_states = self.blocks[2](hidden_states, temb)
        return hidden_states * 2.0


class BreakBeforeTimestep(DummyDiT):
    """The first graph holds no block; the blocks' graph reads the timestep itself."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states * 1.0
        torch._dynamo.graph_break()
        temb = (timestep * 1.0).reshape(-1, 1, 1)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2.0


class BreakAfterTimestepEmbedding(DummyDiT):
    """The first graph embeds the timestep and holds no block; the blocks' graph never sees the timestep."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = (timestep * 1.0).reshape(-1, 1, 1)
        torch._dynamo.graph_break()
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2.0


class SplitWithoutBlocks(NotADiT):
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        torch._dynamo.graph_break()
        return hidden_states * timestep.reshape(-1, 1, 1)


def _generation(model, compiled, streams=(1.0,)):
    """``STEPS`` steps, one call per stream per step; returns [(ours, eager)] per step and stream."""
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            timestep = torch.tensor([1000.0 - 100.0 * step])
            for scale in streams:
                hidden = torch.ones(1, 4, 8) * scale * (STEPS - step)
                outputs.append((step, compiled(hidden, timestep), model(hidden, timestep)))
    return outputs


@pytest.mark.parametrize("model_class", [BreakBeforeHead, BreakBetweenBlocks, TwoBreaks])
def test_split_forward_caches_and_every_step_equals_eager(model_class):
    model = model_class()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = _generation(model, compiled)
    report = sc_compile.report(model)
    assert report.num_steps == STEPS and report.full_steps == EXPECTED_FULL, str(report)
    for _, ours, eager in outputs:
        # Full steps are the real computation; cached ones the exact α = 1 extrapolation.
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)
    cached_pieces = [r for r in runtimes_of(model)]
    expected_pieces = {BreakBeforeHead: 1, BreakBetweenBlocks: 2, TwoBreaks: 3}[model_class]
    assert len(cached_pieces) == expected_pieces
    for runtime in cached_pieces:
        # Every graph with blocks skipped them at the same steps: one verdict per step.
        assert (runtime.num_full_calls, runtime.num_cached_calls) == (len(EXPECTED_FULL), STEPS - len(EXPECTED_FULL))


def test_a_cached_step_predicts_where_the_output_is_made_not_from_the_inputs():
    """At a cached step the graph after the break ignores what the graph before it returned: a
    wrong value there (the first piece's input is garbage) leaves the output unchanged."""
    model = BreakBetweenBlocks()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with torch.no_grad():
        for step in range(4):
            hidden = torch.ones(1, 4, 8) * (STEPS - step)
            timestep = torch.tensor([1000.0 - 100.0 * step])
            expected = model(hidden, timestep)
            ours = compiled(hidden if step != 3 else torch.full_like(hidden, 1e6), timestep)
    assert sc_compile.report(model).cached_steps == (3,)
    torch.testing.assert_close(ours, expected)


def test_guidance_streams_of_a_split_forward_stay_apart():
    model = BreakBetweenBlocks()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = _generation(model, compiled, streams=(1.0, -0.5))
    report = sc_compile.report(model)
    assert len(report.streams) == 2 and report.full_steps == EXPECTED_FULL, str(report)
    for _, ours, eager in outputs:
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_dynamic_rule_on_a_split_forward_decides_once_per_step():
    model = BreakBeforeHead()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    with torch.no_grad():
        for step in range(12):
            compiled(torch.ones(1, 4, 8) * (1.0 + 0.01 * step), torch.tensor([1000.0 - 50.0 * step]))
    report = sc_compile.report(model)
    assert report.cached_steps, str(report)
    # ē comes from the graph that feeds the output (measured at full steps after the first).
    assert report.streams[0].changes[1] is not None, str(report)


def test_a_first_piece_without_blocks_runs_as_it_is_and_the_blocks_piece_places_the_step():
    model = BreakBeforeTimestep()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = _generation(model, compiled)
    assert sc_compile.report(model).full_steps == EXPECTED_FULL
    for _, ours, eager in outputs:
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)
    assert len(runtimes_of(model)) == 1


def test_a_blocks_piece_that_cannot_see_the_timestep_names_the_explicit_clock():
    model = BreakAfterTimestepEmbedding()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with pytest.raises(ClockError, match=r"does not receive the timestep.*sc_compile.enable\(pipe\)"), torch.no_grad():
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))


def test_a_blocks_piece_without_the_timestep_is_placed_by_the_declared_step_count():
    """Inside ``sc_compile.generation(..., num_inference_steps=N)`` each forward is the next step."""
    model = BreakAfterTimestepEmbedding()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with sc_compile.generation(compiled, num_inference_steps=STEPS):
        outputs = _generation(model, compiled)
    report = sc_compile.report(model)
    assert report.num_steps == STEPS and report.full_steps == EXPECTED_FULL, str(report)
    for step, ours, eager in outputs:
        if step in EXPECTED_FULL:
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        else:  # linear in the step: the α = 1 prediction is exact
            torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_a_blocks_piece_without_the_timestep_needs_the_step_count_in_a_context():
    model = BreakAfterTimestepEmbedding()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with (
        pytest.raises(ClockError, match=r"does not receive the timestep.*num_inference_steps=N"),
        torch.no_grad(),
        sc_compile.generation(compiled),
    ):
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))


def test_a_split_model_without_blocks_is_refused_not_silently_uncached():
    model = SplitWithoutBlocks()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with torch.no_grad():
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
        with pytest.raises(
            UncacheableSplitError,
            match=r"graph break: Call to `torch._dynamo.graph_break\(\)` at .*test_graph_breaks.py:\d+.*none of the "
            r"graphs",
        ):
            compiled(torch.ones(1, 4, 8), torch.tensor([900.0]))


class BlockWithBreak(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.gain * hidden_states
        torch._dynamo.graph_break()
        return hidden_states + temb * 0.0


class UnrolledWithBlockBreak(DummyDiT):
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        hidden_states = self.blocks[0](hidden_states, temb)
        hidden_states = self.blocks[1](hidden_states, temb)
        hidden_states = self.blocks[2](hidden_states, temb)
        return hidden_states * 2.0


def test_a_break_inside_a_block_is_cached_per_block_under_an_explicit_clock():
    """Dynamo compiles a block with a break inside on its own (its graphs see neither the model's
    module paths nor the timestep): cached per block (sc_compile/runtime/per_block.py) once the steps
    are placed explicitly; full steps equal eager, and so do the cached ones (α = 1 is exact on
    this schedule)."""
    model = UnrolledWithBlockBreak()
    model.blocks[1] = BlockWithBreak(0.5)
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with sc_compile.generation(compiled, num_inference_steps=STEPS):
        outputs = _generation(model, compiled)
    report = sc_compile.report(model)
    assert report.full_steps == EXPECTED_FULL, str(report)
    for _, ours, eager in outputs:
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_a_new_size_after_a_break_starts_a_new_forward_not_the_last_one():
    """A second generation at another size recompiles the blocks' piece: its new runtime places
    its own step (it used to follow the previous generation's last forward, one step late)."""
    model = BreakBeforeTimestep()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    for tokens in (4, 6):
        outputs = []
        with torch.no_grad():
            for step in range(STEPS):
                hidden, timestep = torch.ones(1, tokens, 8) * (STEPS - step), torch.tensor([1000.0 - 100.0 * step])
                outputs.append((compiled(hidden, timestep), model(hidden, timestep)))
        report = sc_compile.report(model)
        assert report.num_steps == STEPS and report.full_steps == EXPECTED_FULL, (tokens, str(report))
        for step in report.full_steps:
            torch.testing.assert_close(*outputs[step], rtol=1e-6, atol=1e-5)


def test_guidance_streams_at_different_sizes_stay_two_streams_after_a_break():
    model = BreakBeforeTimestep()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            timestep = torch.tensor([1000.0 - 100.0 * step])
            for tokens in (4, 6):
                hidden = torch.ones(1, tokens, 8) * (STEPS - step)
                outputs.append((step, compiled(hidden, timestep), model(hidden, timestep)))
    report = sc_compile.report(model)
    assert len(report.streams) == 2 and report.full_steps == EXPECTED_FULL, str(report)
    for step, ours, eager in outputs:
        if step in report.full_steps:
            torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_whole_forward_graphs_of_two_sizes_each_decide_for_themselves():
    """Two streams at different sizes are two graphs of one whole forward: neither follows the
    other's decisions (with independent decisions both cache and both report their change)."""
    model = DummyDiT()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "warmup_steps": 2, "share_decision_across_streams": False},
    )
    with torch.no_grad():
        for step in range(STEPS):
            timestep = torch.tensor([1000.0 - 100.0 * step])
            for tokens in (4, 6):
                compiled(torch.ones(1, tokens, 8) * (STEPS - step) ** 0.5, timestep)
    report = sc_compile.report(model)
    assert len(report.streams) == 2
    for stream in report.streams:
        assert stream.cached_steps, str(report)
        assert any(c is not None for c in stream.changes), str(report)
