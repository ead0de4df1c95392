"""The step clock (issue 12): one test per measured failure case, each asserting the correct
outcome (equal to a serial or fresh run, or the specific error), plus host reads per call (issue 13).

``LoopPipeline`` is a minimal diffusers-style pipeline around the exact-arithmetic dummy DiT: a
scheduler, ``set_timesteps``, a loop calling the transformer and ``scheduler.step``, and a step
callback. ``sc_compile.enable`` integrates with it exactly as with a diffusers pipeline.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sc_compile
from sc_compile.clock.step_clock import MAX_STREAMS_PER_STEP, ClockError
from sc_compile.runtime.dispatch import BatchTimestepError, GradEnabledError, StochasticSamplerError
from sc_compile.runtime.registry import LIVE_STREAM_STATES

from dummy_dit import DummyDiT, output_scale

SEQUENCE = [16.0, 12.0, 10.0, 9.0, 8.5, 8.0, 4.0]
# The hand-derived outputs of test_runtime_exact for SEQUENCE, warm-up 3, α = 1.
EXPECTED = [16.0, 12.0, 10.0, 8.0, 8.5, 7.75, 7.0]
EAGER = {"compiler": "eager", "warmup_steps": 3, "alpha": "ones"}


def _compile(model, **options):
    return torch.compile(model, backend="scalingcache", options={**EAGER, **options})


def _scaled(out: torch.Tensor) -> float:
    return out.reshape(-1)[0].item() / output_scale()


def _run(compiled, values=SEQUENCE, timesteps=None, dtype=torch.float32):
    timesteps = timesteps if timesteps is not None else [1000.0 - 100.0 * i for i in range(len(values))]
    with torch.no_grad():
        return [
            _scaled(compiled(torch.ones(1, 4, 8) * v, torch.tensor([t], dtype=dtype)))
            for v, t in zip(values, timesteps, strict=True)
        ]


class LoopPipeline:
    """A diffusers-style pipeline: scheduler, timesteps, a denoising loop, a step callback."""

    def __init__(self, transformer, scheduler=None):
        self.transformer = transformer
        self.scheduler = scheduler or FlowMatchEulerDiscreteScheduler()

    @property
    def components(self):
        return {"transformer": self.transformer, "scheduler": self.scheduler}

    def __call__(
        self,
        latents,
        num_inference_steps,
        timestep_dtype=torch.float32,
        callback_on_step_end=None,
        guidance_from=None,
        generator=None,
    ):
        self.scheduler.set_timesteps(num_inference_steps)
        outputs = []
        for i, t in enumerate(self.scheduler.timesteps):
            timestep = t.expand(latents.shape[0]).to(timestep_dtype)
            out = self.transformer(latents, timestep)
            if guidance_from is not None and i >= guidance_from:
                out = 0.5 * (out + self.transformer(latents * 2.0, timestep))
            outputs.append(out)
            latents = self.scheduler.step(
                out / output_scale() - latents, t, latents, generator=generator, return_dict=False
            )[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})
        return torch.stack(outputs), latents


def _latents(seed=0, batch=1):
    return torch.randn(batch, 4, 8, generator=torch.Generator().manual_seed(seed)) + 3.0


# -- 1. threads sharing one compiled model -------------------------------------------------------
def test_case01_threads_with_their_own_pipelines_share_a_compiled_model():
    model = DummyDiT()
    compiled = _compile(model)
    pipes = [sc_compile.enable(LoopPipeline(compiled)) for _ in range(3)]
    with torch.no_grad():
        serial = [pipe(_latents(seed), 12) for seed, pipe in enumerate(pipes)]
    for _trial in range(4):
        results: dict[int, object] = {}
        barrier = threading.Barrier(len(pipes))

        def lockstep(pipe, i, t, kwargs, barrier=barrier):
            barrier.wait(timeout=30)  # every thread finishes step i before any starts step i + 1
            return kwargs

        def work(index: int, barrier=barrier, results=results, lockstep=lockstep) -> None:
            barrier.wait()
            with torch.no_grad():
                results[index] = pipes[index](_latents(index), 12, callback_on_step_end=lockstep)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pipes))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index, (outputs, latents) in enumerate(serial):
            torch.testing.assert_close(results[index][0], outputs, rtol=0, atol=0)
            torch.testing.assert_close(results[index][1], latents, rtol=0, atol=0)


def test_case01_concurrent_use_without_a_context_gives_each_thread_its_generation():
    """Two threads in lockstep on one schedule, no context: each thread's calls are a generation of
    its own, equal to the serial run (``tests/test_threads.py`` has the refusals and a stress test)."""
    model = DummyDiT()
    compiled = _compile(model)
    serial = _run(compiled)
    results: dict[int, list[float]] = {}
    turn = threading.Barrier(2)

    def work(index: int) -> None:
        outputs = []
        with torch.no_grad():
            for i, value in enumerate(SEQUENCE):
                turn.wait(timeout=30)  # both threads at the same step: interleaved calls
                outputs.append(_scaled(compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 100.0 * i]))))
        results[index] = outputs

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == serial and results[1] == serial


def test_case01_concurrent_generations_in_their_own_contexts_are_isolated():
    model = DummyDiT()
    compiled = _compile(model)
    reference = _run(compiled)
    for _trial in range(3):
        results: dict[int, list[float]] = {}
        turn = threading.Barrier(3)

        def work(index: int, turn=turn, results=results) -> None:
            scale = 1.0 + index
            out = []
            with torch.no_grad(), sc_compile.generation(model):
                for i, value in enumerate(SEQUENCE):
                    turn.wait(timeout=30)
                    out.append(
                        _scaled(compiled(torch.ones(1, 4, 8) * value * scale, torch.tensor([1000.0 - 100.0 * i])))
                        / scale
                    )
            results[index] = out

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index in range(3):
            assert results[index] == pytest.approx(reference, abs=1e-5)


# -- 2. a recompile in the middle of a generation -------------------------------------------------
def test_case02_recompile_mid_generation_continues_the_generation():
    model = DummyDiT()
    compiled = _compile(model)
    counters = torch._dynamo.utils.counters
    counters.clear()
    outputs = []
    for i, value in enumerate(SEQUENCE):
        # The first call outside inference_mode, the rest inside: Dynamo compiles a second graph.
        mode = torch.no_grad() if i == 0 else torch.inference_mode()
        with mode:
            outputs.append(_scaled(compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 100.0 * i]))))
    assert counters["stats"]["unique_graphs"] == 2  # the recompile happened
    report = sc_compile.report(model)
    assert report.num_steps == report.num_calls == len(SEQUENCE)
    assert report.full_steps == (0, 1, 2, 4) and report.cached_steps == (3, 5, 6)
    assert outputs == pytest.approx(EXPECTED, abs=1e-5)


# -- 3. timesteps that increase over a generation ------------------------------------------------
def test_case03_increasing_timesteps_are_one_generation_each():
    model = DummyDiT()
    compiled = _compile(model)
    increasing = [i / len(SEQUENCE) for i in range(len(SEQUENCE))]  # 0 = noise ... 1 = clean
    first = _run(compiled, timesteps=increasing)
    second = _run(compiled, timesteps=increasing)
    assert first == second == pytest.approx(EXPECTED, abs=1e-5)
    report = sc_compile.report(model)
    assert report.num_steps == len(SEQUENCE) and report.cached_steps == (3, 5, 6)


# -- 4. per-token timesteps [B, seq] --------------------------------------------------------------
class PerTokenDiT(DummyDiT):
    """Timesteps per token, as image-to-video models build them (first-frame tokens at 0)."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.unsqueeze(-1)  # [B, seq, 1]
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2.0


