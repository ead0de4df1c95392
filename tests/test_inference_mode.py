"""Cache state, statistics and reports never mix inference and normal tensors.

Users run generations under ``torch.inference_mode()`` (the most common way to run inference),
``torch.no_grad()`` (what diffusers pipelines wrap ``__call__`` in), or both, in any order, and read
``sc_compile.report`` / ``sc_compile.explain`` outside either. A tensor made under inference mode
cannot be updated in place outside it, and every buffer of ours is updated in place: each sequence
below must run, on the whole-graph and the per-block paths, under every clock, and equivalent modes
must give equal outputs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import sc_compile
from sc_compile.runtime.dispatch import latest_runtime

from dummy_dit import DummyBlock, DummyDiT

STEPS = 8
OPTIONS = {"compiler": "eager", "warmup_steps": 2, "static_interval": 3}
EXPECTED_FULL = (0, 1, 2, 5)

MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
# Each sequence runs one generation per mode, in order, then reads the report outside any mode.
SEQUENCES = [
    ("inference", "inference"),
    ("inference", "no_grad"),
    ("no_grad", "inference"),
    ("inference", "no_grad", "inference"),
]


class BlockWithBreak(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.gain * hidden_states
        torch._dynamo.graph_break()  # per-block graphs: Dynamo compiles each block call alone
        return hidden_states + temb * 0.0


def _model(path: str) -> DummyDiT:
    model = DummyDiT()
    if path == "per_block":
        model.blocks[1] = BlockWithBreak(model.blocks[1].gain.item())
    return model


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(1, 4, 8) * float((STEPS - step) ** 2), torch.tensor([1000.0 - 100.0 * step])


def _generation(compiled: torch.nn.Module, mode: str, clock: str) -> torch.Tensor:
    """One generation of ``STEPS`` calls under ``mode``; the context (if any) exits outside it."""
    context = (
        sc_compile.generation(compiled, num_inference_steps=STEPS) if clock == "context" else contextlib.nullcontext()
    )
    outputs = []
    with context:
        for step in range(STEPS):
            with MODES[mode]():
                outputs.append(compiled(*_inputs(step)))
            if step == STEPS // 2:
                str(sc_compile.report(compiled))  # a report in the middle, outside the mode
    return torch.stack([o.clone() for o in outputs])


# The per-block path needs a declared step count to place calls (a ClockError without one).
CASES = [("whole_graph", "timestep"), ("whole_graph", "context"), ("per_block", "context")]


@pytest.mark.parametrize("sequence", SEQUENCES, ids="-".join)
@pytest.mark.parametrize(("path", "clock"), CASES, ids=lambda v: v)
def test_generations_in_any_sequence_of_modes_then_reports_outside(path, clock, sequence):
    model = _model(path)
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = []
    for mode in sequence:
        outputs.append(_generation(compiled, mode, clock))
        report = sc_compile.report(compiled)  # outside any mode, after every generation
        assert report.full_steps == EXPECTED_FULL and report.cached_steps, str(report)
        assert str(report)
    if clock == "timestep":
        # The ambient generation ends at the next generation's first step, or here explicitly.
        latest_runtime(model).end_generation()
        assert sc_compile.report(compiled).finished
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=0, atol=0)  # equal in every mode
    # One more generation in each mode after the reports: the pooled buffers serve both.
    for mode in MODES:
        torch.testing.assert_close(_generation(compiled, mode, clock), outputs[0], rtol=0, atol=0)


def test_explain_under_and_after_inference_mode():
    model = DummyDiT()
    with torch.inference_mode():
        inside = sc_compile.explain(model, *_inputs(0))
    outside = sc_compile.explain(model, *_inputs(0))
    assert inside.buffer_bytes_per_stream == outside.buffer_bytes_per_stream > 0
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with torch.inference_mode():
        _generation(compiled, "inference", "context")
    assert sc_compile.explain(model, *_inputs(0)).buffer_bytes_per_stream == outside.buffer_bytes_per_stream


def _flux_generate(pipe, embeddings, mode: str, guidance_scale: float = 3.0) -> torch.Tensor:
    with MODES[mode]():
        images = pipe(
            **embeddings.pipeline_kwargs([1, 7], guidance_scale=guidance_scale),
            height=28,
            width=28,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
    return images.clone()


@pytest.mark.parametrize("enabled", [False, True], ids=["one_line", "enable"])
def test_flux_pipeline_under_inference_mode_then_report_and_plain_call(enabled):
    from sc_compile.demo.models import random_flux_demo

    pipe, embeddings = random_flux_demo(seed=0)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(
        transformer, backend="scalingcache", options={"compiler": "eager", "warmup_steps": 3}
    )
    if enabled:
        sc_compile.enable(pipe)
    first = _flux_generate(pipe, embeddings, "inference")
    report = sc_compile.report(pipe.transformer)  # outside inference mode
    assert report.cached_steps and len(report.streams) == 2, str(report)
    second = _flux_generate(pipe, embeddings, "no_grad")  # the pipeline's own no_grad
    assert str(sc_compile.report(transformer))
    third = _flux_generate(pipe, embeddings, "inference")
    assert str(sc_compile.report(transformer))
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)
