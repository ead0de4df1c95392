"""The backend copes with what Dynamo captures: data-dependent output shapes, float inputs,
symbolic sizes under every inner compiler, complex RoPE at a second resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sc_compile
import sc_compile.runtime.dispatch

from tiny_models import BUILDERS, timesteps, with_timestep


class MaskedBlock(nn.Module):
    """A residual block that reads a data-dependent selection of its tokens (``x[:, mask]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: [B, S, 8]; the number of selected tokens depends on the data (an unbacked size).
        selected = x[:, torch.where(x[0, :, 0] > 0)[0]]  # [B, n, 8]
        return x + 0.1 * self.proj(x) + 0.01 * selected.sum(1, keepdim=True) + temb * 0.0


class ScaledBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, scale: float) -> torch.Tensor:
        return x + scale * self.proj(x) + temb * 0.0


class TinyDiT(nn.Module):
    """Three residual blocks and a head; ``scale`` (a float, as a LoRA scale) reaches every block
    through arithmetic done once before them."""

    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(3))
        self.head = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        for block in self.blocks:
            if scale is None:
                hidden_states = block(hidden_states, temb)
            else:
                hidden_states = block(hidden_states, temb, scale * 0.5)
        return self.head(hidden_states)


def _model(block: type[nn.Module]) -> TinyDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyDiT(block).eval()


def _run(compiled, model, calls):
    """Run ``calls`` (argument tuples, one generation per timestep run) through both models."""
    outputs = []
    with torch.no_grad():
        for args in calls:
            outputs.append((compiled(*args), model(*args)))
    return outputs


def _check_full_steps_exact(model, outputs, first_step: int = 0):
    report = sc_compile.report(model)
    assert report.num_steps == len(outputs) - first_step, str(report)
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        ours, eager = outputs[first_step + step]
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    return report


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_data_dependent_output_shape_inside_a_block(compiler):
    """``x[:, torch.where(mask)[0]]`` in every block: Dynamo captures it whole with an unbacked
    size; the passes keep it symbolic (never folded into one step's count) and the specialised
    graphs are traced with a shape environment that takes it."""
    model = _model(MaskedBlock)
    compiled = torch.compile(
        model, backend="scalingcache", fullgraph=True, options={"compiler": compiler, "warmup_steps": 2}
    )
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, 8, generator=generator)
    counts = []
    calls = []
    for step in range(8):
        # A slowly moving input whose sign pattern (the selected count) changes between steps.
        hidden = base + 0.3 * step * torch.randn(1, 16, 8, generator=generator) / 8
        counts.append(int((hidden[0, :, 0] > 0).sum()))
        calls.append((hidden, torch.tensor([1000.0 - 100 * step])))
    assert len(set(counts)) > 1  # the data-dependent size really changes within the generation
    outputs = _run(compiled, model, calls)
    _check_full_steps_exact(model, outputs)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_float_input_changes_within_and_across_generations(compiler):
    """A float forward argument (a LoRA scale) that changes: Dynamo makes it an input after its
    second value; it must stay an input of the specialised graphs (no recompile per value beyond
    plain torch.compile's), and every full step must match eager at that step's value."""
    model = _model(ScaledBlock)
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))
    generations = [
        [1.0] * 6,  # one value: Dynamo specialises on it
        [0.5] * 6,  # a second value: the float becomes a graph input
        [0.25] * 6,
        # Changing within a generation. (Not through 1.0: Dynamo's first graph is specialised to
        # it, and a generation that moves between two graphs of one module is the step clock's
        # business, not this test's.)
        [0.9 - 0.1 * i for i in range(6)],
    ]
    calls = [
        (x * (1.0 - 0.05 * step), torch.tensor([1000.0 - 100 * step]), scale)
        for scales in generations
        for step, scale in enumerate(scales)
    ]
    counters = torch._dynamo.utils.counters
    counters.clear()
    plain = torch.compile(model, backend=compiler)
    with torch.no_grad():
        for args in calls:
            plain(*args)
    plain_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": compiler, "warmup_steps": 2})
    outputs = []
    with torch.no_grad():
        for index, args in enumerate(calls):
            outputs.append((compiled(*args), model(*args)))
            if index % 6 == 5:
                generation = index // 6
                _check_full_steps_exact(model, outputs, first_step=generation * 6)
    assert counters["stats"]["unique_graphs"] == plain_graphs == 2


