"""A model Dynamo does not capture whole is refused with an error that names the real cause.

Graph breaks that make Dynamo compile blocks on their own (a break in a block, diffusers group
offloading), regional compilation and another cache already installed used to surface as "found
no transformer blocks" naming the timestep embedder, or "could not find the timestep input". A
break in the model's own forward (before the head, between blocks) is cached
(``test_graph_breaks.py``); blocks that Dynamo compiles one by one are cached per block under an
explicit clock (``test_block_graphs.py``) and, without one, refused naming the break and the clock.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

import sc_compile
from sc_compile.backends.capture_check import ForeignCacheError
from sc_compile.clock.step_clock import ClockError
from sc_compile.passes.find_blocks import UnsupportedGraphError

from dummy_dit import DummyBlock, DummyDiT
from tiny_models import BUILDERS

OPTIONS = {"compiler": "eager", "warmup_steps": 2}
THIS_FILE = re.escape(__file__)


class BlockWithBreak(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.gain * hidden_states
        torch._dynamo.graph_break()  # BREAK IN BLOCK
        return hidden_states + temb * 0.0


class BreakBeforeHead(DummyDiT):
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        torch._dynamo.graph_break()  # BREAK BEFORE HEAD
        return hidden_states * 2.0


def _move(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states * 1.0 + 0.0


def _prepare(hidden_states: torch.Tensor) -> torch.Tensor:
    for _ in range(1):
        torch._dynamo.graph_break()  # in a loop: Dynamo runs _prepare() in Python
    return _move(hidden_states)


class HelperAfterBreak(DummyDiT):
    """The model calls a helper that Dynamo runs in Python; the function that helper calls is then
    compiled on its own, with no module (diffusers group offloading moving a flex-attention
    BlockMask in its hook does the same: AnyFlow-FAR in benchmarks/diffusers_compile_tests.py)."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        hidden_states = _prepare(hidden_states)
        return super().forward(hidden_states, timestep)


def _line_of(marker: str) -> int:
    with open(__file__) as source:
        for number, line in enumerate(source, 1):
            if marker in line and "_line_of" not in line:
                return number
    raise AssertionError(marker)


def _call(model, *args, backend_options=OPTIONS, **kwargs):
    compiled = torch.compile(model, backend="scalingcache", options=backend_options)
    with torch.no_grad():
        return compiled(*args, **kwargs)


def _unwrap(excinfo) -> BaseException:
    """The backend's own error (Dynamo wraps it in BackendCompilerFailed)."""
    error = excinfo.value
    while not isinstance(error, UnsupportedGraphError):
        assert error.__cause__ is not None or error.__context__ is not None, repr(excinfo.value)
        error = error.__cause__ or error.__context__
    return error


def _clock_error(model, *args, **kwargs) -> str:
    with pytest.raises(ClockError) as excinfo:
        _call(model, *args, **kwargs)
    return str(excinfo.value)


