"""The memory model (``sc_compile.explain``, asked before running) equals what a generation allocates."""

from __future__ import annotations

import math

import pytest
import torch

import sc_compile
import sc_compile.runtime.dispatch

from tiny_models import BUILDERS, timesteps, with_timestep


@pytest.mark.parametrize("prediction", ["hidden", "residual"])
@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_explained_buffer_bytes_equal_the_allocated_bytes(family, granularity, prediction):
    model, inputs = BUILDERS[family](seed=0)
    explanation = sc_compile.explain(model, **inputs, granularity=granularity, prediction=prediction)
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={
            "compiler": "eager",
            "warmup_steps": 2,
            "granularity": granularity,
            "prediction": prediction,
            "alpha": "ones",
        },
    )
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=4):
        for t in timesteps(family, 4):
            compiled(**with_timestep(family, inputs, t))
    report = sc_compile.report(model)
    assert len(report.streams) == 1 and report.num_points == len(explanation.cache_points)
    assert report.buffer_bytes == explanation.buffer_bytes_per_stream > 0


@pytest.fixture
def small_sketches(monkeypatch):
    """The tiny models' values are smaller than the sketch's floor of 1,024 elements (where they
    keep full buffers): lower it so that their points are sketched as a real model's are."""
    import sc_compile.contract

    monkeypatch.setattr(sc_compile.contract, "MIN_SKETCH_ELEMENTS", 2)


@pytest.mark.parametrize("statistic", ["full", "subsample"])
def test_explained_bytes_equal_the_allocated_bytes_for_each_statistic_and_cache_dtype(statistic, small_sketches):
    model, inputs = BUILDERS["flux"](seed=0)
    explanation = sc_compile.explain(model, **inputs, statistic=statistic, cache_dtype=torch.float64)
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={
            "compiler": "eager",
            "warmup_steps": 2,
            "alpha": "ones",
            "statistic": statistic,
            "cache_dtype": torch.float64,
        },
    )
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=3):
        for t in timesteps("flux", 3):
            compiled(**with_timestep("flux", inputs, t))
    assert sc_compile.report(model).buffer_bytes == explanation.buffer_bytes_per_stream > 0
    sketched = [p for p in explanation.cache_points if p.sketch is not None]
    if statistic == "full":
        assert not sketched
        return
    # Only the points no cached step reads are sketched, and each sketch is at most 2 % of one
    # value of its point (both buffers, float32): the default fits the target.
    assert sketched and all(not p.feeds_output for p in sketched)
    assert all(p.sketch is None for p in explanation.cache_points if p.feeds_output)
    for point in sketched:
        assert point.buffer_nbytes(torch.float64) <= 0.02 * point.numel * point.dtype.itemsize
    full_bytes = sum(p.buffer_nbytes(torch.float64) for p in explanation.cache_points if p.feeds_output)
    assert (
        explanation.buffer_bytes_per_stream < full_bytes + 0.02 * explanation.hidden_state_bytes * len(sketched) + 1024
    )


# -- the sketched statistic ---------------------------------------------------------------------
# The dummy DiT's blocks scale their input: with hidden_states = a + s_t·b every cache point is a
# constant times a + s_t·b, so a point's relative change between two full steps is
# |s_t − s_{t−1}|·|b|₁ / |a + s_{t−1}·b|₁ over whichever elements the statistic reads.
SCALES = [4.0, 3.0, 2.5, 2.25, 2.0]


