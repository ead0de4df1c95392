"""The pass works unchanged on the diffusers DiT families we can build tiny and locally.

Six families have their own builders (``BUILDERS``) and every check; the others
(``MORE_FAMILIES``, from the configurations of diffusers' own model tests) have the same three:
blocks found, cached steps happen, full steps equal eager. Families Dynamo cannot capture whole
without ``fullgraph=True``, or at all, are refused with our own error that names the break.

Outcomes, diffusers 0.42 on torch 2.13 (CPU, eager inner compiler, 8 steps):

* accelerated, full steps equal eager: the six of ``BUILDERS``, Allegro, AuraFlow, Bria, Chroma,
  ChronoEdit, CogVideoX, CogView3-Plus, CogView4, ConsisID, DiT, EasyAnimate, Flux 2, HunyuanDiT,
  Latte, LongCat-Image, LTX-Video, LTX-2, Lumina-Next, Ovis-Image, Sana, Sana-Video, SkyReels-V2,
  Stable Audio DiT, Wan-VACE; Mochi with ``fullgraph=True`` (its attention selects prompt tokens
  with ``nonzero``, which Dynamo captures only then);
* Lumina2 breaks in its own forward (``attention_mask.sum().tolist()``) after its timestep embedding:
  the blocks' graph cannot place a call by the timestep, refused with a ``ClockError`` naming the
  break and ``sc_compile.enable(pipe)``;
* HiDream (its mixture of experts loops over ``bincount().cpu().numpy()``; Dynamo cannot capture it
  even with ``fullgraph=True``) and Mochi without ``fullgraph=True``: Dynamo compiles their blocks one
  by one (per-block graphs, ``test_block_graphs.py``), which see no timestep: without an explicit
  clock a call is refused with a ``ClockError`` naming the break and ``sc_compile.enable(pipe)``;
* not built: Cosmos (its module needs torchvision, which the test environment does not have).
"""

from __future__ import annotations

import re

import pytest
import torch

import sc_compile
from sc_compile.clock.step_clock import ClockError

from tiny_models import (
    BUILDERS,
    MORE_FAMILIES,
    build_more,
    more_timesteps,
    timesteps,
    with_timestep,
)

# (blocks, block-granularity cache points, residual modules per block)
EXPECTED = {
    "flux": (4, 7, (4, 4, 1, 1)),  # two-stream double blocks, then single blocks on the joint stream
    "wan": (2, 2, (3, 3)),  # self-attention, cross-attention, feed-forward
    "hunyuan_video": (4, 7, (4, 4, 1, 1)),
    "sd3": (2, 3, (4, 2)),  # the last joint block only updates the image stream
    "qwen_image": (2, 3, (4, 2)),  # the last block's text stream is dead code
    "pixart": (2, 2, (3, 3)),
}


def _check_eight_steps(model, outputs):
    """8 steps, some cached; full steps equal eager, cached steps finite."""
    report = sc_compile.report(model)
    assert report.num_steps == 8
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(outputs[step][0], outputs[step][1], rtol=1e-5, atol=1e-5)
    for step in report.cached_steps:
        assert torch.isfinite(outputs[step][0]).all()


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
    _check_eight_steps(model, outputs)


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


# Blocks found per family (block granularity) in MORE_FAMILIES.
MORE_BLOCKS = {
    "allegro": 2,
    "aura_flow": 4,  # two joint (MMDiT) blocks, then two single blocks
    "bria": 4,
    "chroma": 4,
    "chronoedit": 2,
    "cogvideox": 2,
    "cogview3plus": 2,
    "cogview4": 2,
    "consisid": 4,  # transformer blocks interleaved with the face perceiver's cross-attention
    "dit": 2,  # its head calls transformer_blocks[0].norm1.emb again: outside the block
    "easyanimate": 2,
    "flux2": 4,
    "hunyuan_dit": 2,
    "latte": 4,  # spatial and temporal blocks alternate
    "longcat_image": 4,
    "ltx_video": 2,
    "ltx2": 2,
    "lumina_next": 2,
    "mochi": 2,
    "ovis_image": 4,
    "sana": 2,
    "sana_video": 2,
    "skyreels_v2": 2,
    "stable_audio": 2,  # its numbered nn.Sequential projections are layers, not blocks
    "wan_vace": 6,  # four blocks and the two VACE control blocks
}
FULLGRAPH_ONLY = {"mochi"}


@pytest.mark.parametrize("family", sorted(MORE_BLOCKS))
def test_more_families_accelerate_with_exact_full_steps(family):
    model, inputs = build_more(family)
    fullgraph = family in FULLGRAPH_ONLY
    compiled = torch.compile(
        model, backend="scalingcache", fullgraph=fullgraph, options={"compiler": "eager", "warmup_steps": 2}
    )
    latents = inputs["hidden_states"]
    outputs = []
    with torch.no_grad():
        for timestep in more_timesteps(family, 8):
            call = {**inputs, "hidden_states": latents, **timestep}
            ours = compiled(**call)[0]
            outputs.append((ours, model(**call)[0]))
            if ours.shape == latents.shape:
                latents = latents - 0.02 * ours
    _check_eight_steps(model, outputs)
    explanation = sc_compile.explain(model, **{**inputs, **more_timesteps(family, 1)[0]})
    assert len(explanation.blocks) == MORE_BLOCKS[family], str(explanation)
    # The cached step reads the last blocks' buffers only (ConsisID adds its last perceiver
    # cross-attention's output to the last block's outside both: both feed the head).
    feeding = {p.block for p in explanation.cache_points if p.feeds_output}
    assert feeding and feeding <= {b.name for b in explanation.blocks[-2:]}, str(explanation)
    assert explanation.cached_step_nodes * 3 < explanation.full_step_nodes


@pytest.mark.parametrize(
    ("family", "fullgraph", "cause"),
    [
        # Split in its own forward (cached across the break), but the blocks' graph never sees the
        # timestep: without the pipeline clock the call cannot be placed (ClockError naming the break).
        ("lumina2", False, r"graph break in forward\(\) at .*transformer_lumina2.py:\d+.*sc_compile.enable\(pipe\)"),
        # Dynamo gives up on the forward and compiles the blocks one by one (sc_compile/runtime/per_block.py):
        # these graphs see no timestep either, so without an explicit clock the call is refused with the
        # break and the fix.
        (
            "hidream",
            False,
            r"blocks of HiDreamImageTransformer2DModel one by one .*forward runs in Python.*sc_compile.enable\(pipe\)",
        ),
        (
            "mochi",
            False,
            r"blocks of MochiTransformer3DModel one by one \(graph break: .*attention_processor.py:\d+.*inside "
            r"'transformer_blocks.0'",
        ),
    ],
)
def test_families_dynamo_splits_are_refused_naming_the_break(family, fullgraph, cause):
    model, inputs = build_more(family)
    compiled = torch.compile(model, backend="scalingcache", fullgraph=fullgraph, options={"compiler": "eager"})
    with pytest.raises(Exception) as excinfo, torch.no_grad():
        compiled(**inputs, **more_timesteps(family, 1)[0])
    error = excinfo.value
    expected = ClockError
    while not isinstance(error, expected) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    assert isinstance(error, expected), repr(excinfo.value)
    assert re.search(cause, str(error)), str(error)


def test_more_families_cover_the_registry():
    refused = {"lumina2", "hidream"}
    assert set(MORE_FAMILIES) == set(MORE_BLOCKS) | refused
