"""A model whose blocks Dynamo compiles one by one (per-block graphs) is cached.

A graph break inside a block, diffusers group offloading and regional compilation leave the model's
loop over its blocks in Python: Dynamo compiles each block call on its own (one graph per block
class, split in two at a break inside the block). Every such graph returns, at a cached step, the
prediction ``y_full + c·dy`` of each of its own outputs; all of them take one decision per step;
steps come from ``sc_compile.generation(..., num_inference_steps=N)`` or the pipeline clock.

The dummy DiT has exact arithmetic: every block output is ``s_t`` times a known constant for
``hidden_states = s_t * ones``, so a cached step's output is computed by hand from the last two full
steps (α = 1: ``y_τ + (t − τ)·(y_τ − y_τ') / (τ − τ')``).
"""

from __future__ import annotations

import re

import pytest
import torch

import sc_compile
from sc_compile.clock.step_clock import ClockError
from sc_compile.runtime.dispatch import runtimes_of
from sc_compile.runtime.generations import sessions_of
from sc_compile.runtime.per_block import BlockGraphRuntime, BlockGraphsState

from dummy_dit import DummyBlock, DummyDiT, output_scale
from tiny_models import BUILDERS, timesteps, with_timestep

STEPS = 8
# After the warm-up (steps 0, 1), every third step is full: 2, 5 full; 3, 4, 6, 7 cached.
OPTIONS = {"compiler": "eager", "warmup_steps": 2, "static_interval": 3}
EXPECTED_FULL = (0, 1, 2, 5)