def test_case04_per_token_timesteps_place_steps_by_the_whole_tensor():
    model = PerTokenDiT()
    compiled = _compile(model)

    def generation():
        outputs = []
        with torch.no_grad():
            for i, value in enumerate(SEQUENCE):
                timestep = torch.full((1, 4), 1000.0 - 100.0 * i)
                timestep[:, 0] = 0.0  # first-frame tokens stay clean
                outputs.append(_scaled(compiled(torch.ones(1, 4, 8) * value, timestep)))
        return outputs

    assert generation() == generation() == pytest.approx(EXPECTED, abs=1e-5)
    report = sc_compile.report(model)
    assert report.num_steps == len(SEQUENCE) and len(report.streams) == 1
    assert report.cached_steps == (3, 5, 6)


# -- 5. repeated one-step generations -------------------------------------------------------------
def test_case05_repeated_one_step_generations_without_a_context_are_refused_not_grown():
    model = DummyDiT()
    compiled = _compile(model)
    gc.collect()
    before = len(LIVE_STREAM_STATES)
    with torch.no_grad(), pytest.raises(ClockError, match=f"more than {MAX_STREAMS_PER_STEP} streams"):
        for _ in range(100):
            compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))  # cond
            compiled(torch.ones(1, 4, 8) * 2, torch.tensor([1000.0]))  # uncond
    gc.collect()
    assert len(LIVE_STREAM_STATES) - before <= MAX_STREAMS_PER_STEP + 1  # + the compile's example state