def _pattern(numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(numel, dtype=torch.float32)
    return torch.sin(index * 0.37) + 1.5, torch.cos(index * 1.3)


def test_sketched_change_equals_the_change_of_the_subsample_computed_by_hand():
    from dummy_dit import DummyDiT

    shape = (1, 64, 48)
    numel = shape[1] * shape[2]
    a, b = _pattern(numel)
    model = DummyDiT()
    explanation = sc_compile.explain(model, torch.ones(shape), torch.tensor([1.0]))
    points = explanation.cache_points
    assert [p.sketch is not None for p in points] == [True, True, False]  # the last point feeds the head
    sketch = points[0].sketch
    taken = torch.arange(sketch.elements) * sketch.stride
    assert sketch.stride > 1 and int(taken[-1]) < numel

    def change(prev: float, now: float, index: torch.Tensor | None) -> float:
        a_, b_ = (a, b) if index is None else (a[index], b[index])
        return float(abs(now - prev) * b_.abs().sum() / (a_ + prev * b_).abs().sum())

    expected = [
        (2 * change(SCALES[t - 1], SCALES[t], taken) + change(SCALES[t - 1], SCALES[t], None)) / 3
        for t in range(1, len(SCALES))
    ]
    exact = [change(SCALES[t - 1], SCALES[t], None) for t in range(1, len(SCALES))]
    measured = {}
    for statistic in ("subsample", "full"):
        torch._dynamo.reset()
        compiled = torch.compile(
            model,
            backend="scalingcache",
            options={"compiler": "eager", "warmup_steps": len(SCALES), "alpha": "ones", "statistic": statistic},
        )
        with torch.no_grad():
            for i, s in enumerate(SCALES):
                compiled((a + s * b).reshape(shape), torch.tensor([1000.0 - 100.0 * i]))
        measured[statistic] = sc_compile.report(model).streams[0].changes[1:]
    assert measured["subsample"] == pytest.approx(expected, rel=1e-5)
    assert measured["full"] == pytest.approx(exact, rel=1e-5)
    # The subsample is a different set of elements, so the two differ here (by a little).
    assert measured["subsample"] != pytest.approx(exact, rel=1e-6)
    assert measured["subsample"] == pytest.approx(exact, rel=0.1)


def test_the_sketch_floor_keeps_small_points_whole_and_sketches_large_ones():
    from sc_compile.contract import MIN_SKETCH_ELEMENTS, sketch_plan

    assert sketch_plan(MIN_SKETCH_ELEMENTS, 4, 64) is None  # a sketch would be no smaller: full buffers
    small = sketch_plan(4 * MIN_SKETCH_ELEMENTS, 4, 64)
    assert small is not None and MIN_SKETCH_ELEMENTS // 2 < small.elements <= MIN_SKETCH_ELEMENTS
    # FLUX.1-dev at 1024²: 4,608 tokens × 3,072 in bf16 -> the 65,536-element cap, 0.9 % of the value
    real = sketch_plan(4608 * 3072, 2, 3072)
    assert real is not None and 0.99 * (1 << 16) < real.elements <= 1 << 16 and real.stop <= 4608 * 3072
    assert math.gcd(real.stride, 3072) == 1  # every channel is visited
    assert 2 * real.elements * 4 <= 0.02 * 4608 * 3072 * 2


def test_outputs_do_not_depend_on_the_statistic_under_a_fixed_schedule(small_sketches):
    """Cached steps predict only from the points the output reads, which keep full buffers."""
    model, inputs = BUILDERS["wan"](seed=0)
    outputs = {}
    for statistic in ("subsample", "full"):
        torch._dynamo.reset()
        compiled = torch.compile(
            model,
            backend="scalingcache",
            options={
                "compiler": "eager",
                "warmup_steps": 2,
                "static_interval": 3,
                "alpha": "ones",
                "statistic": statistic,
            },
        )
        with torch.no_grad():
            outputs[statistic] = [compiled(**with_timestep("wan", inputs, t))[0] for t in timesteps("wan", 6)]
        report = sc_compile.report(model)
        assert report.cached_steps  # predictions were made
        layout = sc_compile.runtime.dispatch.latest_runtime(model).layout
        assert any(p.sketch is not None for p in layout.points) == (statistic == "subsample")
    for sub, full in zip(outputs["subsample"], outputs["full"], strict=True):
        assert torch.equal(sub, full)


def test_the_cached_step_graph_never_reads_a_sketched_point(small_sketches):
    from sc_compile.backends.lowering import specialize_cache_conds
    from sc_compile.passes.insert_cache_conds import UNPREDICTED_META_KEY

    model, inputs = BUILDERS["flux"](seed=0)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(**inputs)
    from sc_compile.passes import run_cache_passes

    cond_gm, layout = run_cache_passes(graphs[0], model_class="FluxTransformer2DModel")
    assert any(p.sketch is not None for p in layout.cache_points)
    stand_ins = [n for sub in cond_gm.children() for n in sub.graph.nodes if UNPREDICTED_META_KEY in n.meta]
    assert stand_ins  # the cached branches of sketched points hold a stand-in ...
    cached = specialize_cache_conds(cond_gm, full=False).graph_module
    assert not [n for n in cached.graph.nodes if UNPREDICTED_META_KEY in n.meta]  # ... that no cached step keeps
    # A graph whose cached step did read one is refused, not run on zeros: expose the first
    # block's output (a sketched point) as an extra model output.
    first_cond = next(n for n in cond_gm.graph.nodes if n.target is torch.ops.higher_order.cond)
    exposed = next(iter(first_cond.users))
    output = cond_gm.graph.output_node()
    output.args = (tuple(output.args[0]) + (exposed,),)
    cond_gm.recompile()
    with pytest.raises(RuntimeError, match=r"reads cache point\(s\) \[0\], whose buffers hold only a sketch"):
        specialize_cache_conds(cond_gm, full=False)


# -- a declared memory budget -------------------------------------------------------------------
def test_a_layout_over_the_declared_budget_is_refused_at_compile_time_with_the_figures(small_sketches):
    from sc_compile.memory import CacheMemoryError, format_bytes

    model, inputs = BUILDERS["flux"](seed=0)
    full = sc_compile.explain(model, **inputs, statistic="full").buffer_bytes_per_stream
    default = sc_compile.explain(model, **inputs).buffer_bytes_per_stream
    assert default < full
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={"compiler": "eager", "alpha": "ones", "statistic": "full", "max_cache_bytes": default + 1},
    )
    message = (
        rf"one stream of FluxTransformer2DModel needs {format_bytes(full)} .*\({full:,} bytes\).*"
        rf"max_cache_bytes': {default + 1}.*statistic='subsample' \({format_bytes(default)}\)"
    )
    # Raised while Dynamo compiles: it reaches the caller inside BackendCompilerFailed.
    with torch.no_grad(), pytest.raises(Exception, match=message) as raised:
        compiled(**inputs)
    assert isinstance(getattr(raised.value, "inner_exception", raised.value), CacheMemoryError)


