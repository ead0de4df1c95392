"""A hand-written loop (no pipeline, no context) stops reading the timestep once it repeats (issue 21, item 1).

Generations are placed by their timesteps (``step_clock.py``) until two in a row made the same
calls; the next one that starts as they did is placed by count, its timesteps copied to the host
without a wait and compared after each full step (``clock/loop.py``). These tests pin: outputs
equal to timestep placement; a loop that changes its schedule goes on placed by its timesteps (the
outputs of a fresh run); an interrupted generation followed by a new one from a new call of the
loop is found before anything is placed; one that starts in the same frame is reported with a
warning naming the calls that may be wrong (never silent); a report compares what is pending;
``generation()`` contexts repeat the same way.
"""

from __future__ import annotations

import logging

import pytest
import torch

import sc_compile
from sc_compile.clock.loop import LoopCheck

from dummy_dit import DummyDiT, output_scale

OPTIONS = {"compiler": "eager", "warmup_steps": 3, "alpha": "ones", "static_interval": 2}


def _schedule(steps: int) -> list[tuple[float, float]]:
    """(latent scale, timestep) per step: a smooth trajectory, so the dynamic rule caches."""
    return [(16.0 - 10.0 * (i / steps) ** 1.2, 1000.0 * (1.0 - i / steps)) for i in range(steps)]


def _generation(compiled, steps: int, guidance: bool = True, stop: int | None = None, device="cpu") -> list[float]:
    """One generation of a hand-written loop: per step a conditional and (with guidance) an
    unconditional call at the same timestep; ``stop``: break out of the loop before that step."""
    outputs = []
    with torch.no_grad():
        for step, (scale, t) in enumerate(_schedule(steps)):
            if stop is not None and step == stop:
                break
            timestep = torch.tensor([t], device=device)
            for latent in (scale, scale * 0.5) if guidance else (scale,):
                out = compiled(torch.ones(1, 4, 8, device=device) * latent, timestep)
                outputs.append(out.reshape(-1)[0].item() / output_scale())
    return outputs


def _fresh(steps: int, **kwargs) -> list[float]:
    """The same generation placed by its timesteps: the first generation of a new compile."""
    return _generation(torch.compile(DummyDiT(), backend="scalingcache", options=OPTIONS), steps, **kwargs)


@pytest.mark.parametrize("guidance", [True, False])
def test_a_repeated_loop_is_placed_by_count_with_the_outputs_of_timestep_placement(guidance):
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    reference = _fresh(12, guidance=guidance)
    first = _generation(compiled, 12, guidance)
    assert _generation(compiled, 12, guidance) == first  # the loop repeats itself
    assert sc_compile.report(model).clock_note == ""  # both placed by their timesteps
    for _ in range(2):
        again = _generation(compiled, 12, guidance)
        report = sc_compile.report(model)
        assert report.clock_note.startswith("calls after the first placed by count"), report.clock_note
        assert again == first == reference
        assert report.cached_steps, report  # something was cached, so the placement mattered
        assert report.num_steps == 12 and report.num_calls == 12 * (2 if guidance else 1)
    assert "clock:    calls after the first placed by count" in str(report)