def test_case05_one_step_generations_in_contexts_free_their_memory():
    model = DummyDiT()
    compiled = _compile(model)
    gc.collect()
    before = len(LIVE_STREAM_STATES)
    for _ in range(100):
        with torch.no_grad(), sc_compile.generation(model, num_inference_steps=1):
            cond = compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))
            uncond = compiled(torch.ones(1, 4, 8) * 2, torch.tensor([1000.0]))
        assert _scaled(cond) == 1.0 and _scaled(uncond) == 2.0
        report = sc_compile.report(model)
        assert report.num_steps == 1 and len(report.streams) == 2
    gc.collect()
    # The pool of the last generation's two streams (+ the compile's example state).
    assert len(LIVE_STREAM_STATES) - before <= 3


# -- 6. bf16 timesteps collide at high step counts -------------------------------------------------
def test_case06_colliding_bf16_timesteps_are_refused_by_the_timestep_clock():
    model = DummyDiT()
    compiled = _compile(model)
    timesteps = torch.linspace(1000.0, 1.0, 1000)
    with torch.no_grad(), pytest.raises(ClockError, match="float32"):
        for t in timesteps:
            compiled(torch.ones(1, 4, 8), t.reshape(1).to(torch.bfloat16))


def test_case06_bf16_timesteps_under_the_pipeline_clock_are_exact():
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(_compile(model)))
    with torch.no_grad():
        bf16_outputs, bf16_latents = pipe(_latents(), 1000, timestep_dtype=torch.bfloat16)
        report = sc_compile.report(model)
        fp32_outputs, fp32_latents = pipe(_latents(), 1000)
    assert report.num_steps == 1000 and len(report.streams) == 1 and report.clock == "pipeline"
    assert report.cached_steps
    torch.testing.assert_close(bf16_outputs, fp32_outputs, rtol=0, atol=0)


# -- 7. a stream first seen at a cached step ------------------------------------------------------
def test_case07_a_stream_first_seen_at_a_cached_step_runs_in_full(caplog):
    model = DummyDiT()
    compiled = _compile(model)
    cond, uncond = [], {}
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        for i, value in enumerate(SEQUENCE):
            t = torch.tensor([1000.0 - 100.0 * i])
            cond.append(_scaled(compiled(torch.ones(1, 4, 8) * value, t)))
            if i >= 5:  # guidance from step 5, a cached step of the shared decision
                uncond[i] = _scaled(compiled(torch.ones(1, 4, 8) * value * 2, t))
    report = sc_compile.report(model)
    assert cond == pytest.approx(EXPECTED, abs=1e-5)  # stream 0 is unaffected
    # Stream 1 never wrote its buffers before step 5: it runs in full there (the exact output)
    # and at step 6, where its buffers still miss the shared last full step (4).
    assert uncond == {5: pytest.approx(16.0), 6: pytest.approx(8.0)}
    assert report.streams[1].full_steps == (5, 6)
    assert report.nonfinite_steps == ()
    assert not [r for r in caplog.records if "non-finite" in r.getMessage()]


