"""The memory model (``sc_compile.explain``, asked before running) equals what a generation allocates."""

from __future__ import annotations

import pytest
import torch

import sc_compile

from tiny_models import BUILDERS, timesteps, with_timestep


@pytest.mark.parametrize("prediction", ["hidden", "residual"])
@pytest.mark.parametrize("granularity", ["block", "module"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_explained_buffer_bytes_equal_the_allocated_bytes(family, granularity, prediction):
    model, inputs = BUILDERS[family](seed=0)
    explanation = sc_compile.explain(model, **inputs, granularity=granularity, prediction=prediction)
    compiled = torch.compile(model, backend="scalingcache", options={
        "compiler": "eager", "warmup_steps": 2, "granularity": granularity, "prediction": prediction, "alpha": "ones"})
    with torch.no_grad(), sc_compile.generation(model, num_inference_steps=4):
        for t in timesteps(family, 4):
            compiled(**with_timestep(family, inputs, t))
    report = sc_compile.report(model)
    assert len(report.streams) == 1 and report.num_points == len(explanation.cache_points)
    assert report.buffer_bytes == explanation.buffer_bytes_per_stream > 0