def test_guidance_calls_in_a_comprehension_are_one_loop():
    """The calls of one step made in a list comprehension share a frame of their own (Python 3.11):
    the loop's frame is the one the first call shares with the next step's."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)

    def run() -> list[float]:
        with torch.no_grad():
            return [
                out.reshape(-1)[0].item()
                for scale, t in _schedule(12)
                for out in [compiled(torch.ones(1, 4, 8) * s, torch.tensor([t])) for s in (scale, scale * 0.5)]
            ]

    first = run()
    assert run() == first
    assert run() == first
    report = sc_compile.report(model)
    assert report.clock_note.startswith("calls after the first placed by count"), report.clock_note


def test_a_loop_that_changes_its_schedule_goes_on_placed_by_its_timesteps(caplog):
    """Another step count, the same first timestep: the steps the count gave are the timestep's, so the
    generation goes on placed by its timesteps, with the outputs of a fresh run."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    _generation(compiled, 12)
    _generation(compiled, 12)
    with caplog.at_level(logging.INFO, logger="sc_compile.runtime"):
        shorter = _generation(compiled, 6)
    assert shorter == _fresh(6)
    notes = [r for r in caplog.records if "then by the timestep" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]
    assert "nothing cached was affected" in notes[0].getMessage()
    report = sc_compile.report(model)
    assert report.num_steps == 6 and "then by the timestep" in report.clock_note, report
    # Once the 6-step generation has repeated itself, the next is placed by count again.
    assert _generation(compiled, 6) == shorter
    assert _generation(compiled, 6) == shorter
    assert sc_compile.report(model).clock_note.startswith("calls after the first placed by count")