def test_a_second_stream_over_the_declared_budget_is_refused_before_it_is_allocated():
    from sc_compile.memory import CacheMemoryError
    from sc_compile.runtime.registry import LIVE_STREAM_STATES

    model, inputs = BUILDERS["wan"](seed=0)
    per_stream = sc_compile.explain(model, **inputs).buffer_bytes_per_stream
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        backend="scalingcache",
        options={
            "compiler": "eager",
            "alpha": "ones",
            "warmup_steps": 2,
            "max_cache_bytes": per_stream + per_stream // 2,
        },
    )
    t0 = timesteps("wan", 2)[0]
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=2):
        compiled(**with_timestep("wan", inputs, t0))  # stream 0 (cond) fits
        before = len(LIVE_STREAM_STATES)
        with pytest.raises(CacheMemoryError, match=r"stream 1 of this generation .* over the limit"):
            compiled(**with_timestep("wan", {**inputs, "hidden_states": inputs["hidden_states"] * 2}, t0))
        assert len(LIVE_STREAM_STATES) == before  # nothing was allocated for it


def test_max_cache_bytes_is_validated():
    with pytest.raises(ValueError, match="max_cache_bytes must be a positive int"):
        sc_compile.ScalingCacheConfig(max_cache_bytes=0)
    with pytest.raises(ValueError, match="statistic must be one of 'subsample', 'full'"):
        sc_compile.ScalingCacheConfig(statistic="projection")