class BlockWithBreak(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.gain * hidden_states
        torch._dynamo.graph_break()  # BREAK IN BLOCK
        return hidden_states + temb * 0.0


def _with_break_in_block(model: DummyDiT, index: int = 1) -> DummyDiT:
    model.blocks[index] = BlockWithBreak(model.blocks[index].gain.item())
    return model


class SkipConnection(DummyDiT):
    """Not a plain loop: the first block's output also feeds the head."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        first = self.blocks[0](hidden_states, temb)
        hidden_states = first
        for block in self.blocks[1:]:
            hidden_states = block(hidden_states, temb)
        return (hidden_states + first) * 2.0


def _scale(step: int) -> float:
    return float((STEPS - step) ** 2)  # not linear in the step: a prediction differs from the truth


def _run(model, compiled, scale=_scale, steps=STEPS, declared=STEPS):
    outputs = []
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=declared):
        for step in range(steps):
            hidden = torch.ones(1, 4, 8) * scale(step)
            timestep = torch.tensor([1000.0 - 100.0 * step])
            outputs.append((compiled(hidden, timestep), model(hidden, timestep)))
    return outputs


def test_a_break_inside_a_block_full_steps_equal_eager_and_cached_steps_are_the_prediction():
    model = _with_break_in_block(DummyDiT())
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = _run(model, compiled)
    report = sc_compile.report(model)
    assert report.full_steps == EXPECTED_FULL and report.clock == "context", str(report)
    # blocks 0 and 2 (one graph), block 1 before and after its break: four units of one output.
    assert report.num_points == 4, str(report)
    for step, (ours, eager) in enumerate(outputs):
        if step in EXPECTED_FULL:
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
            continue
        last, before = max(s for s in EXPECTED_FULL if s < step), None
        before = max(s for s in EXPECTED_FULL if s < last)
        slope = (_scale(last) - _scale(before)) / (last - before)
        predicted = output_scale() * (_scale(last) + (step - last) * slope)
        torch.testing.assert_close(ours, torch.full_like(eager, predicted), rtol=1e-6, atol=1e-4)
        assert not torch.allclose(ours, eager), step  # a cached step really predicted
    runtimes = [r for r in runtimes_of(model) if isinstance(r, BlockGraphRuntime)]
    assert len(runtimes) == 3
    for runtime in runtimes:
        # Every graph ran its blocks at the full steps only.
        calls_per_step = runtime.num_calls // STEPS
        assert runtime.num_full_calls == calls_per_step * len(EXPECTED_FULL)
        assert runtime.num_cached_calls == calls_per_step * (STEPS - len(EXPECTED_FULL))


class LateBlock(DummyDiT):
    """Data-dependent control flow: the last block runs only once ``late`` is set (mid-generation)."""

    late = False

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        for block in self.blocks[:-1]:
            hidden_states = block(hidden_states, temb)
        if self.late:
            hidden_states = self.blocks[-1](hidden_states, temb)
        return hidden_states * 2.0


def test_a_step_where_some_blocks_predict_and_a_new_one_runs_full_is_reported_cached():
    """A block first run at a cached step runs in full (nothing to predict from) on predicted
    inputs: the step's output is a prediction, so the step is reported cached, and every step
    reported full equals eager exactly."""
    model = _with_break_in_block(LateBlock())
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = []
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=STEPS):
        for step in range(STEPS):
            model.late = step >= 3  # step 3 is cached by the schedule
            hidden, timestep = torch.ones(1, 4, 8) * _scale(step), torch.tensor([1000.0 - 100.0 * step])
            outputs.append((compiled(hidden, timestep), model(hidden, timestep)))
    report = sc_compile.report(model)
    assert 3 in report.cached_steps and report.full_steps == EXPECTED_FULL, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(*outputs[step], rtol=0, atol=0)
    assert not torch.equal(*outputs[3])


def test_dynamic_rule_reads_the_change_of_all_blocks_and_caches():
    model = _with_break_in_block(DummyDiT())
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    outputs = _run(model, compiled, scale=lambda step: 1.0 + 0.01 * step, steps=12, declared=12)
    report = sc_compile.report(model)
    assert report.cached_steps, str(report)
    # ē measured at the second full step: |y1 − y0| / |y0| of every block, the same for all.
    assert report.streams[0].changes[1] == pytest.approx(0.01, rel=1e-5), str(report)
    for step, (ours, eager) in enumerate(outputs):
        if step in report.full_steps:
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        else:  # linear in the step: the α = 1 prediction is exact
            torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_an_output_consumed_outside_the_next_block_is_predicted_exactly():
    """Each cached block returns the prediction of exactly its own output, whoever reads it."""
    model = _with_break_in_block(SkipConnection())
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = _run(model, compiled, scale=lambda step: 8.0 - step)
    assert sc_compile.report(model).full_steps == EXPECTED_FULL
    for ours, eager in outputs:
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)


def test_generations_free_their_buffers_and_do_not_share_state():
    model = _with_break_in_block(DummyDiT())
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    first = [ours for ours, _ in _run(model, compiled)]
    second = [ours for ours, _ in _run(model, compiled)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert sc_compile.report(model).full_steps == EXPECTED_FULL
    (session,) = sessions_of(model)
    generation = session.last_generation
    assert generation is not None and generation.finished
    state = generation.layouts[BlockGraphsState.KEY]
    assert isinstance(state, BlockGraphsState) and not state.units  # handed back to the pool


def test_per_block_graphs_without_a_clock_are_refused_naming_the_break_and_the_fix():
    model = _with_break_in_block(DummyDiT(), index=0)
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with pytest.raises(ClockError) as excinfo, torch.no_grad():
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
    message = str(excinfo.value)
    assert re.search(r"graph_break\(\)` at .*test_block_graphs.py:\d+", message), message
    assert "sc_compile.enable(pipe)" in message and "num_inference_steps" in message, message


def test_a_generation_context_needs_the_step_count_and_refuses_more_forwards():
    model = _with_break_in_block(DummyDiT())
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with pytest.raises(ClockError, match=r"step count must be declared"), torch.no_grad():
        with sc_compile.generation(compiled):
            compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
    with pytest.raises(ClockError, match=r"guidance run as separate calls counts twice"), torch.no_grad():
        with sc_compile.generation(compiled, num_inference_steps=2):
            for _ in range(3):
                compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))


def test_a_block_that_writes_into_its_input_is_refused():
    class WritesInput(DummyBlock):
        def forward(self, hidden_states, temb):
            hidden_states.mul_(1.0 + self.gain)
            torch._dynamo.graph_break()
            return hidden_states + temb * 0.0

    model = DummyDiT()
    model.blocks[1] = WritesInput(0.5)
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with pytest.raises(Exception, match=r"writes into its input") as excinfo, torch.no_grad():
        with sc_compile.generation(compiled, num_inference_steps=2):
            compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
    assert "cached step" in str(excinfo.value)


def _family_generation(family: str, compiled, reference, steps: int = 10):
    model_inputs = BUILDERS[family](seed=0)[1]
    pairs = []
    with torch.no_grad(), sc_compile.generation(compiled, num_inference_steps=steps):
        for t in timesteps(family, steps):
            inputs = with_timestep(family, model_inputs, t)
            pairs.append((compiled(**inputs)[0], reference(**inputs)[0]))
    return pairs


@pytest.mark.parametrize(
    ("family", "how"),
    [("wan", "block_level"), ("flux", "block_level"), ("flux", "leaf_level"), ("flux", "regional")],
)
def test_group_offloading_and_regional_compilation_are_cached(family, how):
    model, _ = BUILDERS[family](seed=0)
    reference, _ = BUILDERS[family](seed=0)
    options = {"compiler": "eager", "warmup_steps": 2}
    if how == "regional":
        model.compile_repeated_blocks(backend="scalingcache", options=options)
        compiled = model
    else:
        extra = {"num_blocks_per_group": 1} if how == "block_level" else {}
        model.enable_group_offload(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=how, **extra
        )
        compiled = torch.compile(model, backend="scalingcache", options=options)
    pairs = _family_generation(family, compiled, reference)
    report = sc_compile.report(model)
    assert report.cached_steps and report.num_steps == 10, str(report)
    for step, (ours, eager) in enumerate(pairs):
        if step in report.full_steps:
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        else:
            assert not torch.equal(ours, eager)
            assert torch.isfinite(ours).all()
    assert any(isinstance(r, BlockGraphRuntime) and r.num_cached_calls for r in runtimes_of(model))


def _break_in_attention(model, index: int) -> None:
    """A graph break inside the attention processor of one double block (a custom processor)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class BreakingProcessor(FluxAttnProcessor):
        def __call__(self, *args, **kwargs):
            torch._dynamo.graph_break()  # BREAK IN ATTENTION
            return super().__call__(*args, **kwargs)

    model.transformer_blocks[index].attn.set_processor(BreakingProcessor())


@pytest.mark.parametrize("index", [0, -1], ids=["first_block", "last_block"])
def test_a_break_in_the_attention_of_one_block_is_cached_and_full_steps_equal_eager(index):
    """Dynamo's graph of a block's forward cut at the attention call does not guard on the
    processor, so from the second step on it also runs the blocks compiled whole at the first: a
    block's forward then runs another graph, with other outputs (a unit is the block, its code and
    the graph)."""
    model, _ = BUILDERS["flux"](seed=0)
    reference, _ = BUILDERS["flux"](seed=0)
    for m in (model, reference):
        _break_in_attention(m, index)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    pairs = _family_generation("flux", compiled, reference, steps=12)
    report = sc_compile.report(model)
    assert report.cached_steps and report.num_steps == 12, str(report)
    for step, (ours, eager) in enumerate(pairs):
        if step in report.full_steps:
            torch.testing.assert_close(ours, eager, rtol=0, atol=0)
        else:
            assert not torch.equal(ours, eager) and torch.isfinite(ours).all()


@pytest.mark.parametrize("enabled", [True, False], ids=["enable", "one_line"])
def test_pipeline_clock_places_per_block_graphs_with_guidance_streams(enabled):
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    reference = pipe.transformer
    cached_pipe, _ = random_flux_demo(seed=0)
    cached_pipe.transformer.compile_repeated_blocks(
        backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3}
    )
    if enabled:
        sc_compile.enable(cached_pipe)

    def generate(p):
        with torch.no_grad():
            return p(
                **embeddings.pipeline_kwargs([1, 7], guidance_scale=3.0),
                height=28,
                width=28,
                num_inference_steps=10,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images

    ours, eager = generate(cached_pipe), generate(pipe)
    report = sc_compile.report(cached_pipe.transformer)
    assert report.clock == "pipeline" and report.num_steps == 10 and len(report.streams) == 2, str(report)
    assert report.cached_steps and report.full_steps[:3] == (0, 1, 2), str(report)
    assert report.streams[0].full_steps == report.streams[1].full_steps
    assert reference is not cached_pipe.transformer
    assert torch.isfinite(ours).all() and (ours - eager).abs().max() < 0.5


def test_per_block_buffers_over_the_declared_budget_are_refused_before_they_are_allocated():
    from sc_compile.memory import CacheMemoryError

    model = _with_break_in_block(DummyDiT())
    # One unit's two buffers of [1, 4, 8] float32 and its statistics row: 2 * 128 + 16 = 272 bytes.
    compiled = torch.compile(model, backend="scalingcache", options={**OPTIONS, "max_cache_bytes": 600})
    with pytest.raises(
        CacheMemoryError,
        match=r"stream 0\) of this generation needs .* over the limit of 600 B set by "
        r"options=\{'max_cache_bytes': 600\}.*two full buffers",
    ):
        _run(model, compiled)