def test_an_interrupted_generation_then_a_new_one_from_a_new_call_of_the_loop_is_exact(caplog):
    """The new generation's first call comes from another frame than the interrupted one's loop: it is
    found before it is placed (no read), and placed by its timestep as a new generation."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    _generation(compiled, 12, guidance=False)
    _generation(compiled, 12, guidance=False)
    cached = sc_compile.report(model).cached_steps
    stop = cached[0]  # interrupted just before a cached step: the next call would land there by count
    with caplog.at_level(logging.INFO, logger="sc_compile.runtime"):
        _generation(compiled, 12, guidance=False, stop=stop)
        again = _generation(compiled, 12, guidance=False)
    assert again == _fresh(12, guidance=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("called from outside the loop" in r.getMessage() for r in caplog.records)


def test_an_interrupted_generation_then_a_new_one_in_the_same_frame_is_warned_never_silent(caplog):
    """A loop that breaks out of a generation and starts the next in the same frame: the count places
    the new generation's first call at the old position; where that ran cached, the warning at the
    next full step names it (the limit of placing by count; explicit boundaries have none)."""
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    _generation(compiled, 12, guidance=False)
    _generation(compiled, 12, guidance=False)
    stop = sc_compile.report(model).cached_steps[0]
    with caplog.at_level(logging.WARNING, logger="sc_compile.runtime"), torch.no_grad():
        for generation in range(2):
            for step, (scale, t) in enumerate(_schedule(12)):
                if generation == 0 and step == stop:
                    break
                compiled(torch.ones(1, 4, 8) * scale, torch.tensor([t]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "\n".join(warnings)
    assert f"call {stop} (step {stop}) was not the pattern's" in warnings[0], warnings[0]
    assert "may be wrong" in warnings[0] and "sc_compile.generation" in warnings[0]
    # The next generation is placed by its timesteps again and gives the reference outputs.
    assert _generation(compiled, 12, guidance=False) == _fresh(12, guidance=False)


def test_a_report_compares_the_pending_copies(monkeypatch):
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    _generation(compiled, 12, guidance=False)
    _generation(compiled, 12, guidance=False)
    checks = []
    original = LoopCheck.differing

    def counting(self):
        checks.append((self.verified, self.position))
        return original(self)

    monkeypatch.setattr(LoopCheck, "differing", counting)
    _generation(compiled, 12, guidance=False)
    full = sc_compile.report(model).num_full_steps
    # Compared after each full step (the first call is read, not copied), and once by the report.
    pending = [c for c in checks if c[0] < c[1]]
    assert 1 <= len(pending) <= full, (checks, full)
    assert checks[-1][1] == 12 and checks[-1][0] < 12  # the report compared the last calls


@pytest.mark.cuda
def test_a_repeated_loop_on_cuda_copies_timesteps_without_a_sync_per_call():
    model = DummyDiT().cuda()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    first = _generation(compiled, 12, device="cuda")
    assert _generation(compiled, 12, device="cuda") == first
    again = _generation(compiled, 12, device="cuda")
    assert again == first
    assert sc_compile.report(model).clock_note.startswith("calls after the first placed by count")


def _in_context(compiled, steps: int, **kwargs) -> list[float]:
    with sc_compile.generation(compiled):
        return _generation(compiled, steps, **kwargs)


def test_generation_contexts_that_repeat_are_placed_by_count_with_the_outputs_of_timestep_placement(caplog):
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    reference = _fresh(12)
    assert _in_context(compiled, 12) == reference
    assert _in_context(compiled, 12) == reference
    assert sc_compile.report(model).clock_note == ""
    with caplog.at_level(logging.INFO, logger="sc_compile.runtime"):
        for _ in range(2):
            assert _in_context(compiled, 12) == reference
            report = sc_compile.report(model)
            assert report.clock == "context" and report.clock_note.startswith("calls after the first placed by count")
        # Another schedule in the next context: the steps the count gave are the timestep's.
        assert _in_context(compiled, 6) == _fresh(6)
    assert "then by the timestep" in sc_compile.report(model).clock_note
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_two_generations_in_one_context_placed_by_count_are_refused_as_by_the_timestep():
    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    _in_context(compiled, 12, guidance=False)
    _in_context(compiled, 12, guidance=False)
    with pytest.raises(sc_compile.ClockError, match="one context per generation"):
        with sc_compile.generation(compiled):
            _generation(compiled, 12, guidance=False, stop=5)
            _generation(compiled, 12, guidance=False)


def test_a_hand_written_flux_loop_adds_at_most_one_read_per_full_step(monkeypatch):
    """A 16-step hand-written loop around the demo Flux transformer (guidance as two calls per step):
    host reads per generation against plain ``torch.compile``. Printed:
    ``pytest -s -k hand_written_flux tests/test_loop_clock.py``."""
    from test_one_line import _host_reads

    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)

    def loop(compiled, first: float = 1.0):
        latents = torch.randn(1, 49, 16, generator=torch.Generator().manual_seed(0))
        (cond, pooled), (uncond, upooled) = embeddings([0]), embeddings.null(1)
        txt_ids, img_ids = torch.zeros(cond.shape[1], 3), torch.zeros(49, 3)
        with torch.inference_mode():
            for i in range(16):
                t = torch.tensor([first * (1 - i / 16)])
                out = [
                    compiled(
                        hidden_states=latents,
                        timestep=t,
                        encoder_hidden_states=c,
                        pooled_projections=p,
                        txt_ids=txt_ids,
                        img_ids=img_ids,
                        return_dict=False,
                    )[0]
                    for c, p in ((cond, pooled), (uncond, upooled))
                ]
                latents = latents - (1 / 16) * (out[1] + 3.0 * (out[0] - out[1]))
        return latents

    model = pipe.transformer
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager"})
    loop(compiled, first=0.999)  # compiles (another schedule)
    runs = []
    for _ in range(3):
        runs.append((_host_reads(monkeypatch, lambda: loop(compiled)), sc_compile.report(model)))
    torch._dynamo.reset()
    plain_model = random_flux_demo(seed=0)[0].transformer
    plain = torch.compile(plain_model, backend="eager")
    loop(plain)
    plain_reads = _host_reads(monkeypatch, lambda: loop(plain))
    print(
        f"\n16-step hand-written Flux loop, 32 calls: plain torch.compile {plain_reads} host reads; ScalingCache "
        + ", ".join(
            f"{reads} ({report.num_full_steps} full, {report.clock_note or 'by the timestep'})"
            for reads, report in runs
        )
    )
    (first_reads, first), (_, _), (counted_reads, counted) = runs
    assert first.clock_note == "" and first_reads - plain_reads >= 32  # a read per call
    assert counted.clock_note.startswith("calls after the first placed by count")
    assert counted_reads - plain_reads <= counted.num_full_steps, (counted_reads, plain_reads, counted)
