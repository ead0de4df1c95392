"""A model Dynamo does not capture whole is refused with an error that names the real cause.

Graph breaks (in a block, before the head, from diffusers group offloading), regional compilation
and another cache already installed used to surface as "found no transformer blocks" naming the
timestep embedder, or "could not find the timestep input".
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

import sc_compile
from sc_compile.backends.capture_check import (
    ForeignCacheError,
    GraphBreakError,
    RegionalCompilationError,
)

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
    while not isinstance(error, GraphBreakError | RegionalCompilationError | ForeignCacheError):
        assert error.__cause__ is not None or error.__context__ is not None, repr(excinfo.value)
        error = error.__cause__ or error.__context__
    return error


def test_break_in_the_first_block_names_the_break_and_its_line():
    model = DummyDiT()
    model.blocks[0] = BlockWithBreak(1.0)
    with pytest.raises(Exception) as excinfo:
        _call(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    error = _unwrap(excinfo)
    assert isinstance(error, GraphBreakError)
    message = str(error)
    assert re.search(rf"graph break: Call to `torch._dynamo.graph_break\(\)` at {THIS_FILE}:{_line_of('BREAK IN BLOCK')}", message), message
    assert "found no transformer blocks" not in message
    assert "fullgraph=True" in message and "fallback" in message


def test_break_in_a_later_block_names_the_model_frame_dynamo_gave_up_on():
    """A break inside a loop makes Dynamo skip the model's forward and compile the blocks one by one."""
    model = DummyDiT()
    model.blocks[1] = BlockWithBreak(0.5)
    with pytest.raises(Exception) as excinfo:
        _call(model, torch.ones(1, 4, 8), torch.tensor([1.0]))
    error = _unwrap(excinfo)
    assert isinstance(error, GraphBreakError)
    message = str(error)
    assert "'blocks.0' (DummyBlock) of DummyDiT on its own" in message, message
    assert re.search(r"DummyDiT.forward runs in Python \(it is now at .*dummy_dit.py:\d+\)", message), message


def test_break_before_the_head_names_the_break():
    with pytest.raises(Exception) as excinfo:
        _call(BreakBeforeHead(), torch.ones(1, 4, 8), torch.tensor([1.0]))
    error = _unwrap(excinfo)
    assert isinstance(error, GraphBreakError)
    assert f"{__file__}:{_line_of('BREAK BEFORE HEAD')}" in str(error), str(error)


def test_a_function_compiled_on_its_own_inside_a_compiled_model_names_the_break():
    """It used to be refused as "the compiled module: found no transformer blocks"."""
    with pytest.raises(Exception) as excinfo:
        _call(HelperAfterBreak(), torch.ones(1, 4, 8), torch.tensor([1.0]))
    error = _unwrap(excinfo)
    assert isinstance(error, GraphBreakError)
    message = str(error)
    assert re.search(rf"Dynamo compiled _move\(\) \({THIS_FILE}:\d+\) on its own while the compiled HelperAfterBreak runs", message), message
    assert "found no transformer blocks" not in message


def test_graph_break_with_fallback_runs_uncached_and_warns(caplog):
    model = BreakBeforeHead()
    x, t = torch.ones(1, 4, 8) * 3.0, torch.tensor([1.0])
    with caplog.at_level(logging.WARNING, logger="sc_compile.backends.scalingcache"):
        out = _call(model, x, t, backend_options={**OPTIONS, "fallback": "inductor"})
    torch.testing.assert_close(out, model(x, t))
    warnings = [r.getMessage() for r in caplog.records if "falling back to uncached" in r.getMessage()]
    assert warnings and "graph break" in warnings[0]


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_names_the_offloading_hook(offload_type):
    model, inputs = BUILDERS["flux"](seed=0)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, **extra)
    with pytest.raises(Exception) as excinfo:
        _call(model, **inputs)
    error = _unwrap(excinfo)
    assert isinstance(error, GraphBreakError)
    assert re.search(r"graph break in \w+\(\) at .*diffusers/hooks/group_offloading.py:\d+", str(error)), str(error)


def test_regional_compilation_says_what_it_means_for_scalingcache():
    model, inputs = BUILDERS["flux"](seed=0)
    model.compile_repeated_blocks(backend="scalingcache", options=OPTIONS)
    with pytest.raises(Exception) as excinfo, torch.no_grad():
        model(**inputs)
    error = _unwrap(excinfo)
    assert isinstance(error, RegionalCompilationError)
    message = str(error)
    assert "'transformer_blocks.0' of FluxTransformer2DModel" in message
    assert "torch.compile(model, backend='scalingcache')" in message
    assert "timestep input" not in message


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
