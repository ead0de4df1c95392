"""With every step full, ScalingCache under Inductor equals plain Inductor (tiny Flux and Wan)."""

from __future__ import annotations

import pytest
import torch

import sc_compile

from tiny_models import BUILDERS, timesteps, with_timestep

pytestmark = pytest.mark.slow

STEPS = 10


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_all_full_steps_match_inductor(family):
    model, inputs = BUILDERS[family](seed=0)
    cached = torch.compile(model, backend="scalingcache", options={"warmup_steps": STEPS})
    reference = torch.compile(model, backend="inductor")
    latents = inputs["hidden_states"]
    with torch.no_grad():
        for t in timesteps(family, STEPS):
            step_inputs = with_timestep(family, {**inputs, "hidden_states": latents}, t)
            ours = cached(**step_inputs)[0]
            theirs = reference(**step_inputs)[0]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            latents = latents - 0.05 * theirs.reshape(latents.shape)
    report = sc_compile.report(model)
    assert report.full_steps == tuple(range(STEPS))
