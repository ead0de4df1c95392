"""Odd inputs, changing shapes, many models: state never leaks, failures are loud."""

from __future__ import annotations

import logging

import pytest
import torch

import sc_compile

from dummy_dit import DummyDiT, NotADiT
from tiny_models import BUILDERS, timesteps, with_timestep


def _generation(compiled, family, inputs, steps):
    latents = inputs["hidden_states"]
    outputs = []
    with torch.no_grad():
        for t in timesteps(family, steps):
            out = compiled(**with_timestep(family, {**inputs, "hidden_states": latents}, t))[0]
            outputs.append(out)
            latents = latents - 0.05 * out.narrow(1, 0, latents.shape[1])
    return torch.stack(outputs)


def _flux_inputs(tokens: int, batch: int, seed: int = 0):
    _, inputs = BUILDERS["flux"](seed=seed, batch=batch)
    generator = torch.Generator().manual_seed(seed)
    inputs["hidden_states"] = torch.randn(batch, tokens, inputs["hidden_states"].shape[-1], generator=generator)
    inputs["img_ids"] = torch.zeros(tokens, 3)
    return inputs


def test_changing_shapes_and_step_counts_get_fresh_state_and_bounded_recompiles(caplog):
    model, _ = BUILDERS["flux"](seed=0)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    counters = torch._dynamo.utils.counters
    counters.clear()
    small, large, batched = _flux_inputs(16, 1), _flux_inputs(36, 1), _flux_inputs(16, 2)
    with caplog.at_level(logging.INFO, logger="sc_compile.backends.scalingcache"):
        first = _generation(compiled, "flux", small, 8)
        _generation(compiled, "flux", large, 6)
        _generation(compiled, "flux", batched, 10)
        assert sc_compile.report(model).num_steps == 10
        again = _generation(compiled, "flux", small, 8)
        _generation(compiled, "flux", large, 6)
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # nothing leaked between generations
    assert sc_compile.report(model).num_steps == 6
    # Dynamo retraces once per newly changed dimension (tokens, then batch) with the changed sizes
    # marked dynamic (automatic dynamic shapes); the backend specialises a symbolic graph once per
    # distinct size, and logs each: no recompile storm.
    assert counters["stats"]["unique_graphs"] == 3
    # Builds: small (static graph), large and batched (one each in the dynamic graphs), and large
    # once more in the newest graph (dynamic in tokens and batch), which Dynamo picks for it.
    builds = [r for r in caplog.records if "cache points" in r.getMessage()]
    assert len(builds) == 4


def test_interrupted_generation_then_a_clean_one():
    model, inputs = BUILDERS["wan"](seed=0)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    clean = _generation(compiled, "wan", inputs, 8)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        for i, t in enumerate(timesteps("wan", 8)):
            compiled(**with_timestep("wan", inputs, t))
            if i == 4:
                raise KeyboardInterrupt  # the caller stops mid-generation
    torch.testing.assert_close(_generation(compiled, "wan", inputs, 8), clean, rtol=0, atol=0)


def test_two_models_and_one_model_compiled_twice_are_independent():
    flux, flux_inputs = BUILDERS["flux"](seed=0)
    wan, wan_inputs = BUILDERS["wan"](seed=0)
    options = {"compiler": "eager", "warmup_steps": 2}
    solo_flux = _generation(torch.compile(flux, backend="scalingcache", options=options), "flux", flux_inputs, 8)
    torch._dynamo.reset()
    compiled_flux = torch.compile(flux, backend="scalingcache", options=options)
    compiled_wan = torch.compile(wan, backend="scalingcache", options=options)
    twice = torch.compile(flux, backend="scalingcache", options={**options, "warmup_steps": 3})
    outputs = {"flux": [], "wan": [], "twice": []}
    latents = {
        "flux": flux_inputs["hidden_states"],
        "wan": wan_inputs["hidden_states"],
        "twice": flux_inputs["hidden_states"],
    }
    with torch.no_grad():
        for tf, tw in zip(timesteps("flux", 8), timesteps("wan", 8), strict=True):
            for key, compiled, family, inputs, t in (
                ("flux", compiled_flux, "flux", flux_inputs, tf),
                ("wan", compiled_wan, "wan", wan_inputs, tw),
                ("twice", twice, "flux", flux_inputs, tf),
            ):
                out = compiled(**with_timestep(family, {**inputs, "hidden_states": latents[key]}, t))[0]
                outputs[key].append(out)
                latents[key] = latents[key] - 0.05 * out.narrow(1, 0, latents[key].shape[1])
    torch.testing.assert_close(torch.stack(outputs["flux"]), solo_flux, rtol=0, atol=0)
    assert sc_compile.report(wan).num_steps == 8
    assert sc_compile.report(wan).warmup_steps == 2
    # The model compiled twice: the last active compilation's generation is reported.
    assert sc_compile.report(flux).warmup_steps == 3


