"""CUDA graphs (issue 23): ``mode="reduce-overhead"`` / ``options={"triton.cudagraphs": True}``.

On CPU the modes run uncaptured and give exactly the default mode's outputs and steps. The capture
logic itself (static input copies, keys by state address, outputs cloned out of reused storage,
the bound on captures, a failed capture) runs on CPU through an emulated capture with a CUDA
graph's semantics: capturing executes nothing, a replay runs the graph on the static inputs it was
captured with, and writes its outputs into the same storage every time. The real capture runs in
the CUDA-only tests at the end (skipped without a CUDA device) and in ``benchmarks/device_check.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_clock import SEQUENCE, LoopPipeline, _latents
from torch.utils._pytree import tree_flatten

import sc_compile
from sc_compile.memory import CacheMemoryError, graph_memory_bytes
from sc_compile.runtime import cuda_graphs
from sc_compile.runtime.cuda_graphs import CudaGraphStep, GraphPool
from sc_compile.runtime.dispatch import latest_runtime

from dummy_dit import DummyDiT, output_scale

# A static interval: the generations here are short (the short-schedule rule would cache nothing).
OPTIONS = {"warmup_steps": 3, "alpha": "ones", "static_interval": 2}


class EmulatedGraph:
    """A CUDA graph's semantics on the CPU: the capture executes nothing; a replay runs ``fn`` on
    the static inputs of the capture and writes the outputs into the same storage every time."""

    nbytes = 0  # its outputs are allocated at the first replay, outside any pool

    def __init__(self, fn, static_args, pool):
        self.fn = fn
        self.static_args = list(static_args)
        self.outputs = None

    def replay(self):
        result = self.fn(*self.static_args)
        if self.outputs is None:
            self.outputs = result
            return
        for mine, new in zip(tree_flatten(self.outputs)[0], tree_flatten(result)[0], strict=True):
            mine.copy_(new)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setitem(cuda_graphs.CAPTURES, "cpu", EmulatedGraph)


def _static(tensor):
    torch._dynamo.mark_static_address(tensor, guard=False)
    return tensor


# -- the wrapper alone ----------------------------------------------------------------------------
def _step(max_captures=cuda_graphs.MAX_CAPTURES):
    calls = []

    def fn(x, state, coef):
        calls.append(1)
        state.add_(1.0)  # an in-place state update, as the full step's
        return (x * coef + state,)

    step = CudaGraphStep(fn, name="test", pool=GraphPool(torch.device("cpu")), copied=frozenset({2}))
    step.max_captures = max_captures
    return step, calls


def test_warm_up_then_capture_then_replays_with_fresh_inputs(emulated):
    step, calls = _step()
    state, coef = _static(torch.zeros(3)), _static(torch.ones(3))
    outs = [step(torch.full((3,), float(i)), state, coef) for i in range(4)]
    # Every call ran the graph exactly once (the capture executes nothing): state counts calls.
    assert len(calls) == 4 and torch.equal(state, torch.full((3,), 4.0))
    assert [o[0][0].item() for o in outs] == [0 + 1, 1 + 2, 2 + 3, 3 + 4]
    assert step.num_captures == 1 and step.num_replays == 3 and step.num_uncaptured == 1
    # The caller owns every output: no replay after it overwrote it.
    assert outs[1][0][0].item() == 3.0
    # A new coefficient buffer (a new generation's) is copied, not a new capture.
    out = step(torch.ones(3), state, _static(torch.full((3,), 2.0)))
    assert out[0][0].item() == 2 + 5 and step.num_captures == 1


def test_outputs_are_not_overwritten_by_the_next_replay(emulated):
    step, _ = _step()
    state, coef = _static(torch.zeros(3)), _static(torch.ones(3))
    step(torch.zeros(3), state, coef)
    step(torch.zeros(3), state, coef)  # captured
    first = step(torch.full((3,), 10.0), state, coef)
    value = first[0].clone()
    step(torch.full((3,), -10.0), state, coef)
    assert torch.equal(first[0], value)


def test_new_state_addresses_and_layouts_capture_their_own_graph_up_to_the_bound(emulated, caplog):
    step, _ = _step(max_captures=2)
    coef = _static(torch.ones(3))
    a, b, c = (_static(torch.zeros(3)) for _ in range(3))
    for state in (a, a, b, b):
        step(torch.ones(3), state, coef)
    assert step.num_captures == 2
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime.cuda_graphs"):
        for _ in range(3):
            out = step(torch.ones(3), c, coef)
    assert step.num_captures == 2 and torch.equal(out[0], torch.full((3,), 4.0))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 captures" in warnings[0]
    # A new input layout (shape) is a new key as well; the captured ones still replay.
    replays = step.num_replays
    step(torch.ones(3), a, coef)
    assert step.num_replays == replays + 1


def test_a_failed_capture_runs_uncaptured_with_one_warning(monkeypatch, caplog):
    attempts = []

    def failing(fn, static_args, pool):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setitem(cuda_graphs.CAPTURES, "cpu", failing)
    step, calls = _step()
    state, coef = _static(torch.zeros(3)), _static(torch.ones(3))
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime.cuda_graphs"):
        outs = [step(torch.ones(3), state, coef)[0][0].item() for _ in range(4)]
    assert outs == [2.0, 3.0, 4.0, 5.0] and len(calls) == 4 and len(attempts) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "ScalingCache: the test graph runs without CUDA graphs from now on: its capture failed "
        "(RuntimeError: operation not permitted when stream is capturing)"
    ]


# -- through the backend ----------------------------------------------------------------------------
def _generations(compiled, model, generations=2, guidance_from=None):
    pipe = LoopPipeline(compiled)
    sc_compile.enable(pipe)
    outputs, steps = [], []
    with torch.no_grad():
        for seed in range(generations):
            out, _ = pipe(_latents(seed), num_inference_steps=len(SEQUENCE), guidance_from=guidance_from)
            outputs.append(out)
            report = sc_compile.report(model)
            steps.append([(s.full_steps, s.cached_steps) for s in report.streams])
    return outputs, steps


def _assert_same(a, b, cached=True):
    (outs_a, steps_a), (outs_b, steps_b) = a, b
    assert steps_a == steps_b
    if cached:
        assert any(cached for generation in steps_a for _, cached in generation), "no cached step was tested"
    for x, y in zip(outs_a, outs_b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_reduce_overhead_and_the_cudagraphs_option_equal_the_default_mode(dtype):
    results = {}
    for how in ("default", "mode", "option", "torch.compile", "torch.compile mode"):
        torch._dynamo.reset()
        model = DummyDiT().to(dtype)
        if how == "default":
            compiled = sc_compile.compile(model, sc_compile.ScalingCacheConfig(**OPTIONS))
        elif how == "mode":
            compiled = sc_compile.compile(model, sc_compile.ScalingCacheConfig(**OPTIONS), mode="reduce-overhead")
        elif how == "option":
            compiled = torch.compile(model, backend="scalingcache", options={**OPTIONS, "triton.cudagraphs": True})
        else:  # torch.compile takes mode or options: ScalingCache's options at their defaults
            mode = "reduce-overhead" if how.endswith("mode") else None
            compiled = torch.compile(model, backend="scalingcache", mode=mode)
        results[how] = _generations(compiled, model)
        if how not in ("default", "torch.compile"):
            # On the CPU nothing is captured: the step graphs are Inductor's, as in the default mode.
            assert not isinstance(latest_runtime(model).cached_step.fn, CudaGraphStep)
    _assert_same(results["default"], results["mode"])
    _assert_same(results["default"], results["option"])
    # ScalingCache's default options on this 7-step generation: the short-schedule rule runs every
    # step in full (the mode must change nothing all the same; the pairs above test cached steps).
    _assert_same(results["torch.compile"], results["torch.compile mode"], cached=False)


def test_emulated_capture_through_the_backend_equals_the_default_mode_with_guidance(emulated):
    """Two streams (guidance from step 3: cond, then uncond) replay the same graphs on their own
    state; the loop keeps the raw outputs of steps 0-2, which later replays of the same graph
    would overwrite if they were the graph's own storage."""
    results, runtimes = {}, {}
    for how in ("default", "cudagraphs"):
        torch._dynamo.reset()
        model = DummyDiT()
        options = {**OPTIONS, "triton.cudagraphs": True} if how == "cudagraphs" else OPTIONS
        compiled = torch.compile(model, backend="scalingcache", options=options)
        results[how] = _generations(compiled, model, generations=3, guidance_from=3)
        runtimes[how] = latest_runtime(model)
    _assert_same(results["default"], results["cudagraphs"])
    full, cached = runtimes["cudagraphs"].full_step.fn, runtimes["cudagraphs"].cached_step.fn
    assert isinstance(full, CudaGraphStep) and isinstance(cached, CudaGraphStep)
    # One capture per stream and graph, reused by every later generation (pooled state).
    assert full.num_captures == 2 and cached.num_captures == 2
    assert cached.num_replays > 0 and full.num_replays > 0
    assert full.pool is cached.pool and full.pool.nbytes > 0