def test_break_in_the_first_block_names_the_break_and_its_line():
    """Dynamo compiles the blocks one by one (cached per block, test_block_graphs.py); without an
    explicit clock the error names the break and the fix."""
    model = DummyDiT()
    model.blocks[0] = BlockWithBreak(1.0)
    message = _clock_error(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    assert re.search(
        rf"graph break: Call to `torch._dynamo.graph_break\(\)` at {THIS_FILE}:{_line_of('BREAK IN BLOCK')}", message
    ), message
    assert "found no transformer blocks" not in message
    assert "sc_compile.enable(pipe)" in message and "fullgraph" not in message


def test_break_in_a_later_block_names_the_model_frame_dynamo_gave_up_on():
    """A break inside a loop makes Dynamo skip the model's forward and compile the blocks one by one."""
    model = DummyDiT()
    model.blocks[1] = BlockWithBreak(0.5)
    message = _clock_error(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    assert "'blocks.0' (DummyBlock) of DummyDiT on its own" in message, message
    assert re.search(r"DummyDiT.forward runs in Python \(it is now at .*dummy_dit.py:\d+\)", message), message


def test_break_before_the_head_is_cached_not_refused():
    model = BreakBeforeHead()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    with torch.no_grad():
        for step in range(6):
            x, t = torch.ones(1, 4, 8) * (6 - step), torch.tensor([1000.0 - step])
            torch.testing.assert_close(compiled(x, t), model(x, t))
    assert sc_compile.report(model).cached_steps, str(sc_compile.report(model))


def test_a_function_compiled_on_its_own_inside_a_compiled_model_runs_as_it_is():
    """It used to be refused as "the compiled module: found no transformer blocks": the function
    is a piece outside the blocks, and the blocks' piece is cached."""
    model = HelperAfterBreak()
    compiled = torch.compile(model, backend="scalingcache", options=OPTIONS)
    outputs = []
    with torch.no_grad():
        for step in range(6):
            x, t = torch.ones(1, 4, 8) * (6 - step), torch.tensor([1000.0 - step])
            outputs.append((compiled(x, t), model(x, t)))
    report = sc_compile.report(model)
    assert report.cached_steps and report.num_steps == 6, str(report)
    for step in report.full_steps:
        torch.testing.assert_close(*outputs[step])


class BlockWritesInput(DummyBlock):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states.mul_(1.0 + self.gain)
        return hidden_states + temb * 0.0


def test_uncacheable_block_graph_with_fallback_runs_uncached_and_warns(caplog):
    model = DummyDiT()
    model.blocks[0] = BlockWritesInput(1.0)
    model.blocks[1] = BlockWithBreak(0.5)  # Dynamo compiles the blocks one by one
    x, t = torch.ones(1, 4, 8) * 3.0, torch.tensor([1.0])
    compiled = torch.compile(model, backend="scalingcache", options={**OPTIONS, "fallback": "inductor"})
    with caplog.at_level(logging.WARNING, logger="sc_compile.backends.scalingcache"), torch.no_grad():
        with sc_compile.generation(compiled, num_inference_steps=1):
            out = compiled(x.clone(), t)
    torch.testing.assert_close(out, model(x.clone(), t))
    warnings = [r.getMessage() for r in caplog.records if "falling back to uncached" in r.getMessage()]
    assert warnings and "writes into its input" in warnings[0] and "'blocks.0'" in warnings[0], warnings


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_without_a_clock_names_the_offloading_hook_and_the_fix(offload_type):
    """Cached per block under an explicit clock (test_block_graphs.py); without one, refused."""
    model, inputs = BUILDERS["flux"](seed=0)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, **extra)
    message = _clock_error(model, **inputs)
    assert re.search(r"one by one \(graph break: .*diffusers/hooks/group_offloading.py:\d+", message), message
    assert "sc_compile.enable(pipe)" in message


def test_regional_compilation_without_a_clock_says_what_it_needs():
    model, inputs = BUILDERS["flux"](seed=0)
    model.compile_repeated_blocks(backend="scalingcache", options=OPTIONS)
    with pytest.raises(ClockError) as excinfo, torch.no_grad():
        model(**inputs)
    message = str(excinfo.value)
    assert "regional compilation of 'transformer_blocks.0' (FluxTransformerBlock)" in message, message
    assert "sc_compile.enable(pipe)" in message


def test_a_block_compiled_on_its_own_and_called_alone_is_refused():
    block = DummyBlock(0.5)
    block.compile(backend="scalingcache", options=OPTIONS)
    # No model's forward runs above it: nothing to tie it to a model, refused as a model without blocks.
    with pytest.raises(Exception, match=r"DummyBlock: found no transformer blocks"), torch.no_grad():
        block(torch.ones(1, 4, 8), torch.zeros(1, 1, 1))


def test_another_diffusers_cache_is_refused():
    from diffusers import FirstBlockCacheConfig

    model, inputs = BUILDERS["flux"](seed=0)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(Exception) as excinfo, model.cache_context("cond"):
        _call(model, **inputs)
    error = _unwrap(excinfo)
    assert isinstance(error, ForeignCacheError)
    assert "FirstBlockCacheConfig" in str(error) and "disable_cache()" in str(error)
    # Once removed, the model compiles and caches as usual.
    model.disable_cache()
    torch._dynamo.reset()
    _call(model, **inputs)


def test_a_whole_model_called_from_a_wrapper_forward_is_not_refused():
    """The diagnosis must not fire on a whole-model graph that runs inside another module's forward."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = DummyDiT()
            self.compiled = torch.compile(self.transformer, backend="scalingcache", options=OPTIONS)

        def forward(self, x, t):
            return self.compiled(x, t)

    wrapper = Wrapper()
    with torch.no_grad():
        for step in range(4):
            out = wrapper(torch.ones(1, 4, 8) * (4 - step), torch.tensor([1000.0 - step]))
    torch.testing.assert_close(out, wrapper.transformer(torch.ones(1, 4, 8), torch.tensor([1.0])))
    assert sc_compile.report(wrapper.transformer).num_steps == 4


def test_a_dynamic_graph_without_blocks_built_in_another_thread_gets_our_error():
    """``dynamic=True`` builds the specialised graph at call time, after Dynamo finished; in a
    thread where Dynamo never traced, reading its (unset) translator used to raise AttributeError."""
    import threading

    from sc_compile.passes.find_blocks import NoBlocksFoundError

    from dummy_dit import NotADiT

    compiled = torch.compile(NotADiT(), backend="scalingcache", dynamic=True, options=OPTIONS)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with torch.no_grad():
                compiled(torch.ones(1, 4, 8), torch.tensor([1.0]))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread below
            errors.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1
    error = getattr(errors[0], "inner_exception", errors[0])
    assert isinstance(error, NoBlocksFoundError), repr(errors[0])