def test_batch_with_different_samples_takes_one_decision_per_call():
    model, inputs = BUILDERS["flux"](seed=0, batch=2)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    _generation(compiled, "flux", inputs, 8)
    report = sc_compile.report(model)
    assert len(report.streams) == 1  # the batch is one stream: decisions are per call, not per sample
    assert report.cached_steps


def test_non_finite_change_forces_a_full_step_and_warns_once(caplog):
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    values = [16.0, 12.0, 10.0, 9.0, float("nan"), 8.0, 7.5, 7.0]
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        for t, value in enumerate(values):
            compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - t]))
    report = sc_compile.report(model)
    # t3 cached (as in the exact test), ε > δ at t4: full, and its change is NaN. The NaN sits in
    # y_full and then in dy (eq. 6 reads y_full), so the changes of t5 and t6 are NaN too: each
    # forces the next step full, and t7 computes from clean buffers again.
    assert report.nonfinite_steps == (4, 5, 6)
    assert report.full_steps[-4:] == (4, 5, 6, 7)
    assert len([r for r in caplog.records if "non-finite" in r.getMessage()]) == 1


def test_warmup_covering_the_generation_is_legal_and_logged_once(caplog):
    model = DummyDiT()
    compiled = torch.compile(
        model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 6, "num_inference_steps": 5}
    )
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        for _ in range(2):
            for t in range(5):
                compiled(torch.ones(1, 4, 8) * (10 - t), torch.tensor([1000.0 - t]))
    assert sc_compile.report(model).cached_steps == ()
    assert len([r for r in caplog.records if "nothing will be cached" in r.getMessage()]) == 1


def test_a_failed_compile_leaves_nothing_behind(tmp_path):
    model = DummyDiT()
    bad = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "granularity": "layer"})
    with pytest.raises(Exception, match="granularity must be one of"), torch.no_grad():
        bad(torch.ones(1, 4, 8), torch.tensor([1.0]))
    good = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 2})
    with torch.no_grad():
        for t in range(4):
            good(torch.ones(1, 4, 8) * (4 - t), torch.tensor([1000.0 - t]))
    assert sc_compile.report(model).num_steps == 4


def test_fallback_compiles_an_uncacheable_model_with_a_warning(caplog):
    model = NotADiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "fallback": "inductor"})
    with caplog.at_level(logging.WARNING, logger="sc_compile.backends.scalingcache"), torch.no_grad():
        out = compiled(torch.ones(1, 2, 8), torch.tensor([1.0]))
    torch.testing.assert_close(out, model(torch.ones(1, 2, 8), torch.tensor([1.0])))
    assert any("falling back to uncached" in r.getMessage() for r in caplog.records)


def test_dynamic_true_specialises_each_size_once(caplog):
    model, _ = BUILDERS["flux"](seed=0)
    compiled = torch.compile(
        model, backend="scalingcache", dynamic=True, options={"compiler": "eager", "warmup_steps": 2}
    )
    counters = torch._dynamo.utils.counters
    counters.clear()
    # The specialisations are logged by sc_compile.backends.shape_specialization.
    with caplog.at_level(logging.INFO, logger="sc_compile.backends"):
        first = _generation(compiled, "flux", _flux_inputs(16, 1), 6)
        _generation(compiled, "flux", _flux_inputs(36, 1), 6)
        again = _generation(compiled, "flux", _flux_inputs(16, 1), 6)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1  # one Dynamo graph with symbolic sizes
    assert len([r for r in caplog.records if "specialising a dynamic-shape graph" in r.getMessage()]) == 2
    assert sc_compile.report(model).cached_steps


def test_fullgraph_false_works_without_breaks():
    model, inputs = BUILDERS["flux"](seed=0)
    compiled = torch.compile(
        model, backend="scalingcache", fullgraph=False, options={"compiler": "eager", "warmup_steps": 2}
    )
    _generation(compiled, "flux", inputs, 6)
    assert sc_compile.report(model).cached_steps