def test_graph_memory_counts_against_a_declared_cache_budget(emulated):
    """Guidance from step 3: the cond stream's captures exist when the uncond stream is allocated.
    A budget of exactly two streams' state fits without CUDA graphs, and not with them."""

    def run(max_cache_bytes, cudagraphs):
        torch._dynamo.reset()
        model = DummyDiT()
        options = {**OPTIONS, "triton.cudagraphs": cudagraphs, "max_cache_bytes": max_cache_bytes}
        compiled = torch.compile(model, backend="scalingcache", options=options)
        _generations(compiled, model, generations=1, guidance_from=3)
        return latest_runtime(model)

    runtime = run(None, True)
    assert graph_memory_bytes([runtime]) > 0
    two_streams = 2 * runtime.layout.stream_nbytes(None)
    run(two_streams, False)
    with pytest.raises(CacheMemoryError, match="held by its CUDA-graph captures"):
        run(two_streams, True)


# -- on a CUDA device ---------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


class DevicePipeline(LoopPipeline):
    """LoopPipeline with the scheduler's timesteps on the latents' device."""

    def __call__(self, latents, num_inference_steps, guidance_from=None, sync_error_from=None):
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        self.scheduler.set_begin_index(0)  # else its first step looks its index up (a read)
        outputs = []
        for i, t in enumerate(self.scheduler.timesteps):
            if i == sync_error_from:
                torch.cuda.set_sync_debug_mode("error")
            timestep = t.expand(latents.shape[0]).float()
            out = self.transformer(latents, timestep)
            if guidance_from is not None and i >= guidance_from:
                out = 0.5 * (out + self.transformer(latents * 2.0, timestep))
            outputs.append(out)
            latents = self.scheduler.step(out / output_scale() - latents, t, latents, return_dict=False)[0]
        torch.cuda.set_sync_debug_mode("default")
        return torch.stack(outputs), latents


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_capture_equals_the_default_mode(dtype):
    results, runtimes = {}, {}
    for how in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        model = DummyDiT().to("cuda", dtype)
        mode = None if how == "default" else how
        compiled = sc_compile.compile(model, sc_compile.ScalingCacheConfig(**OPTIONS), mode=mode)
        pipe = DevicePipeline(compiled)
        sc_compile.enable(pipe)
        outs = []
        with torch.no_grad():
            for seed in range(3):
                out, _ = pipe(_latents(seed).to("cuda", dtype), num_inference_steps=len(SEQUENCE), guidance_from=3)
                outs.append(out)
        results[how] = outs
        runtimes[how] = latest_runtime(model)
    for x, y in zip(results["default"], results["reduce-overhead"], strict=True):
        torch.testing.assert_close(x, y)
    full, cached = runtimes["reduce-overhead"].full_step.fn, runtimes["reduce-overhead"].cached_step.fn
    assert isinstance(cached, CudaGraphStep) and cached.num_replays > 0 and full.num_replays > 0
    assert full.num_captures == 2 and full.pool.nbytes > 0


@cuda
def test_cuda_a_warm_generation_under_a_planned_schedule_never_syncs():
    """After the first step (the batch check reads the timestep once), a warm generation with the
    planned schedule (which reads no statistics) runs every full and cached step without a sync."""
    model = DummyDiT().to("cuda", torch.bfloat16)
    config = sc_compile.ScalingCacheConfig(alpha="ones", speedup=2.0)
    pipe = DevicePipeline(sc_compile.compile(model, config, mode="reduce-overhead"))
    sc_compile.enable(pipe)
    with torch.no_grad():
        pipe(_latents(0).to("cuda", torch.bfloat16), num_inference_steps=12, guidance_from=3)  # captures
        try:
            pipe(_latents(1).to("cuda", torch.bfloat16), num_inference_steps=12, guidance_from=3, sync_error_from=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    report = sc_compile.report(model)
    assert report.cached_steps and latest_runtime(model).cached_step.fn.num_replays > 0
