"""The pass works unchanged on six diffusers DiT families, built tiny and locally."""

from __future__ import annotations

import pytest
import torch

import sc_compile

from tiny_models import BUILDERS, timesteps, with_timestep

# (blocks, block-granularity cache points, residual modules per block)
EXPECTED = {
    "flux": (4, 7, (4, 4, 1, 1)),  # two-stream double blocks, then single blocks on the joint stream
    "wan": (2, 2, (3, 3)),  # self-attention, cross-attention, feed-forward
    "hunyuan_video": (4, 7, (4, 4, 1, 1)),
    "sd3": (2, 3, (4, 2)),  # the last joint block only updates the image stream
    "qwen_image": (2, 3, (4, 2)),  # the last block's text stream is dead code
    "pixart": (2, 2, (3, 3)),
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_blocks_and_cache_points(family):
    model, inputs = BUILDERS[family](seed=0)
    explanation = sc_compile.explain(model, **inputs)
    num_blocks, num_points, residuals = EXPECTED[family]
    assert len(explanation.blocks) == num_blocks, str(explanation)
    assert len(explanation.cache_points) == num_points, str(explanation)
    assert tuple(len(b.residual_outputs) for b in explanation.blocks) == residuals, str(explanation)
    # Only the last block's output feeds the head; the cached step drops the blocks.
    feeding = [p for p in explanation.cache_points if p.feeds_output]
    assert feeding and all(p.block == explanation.blocks[-1].name for p in feeding)
    assert explanation.cached_step_nodes * 4 < explanation.full_step_nodes
    if family == "hunyuan_video":
        assert not any("refiner" in b.name for b in explanation.blocks)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_generation_runs_and_full_steps_are_exact(family):
    model, inputs = BUILDERS[family](seed=0)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    latents = inputs["hidden_states"]
    outputs = []
    with torch.no_grad():
        for t in timesteps(family, 8):
            step_inputs = with_timestep(family, {**inputs, "hidden_states": latents}, t)
            ours = compiled(**step_inputs)[0]
            outputs.append((ours, model(**step_inputs)[0]))
            # PixArt predicts variance channels too: step on the first latent channels only.
            latents = latents - 0.02 * ours.narrow(1, 0, latents.shape[1])
    report = sc_compile.report(model)
    assert report.num_steps == 8
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(outputs[step][0], outputs[step][1], rtol=1e-5, atol=1e-5)
    for step in report.cached_steps:
        assert torch.isfinite(outputs[step][0]).all()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_residual_prediction_runs_and_full_steps_are_exact(family):
    """prediction="residual" rebuilds each point's block input through every family's stream ops."""
    model, inputs = BUILDERS[family](seed=0)
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2, "prediction": "residual"}
    )
    outputs = []
    with torch.no_grad():
        for t in timesteps(family, 5):
            step_inputs = with_timestep(family, inputs, t)
            outputs.append((compiled(**step_inputs)[0], model(**step_inputs)[0]))
    report = sc_compile.report(model)
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(outputs[step][0], outputs[step][1], rtol=1e-5, atol=1e-5)
    for step in report.cached_steps:
        assert torch.isfinite(outputs[step][0]).all()
    # The cached step rebuilds the first block's input from the model's inputs: it computes more
    # than the hidden-state prediction, which reads only the last block's buffers.
    hidden = sc_compile.explain(model, **inputs)
    residual = sc_compile.explain(model, **inputs, prediction="residual")
    assert residual.cached_step_nodes > hidden.cached_step_nodes
    assert residual.fingerprint != hidden.fingerprint
    assert all(p.feeds_output for p in residual.cache_points)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_module_granularity_runs(family):
    model, inputs = BUILDERS[family](seed=0)
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2, "granularity": "module"}
    )
    with torch.no_grad():
        for t in timesteps(family, 6):
            compiled(**with_timestep(family, inputs, t))
    report = sc_compile.report(model)
    # Every residual module is a point; Flux's single blocks slice their outputs from the joint
    # stream, which the cached step replays on the prediction instead of caching them again.
    assert report.num_points == sum(EXPECTED[family][2])