def test_lora_scale_and_adapters_through_diffusers():
    """diffusers LoRA on Flux: ``joint_attention_kwargs={'scale': s}`` per call, set_adapters with
    weights, fuse and unfuse; full steps equal eager throughout."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs = BUILDERS["flux"](seed=0)
    for name in ("first", "second"):
        model.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
            adapter_name=name,
        )
    model.set_adapters(["first"])
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "aot_eager", "warmup_steps": 2})

    def generation(scale=None):
        outputs = []
        with torch.no_grad():
            for step, t in enumerate(timesteps("flux", 6)):
                kwargs = {} if scale is None else {"joint_attention_kwargs": {"scale": scale(step)}}
                step_inputs = with_timestep("flux", inputs, t)
                ours = compiled(**step_inputs, **kwargs)[0]
                kwargs = {} if scale is None else {"joint_attention_kwargs": {"scale": scale(step)}}
                outputs.append((ours, model(**step_inputs, **kwargs)[0]))
        _check_full_steps_exact(model, outputs)
        return outputs

    generation(lambda step: 1.0)
    generation(lambda step: 0.5)
    scaled = generation(lambda step: 0.9 - 0.1 * step)  # not through 1.0 (see the test above)
    model.set_adapters(["first", "second"], [0.5, 0.7])
    mixed = generation()
    # The adapters really change the output (the checks above compare something that moves).
    assert not torch.allclose(scaled[0][1], mixed[0][1])
    model.fuse_lora(lora_scale=0.5)
    generation()
    model.unfuse_lora()
    generation()


def _flux_at(tokens: int, seed: int = 0):
    _, inputs = BUILDERS["flux"](seed=seed)
    inputs["hidden_states"] = torch.randn(1, tokens, 8, generator=torch.Generator().manual_seed(seed))
    inputs["img_ids"] = torch.zeros(tokens, 3)
    return inputs


def _dynamic_generations(compiler: str, sizes: tuple[int, ...], steps: int):
    model, _ = BUILDERS["flux"](seed=0)
    compiled = torch.compile(
        model, backend="scalingcache", dynamic=True, options={"compiler": compiler, "warmup_steps": 2}
    )
    counters = torch._dynamo.utils.counters
    counters.clear()
    for tokens in sizes:
        inputs = _flux_at(tokens)
        outputs = []
        with torch.no_grad():
            for t in timesteps("flux", steps):
                step_inputs = with_timestep("flux", inputs, t)
                outputs.append((compiled(**step_inputs)[0], model(**step_inputs)[0]))
        _check_full_steps_exact(model, outputs)
    assert counters["stats"]["unique_graphs"] == 1


def test_dynamic_true_with_aot_eager():
    """dynamic=True: float attributes (norm eps, dropout p) arrive as tensors with ``.item()``;
    the specialisation keeps them inputs and aot_autograd traces them with a shape environment."""
    _dynamic_generations("aot_eager", (16, 36), 5)


@pytest.mark.slow
def test_dynamic_true_with_inductor():
    _dynamic_generations("inductor", (16,), 5)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_complex_rope_at_two_resolutions(compiler):
    """QwenImage applies RoPE through ``view_as_complex`` inside its blocks; the second resolution
    makes the graph dynamic, and its specialisation used to fail faking the complex view."""
    model, inputs = BUILDERS["qwen_image"](seed=0)
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": compiler, "warmup_steps": 2})
    for height, width in ((4, 4), (6, 4), (8, 6)):
        step_inputs = dict(inputs)
        step_inputs["hidden_states"] = torch.randn(
            1, height * width, 16, generator=torch.Generator().manual_seed(height)
        )
        step_inputs["img_shapes"] = [[(1, height, width)]]
        outputs = []
        with torch.no_grad():
            for t in timesteps("qwen_image", 5):
                call = with_timestep("qwen_image", step_inputs, t)
                outputs.append((compiled(**call)[0], model(**call)[0]))
        _check_full_steps_exact(model, outputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """A bf16 / fp16 model: the buffers keep the model's dtype (the sketches float32), full steps
    equal eager to half-precision rounding, cached steps happen."""
    model, inputs = BUILDERS["wan"](seed=0)
    model = model.to(dtype)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "aot_eager", "warmup_steps": 2})
    outputs = []
    with torch.no_grad():
        for t in timesteps("wan", 6):
            step_inputs = with_timestep("wan", inputs, t)
            step_inputs["timestep"] = step_inputs["timestep"].to(dtype)
            outputs.append((compiled(**step_inputs)[0], model(**step_inputs)[0]))
    report = sc_compile.report(model)
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        ours, eager = outputs[step]
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, eager)  # the dtype's default tolerances
    layout = sc_compile.runtime.dispatch.latest_runtime(model).layout
    assert all(p.dtype == dtype for p in layout.points)


def test_lora_hotswap_and_unload_through_diffusers(tmp_path):
    """diffusers LoRA hot-swap (``enable_lora_hotswap`` before compiling, then
    ``load_lora_adapter(..., hotswap=True)``: new weights in the same tensors) and ``unload_lora``:
    full steps equal eager with each, cached steps happen."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, inputs = BUILDERS["flux"](seed=0)
    states = []
    for seed in (1, 2):
        donor, _ = BUILDERS["flux"](seed=0)
        torch.manual_seed(seed)
        donor.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
        )
        states.append({f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()})
    model.enable_lora_hotswap(target_rank=4)
    model.load_lora_adapter(states[0], prefix="transformer", adapter_name="swap")
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "aot_eager", "warmup_steps": 2})

    def generation():
        outputs = []
        with torch.no_grad():
            for t in timesteps("flux", 6):
                step_inputs = with_timestep("flux", inputs, t)
                outputs.append((compiled(**step_inputs)[0], model(**step_inputs)[0]))
        _check_full_steps_exact(model, outputs)
        return outputs

    first = generation()
    model.load_lora_adapter(states[1], prefix="transformer", adapter_name="swap", hotswap=True)
    swapped = generation()
    assert not torch.allclose(first[0][1], swapped[0][1])  # the swap changed the model
    model.unload_lora()
    generation()


@pytest.mark.slow
def test_inductor_max_autotune_no_cudagraphs_mode():
    """``mode="max-autotune-no-cudagraphs"`` with ScalingCache options (``torch.compile`` takes
    ``mode`` or ``options``, not both: ``sc_compile.compile`` passes both to the backend)."""
    model, inputs = BUILDERS["wan"](seed=0)
    compiled = sc_compile.compile(
        model, sc_compile.ScalingCacheConfig(warmup_steps=2), mode="max-autotune-no-cudagraphs"
    )
    outputs = []
    with torch.no_grad():
        for t in timesteps("wan", 6):
            step_inputs = with_timestep("wan", inputs, t)
            outputs.append((compiled(**step_inputs)[0], model(**step_inputs)[0]))
    report = sc_compile.report(model)
    assert report.cached_steps, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(*outputs[step], rtol=1e-4, atol=1e-5)  # Inductor's kernels, not eager's