# -- 8. an interrupted generation, then img2img ---------------------------------------------------
def test_case08_img2img_after_an_interrupted_pipeline_call_starts_fresh():
    def interrupt_at(step):
        def callback(pipe, i, t, kwargs):
            if i == step:
                raise KeyboardInterrupt
            return kwargs

        return callback

    def img2img(pipe):
        # Starts lower than the interrupted run stopped (strength < 1): the timestep clock would
        # take it as that run's next steps.
        pipe.scheduler.set_timesteps(12)
        with torch.no_grad():
            return pipe(_latents(1), 6)

    fresh_model = DummyDiT()
    reference = img2img(sc_compile.enable(LoopPipeline(_compile(fresh_model))))
    torch._dynamo.reset()
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(_compile(model)))
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        pipe(_latents(0), 12, callback_on_step_end=interrupt_at(5))
    interrupted = sc_compile.report(model)
    assert interrupted.finished and interrupted.num_steps == 6
    result = img2img(pipe)
    torch.testing.assert_close(result[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(result[1], reference[1], rtol=0, atol=0)
    assert sc_compile.report(model).num_steps == 6


# -- 9. a side call inside a step callback --------------------------------------------------------
def test_case09_a_preview_in_the_step_callback_leaves_the_generation_alone():
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(_compile(model)))
    with torch.no_grad():
        plain = pipe(_latents(), 12)
    previews = []

    def preview(pipe, i, t, kwargs):
        latents = kwargs["latents"].clone()
        previews.append((latents, pipe.transformer(latents, torch.tensor([500.0]))))
        return kwargs

    with torch.no_grad():
        with_previews = pipe(_latents(), 12, callback_on_step_end=preview)
        # Each preview is the model's own (uncached) output for its latents.
        for latents, out in previews:
            torch.testing.assert_close(out, model(latents, torch.tensor([500.0])), rtol=0, atol=0)
    torch.testing.assert_close(with_previews[0], plain[0], rtol=0, atol=0)
    report = sc_compile.report(model)
    assert report.num_steps == 12 and len(report.streams) == 1 and report.num_calls == 12
    assert report.cached_steps and len(previews) == 12


def test_case09_uncached_calls_under_the_timestep_clock():
    model = DummyDiT()
    compiled = _compile(model)
    outputs = []
    with torch.no_grad():
        for i, value in enumerate(SEQUENCE):
            outputs.append(_scaled(compiled(torch.ones(1, 4, 8) * value, torch.tensor([1000.0 - 100.0 * i]))))
            with sc_compile.uncached(model):
                preview = compiled(torch.ones(1, 4, 8) * 3.0, torch.tensor([1500.0]))
            assert _scaled(preview) == pytest.approx(3.0)
    assert outputs == pytest.approx(EXPECTED, abs=1e-5)
    assert sc_compile.report(model).num_steps == len(SEQUENCE)


# -- 10. deepcopy -------------------------------------------------------------------------------
def test_case10_a_deepcopy_has_its_own_state_and_report():
    model = DummyDiT()
    compiled = _compile(model)
    solo = _run(compiled)
    clone = copy.deepcopy(compiled)
    original, copied = [], []
    with torch.no_grad():
        for i, value in enumerate(SEQUENCE):  # interleaved, same timesteps
            t = torch.tensor([1000.0 - 100.0 * i])
            original.append(_scaled(compiled(torch.ones(1, 4, 8) * value, t)))
            copied.append(_scaled(clone(torch.ones(1, 4, 8) * value * 2, t)) / 2)
    assert original == solo and copied == pytest.approx(solo, abs=1e-5)
    assert sc_compile.report(clone).num_steps == len(SEQUENCE)
    assert len(sc_compile.report(clone).streams) == len(sc_compile.report(compiled).streams) == 1


# -- 11. grad enabled ---------------------------------------------------------------------------
def test_case11_grad_enabled_is_refused_with_the_fix():
    compiled = _compile(DummyDiT())
    with pytest.raises(GradEnabledError, match=r"torch.no_grad\(\)"):
        compiled(torch.ones(1, 4, 8), torch.tensor([1000.0]))


# -- 12. a step count other than the declared one -------------------------------------------------
def test_case12_more_steps_than_declared_are_refused():
    model = DummyDiT()
    compiled = _compile(model, num_inference_steps=5, final_full_steps=2)
    with pytest.raises(ClockError, match="declared to have 5 steps"):
        _run(compiled)


def test_case12_fewer_steps_than_declared_warn_that_final_steps_were_not_honoured(caplog):
    model = DummyDiT()
    compiled = _compile(model, final_full_steps=2)
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"):
        with sc_compile.generation(model, num_inference_steps=9):
            _run(compiled)
    assert any(
        "ran 7 of its 9 declared steps; final_full_steps=2 was not honoured" in r.getMessage() for r in caplog.records
    )
    assert sc_compile.report(model).declared_steps == 9


def test_case12_a_declared_count_against_the_schedulers_is_refused():
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(_compile(model, num_inference_steps=8)))
    with torch.no_grad(), pytest.raises(ClockError, match="scheduler runs 12 steps"):
        pipe(_latents(), 12)


# -- 13. a stochastic sampler -------------------------------------------------------------------
def _stochastic(model, **options):
    return sc_compile.enable(
        LoopPipeline(_compile(model, **options), FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    )


def test_case13_a_stochastic_sampler_is_detected_and_refused_with_the_fix():
    with torch.no_grad(), pytest.raises(StochasticSamplerError, match="stochastic_sampling=False"):
        _stochastic(DummyDiT())(_latents(), 12, generator=torch.Generator().manual_seed(0))
    model = DummyDiT()
    with torch.no_grad(), sc_compile.generation(model, stochastic_sampler=True), pytest.raises(StochasticSamplerError):
        _run(_compile(model))


def _drift(stochastic: bool, caplog, **options) -> float:
    torch._dynamo.reset()
    model = DummyDiT()
    generator = torch.Generator()
    with torch.no_grad():
        scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic)
        reference = LoopPipeline(model, scheduler)(_latents(), 12, generator=generator.manual_seed(0))[1]
        pipe = sc_compile.enable(
            LoopPipeline(_compile(model, **options), FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic))
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"):
            cached = pipe(_latents(), 12, generator=generator.manual_seed(0))[1]
    warned = [r for r in caplog.records if "stochastic sampler" in r.getMessage()]
    assert len(warned) == (1 if stochastic else 0)
    assert sc_compile.report(model).cached_steps
    return ((cached - reference).norm() / reference.norm()).item()


