"""The third demo model (SD3: ``SD3Transformer2DModel`` through ``StableDiffusion3Pipeline``) runs with
the one line and its shipped weights load; the class embeddings give each pipeline its guidance argument."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sc_compile
from sc_compile.demo import models
from sc_compile.demo.sampling import generate


def test_random_sd3_demo_runs_through_its_pipeline_with_the_one_line():
    pipe, emb = models.random_sd3_demo()
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    transformer = pipe.transformer
    uncached = generate(pipe, emb, [0, 7], num_inference_steps=10)
    pipe.transformer = torch.compile(transformer, backend="scalingcache", options={"compiler": "eager"})
    cached = generate(pipe, emb, [0, 7], num_inference_steps=10)
    report = sc_compile.report(transformer)
    assert cached.shape == uncached.shape == (2, 1, models.SD3_IMAGE_SIZE, models.SD3_IMAGE_SIZE)
    # The pipeline's clock: 10 steps, the pipeline batches cond and uncond into one call (one stream).
    assert report.num_steps == 10
    assert len(report.streams) == 1, report.streams
    assert 0 < report.num_full_steps < 10, str(report)
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, uncached)  # the cached steps predicted
    assert (cached - uncached).abs().max() < 0.5


def test_load_sd3_demo_loads_the_shipped_weights():
    pipe, emb = models.load_sd3_demo()
    directory = models.assets_dir() / models.SD3_DIRNAME
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert pipe.text_encoder is None and pipe.text_encoder_3 is None
    saved = load_file(str(directory / "diffusion_pytorch_model.safetensors"))
    state = pipe.transformer.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor.float()), name
    config = json.loads((directory / "config.json").read_text())
    assert {k: config[k] for k in models.sd3_config()} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in models.sd3_config().items()
    }
    assert torch.equal(emb.prompt_embeds, models.sd3_class_embeddings().prompt_embeds)
    assert emb.guidance == "guidance_scale"


def test_class_embeddings_give_each_pipeline_its_guidance_argument():
    flux = models.flux_class_embeddings().pipeline_kwargs([1, 2], guidance_scale=3.0)
    assert flux["true_cfg_scale"] == 3.0 and "guidance_scale" not in flux
    assert flux["negative_pooled_prompt_embeds"].shape[0] == 2
    wan = models.wan_class_embeddings().pipeline_kwargs([1], guidance_scale=3.0)
    assert wan["guidance_scale"] == 3.0 and "pooled_prompt_embeds" not in wan
    sd3 = models.sd3_class_embeddings()
    guided = sd3.pipeline_kwargs([1, 2], guidance_scale=3.0)
    assert guided["guidance_scale"] == 3.0 and "true_cfg_scale" not in guided
    assert guided["negative_pooled_prompt_embeds"].shape == guided["pooled_prompt_embeds"].shape
    assert torch.equal(guided["negative_prompt_embeds"][0], sd3.prompt_embeds[models.NULL_CLASS])
    # StableDiffusion3Pipeline's own default is 7: no guidance must be asked for, not left out.
    unguided = sd3.pipeline_kwargs([1], guidance_scale=1.0)
    assert unguided["guidance_scale"] == 1.0 and "negative_prompt_embeds" not in unguided
    assert sd3.to(dtype=torch.float64).guidance == "guidance_scale"
    with pytest.raises(ValueError, match="guidance must be one of"):
        models.ClassEmbeddings({"prompt_embeds": torch.zeros(11, 1, 2)}, guidance="cfg")