def test_case13_warn_caches_anyway_and_what_it_costs(caplog):
    """What the refusal says, measured: the deterministic sampler is exact on the dummy DiT, the
    stochastic one drifts, residual prediction drifts less."""
    deterministic = _drift(False, caplog, stochastic_sampler="warn")
    hidden = _drift(True, caplog, stochastic_sampler="warn")
    residual = _drift(True, caplog, stochastic_sampler="warn", prediction="residual")
    assert deterministic < 1e-6
    assert residual < hidden and hidden > 0.1, (deterministic, hidden, residual)


# -- 14. per-sample timesteps that differ inside a batch -----------------------------------------
def test_case14_samples_at_different_timesteps_in_one_batch_are_refused():
    compiled = _compile(DummyDiT())
    with torch.no_grad(), pytest.raises(BatchTimestepError, match="sample 1"):
        compiled(torch.ones(2, 4, 8), torch.tensor([1000.0, 900.0]))


# -- 1, with diffusers: two FluxPipelines sharing one compiled transformer -------------------------
def test_case01_flux_pipelines_in_threads_share_a_compiled_transformer():
    from diffusers import FluxPipeline

    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    transformer = pipe.transformer
    compiled = torch.compile(transformer, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3})
    pipes = [
        sc_compile.enable(
            FluxPipeline(**{**pipe.components, "transformer": compiled, "scheduler": copy.deepcopy(pipe.scheduler)})
        )
        for _ in range(2)
    ]

    def generate(index, callback=None):
        with torch.no_grad():
            return pipes[index](
                **embeddings.pipeline_kwargs([index + 1], guidance_scale=3.0),  # true CFG: cond, uncond
                height=28,
                width=28,
                num_inference_steps=10,  # above the short-schedule limit: steps are cached
                generator=torch.Generator().manual_seed(index),
                output_type="pt",
                callback_on_step_end=callback,
            ).images

    serial = [generate(0), generate(1)]
    report = sc_compile.report(transformer)
    assert report.clock == "pipeline" and len(report.streams) == 2 and report.cached_steps
    for _trial in range(2):
        barrier = threading.Barrier(2)
        results: dict[int, torch.Tensor] = {}

        def lockstep(pipe, i, t, kwargs, barrier=barrier):
            barrier.wait(timeout=60)
            return kwargs

        def work(index, results=results, lockstep=lockstep):
            results[index] = generate(index, lockstep)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index in range(2):
            torch.testing.assert_close(results[index], serial[index], rtol=0, atol=0)


def test_the_decision_seam_gets_the_step_count_timestep_and_sigma(monkeypatch):
    """What the decision logic is given per step under the pipeline clock (read lazily)."""
    from sc_compile.decision.decisions import Decisions

    seen = []
    decide = Decisions.decide

    def spy(self, stream, info, step_info):
        seen.append(info)
        return decide(self, stream, info, step_info)

    monkeypatch.setattr(Decisions, "decide", spy)
    model = DummyDiT()
    pipe = sc_compile.enable(LoopPipeline(_compile(model)))
    with torch.no_grad():
        pipe(_latents(), 12)
    assert [info.step for info in seen] == list(range(12))
    assert {info.num_steps for info in seen} == {12}
    sigmas = pipe.scheduler.sigmas.tolist()
    assert [info.sigma() for info in seen] == pytest.approx(sigmas[:12])
    assert [info.timestep() for info in seen] == pytest.approx(pipe.scheduler.timesteps.tolist())


def test_sequential_generations_in_different_threads_need_no_context():
    """A serving thread pool: one generation after another, each in whichever worker is free."""
    model = DummyDiT()
    compiled = _compile(model)
    reference = _run(compiled)
    results = []
    for _ in range(3):
        worker = threading.Thread(target=lambda: results.append(_run(compiled)))
        worker.start()
        worker.join()
    assert results == [reference] * 3
    assert sc_compile.report(model).num_steps == len(SEQUENCE)
