"""Compile a graph with the inner compiler (Inductor, ``aot_eager`` or none).

The specialised graphs are compiled in a tracing context and fake mode of their own, with fake
inputs of static size (:mod:`sc_compile.backends.shape_specialization`); Dynamo's own graph (the
uncached fallback, a piece of a split forward without blocks) in Dynamo's context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from sc_compile.backends.lowering import SpecializedGraph
from sc_compile.backends.shape_specialization import fake_inputs, static_fake_mode
from sc_compile.config import InnerCompiler
from sc_compile.runtime.dispatch import CompiledStep


def compile_graph(
    gm: torch.fx.GraphModule,
    inputs: Sequence[Any],
    compiler: InnerCompiler,
    config_patches: Mapping[str, Any],
    *,
    own_tracing_context: bool,
) -> Callable[..., Any]:
    """``gm`` compiled by the inner compiler.

    ``own_tracing_context``: compile in a tracing context and fake mode of its own. The
    specialised graphs need it: Dynamo's context holds the metadata and the shape environment of
    the one graph it traced, which neither specialised graph (other inputs, other outputs)
    matches, and symbols added to its shape environment would break Dynamo's guards. Their inputs
    are fakes of static size in a mode whose own shape environment takes the graph's
    data-dependent ops. Dynamo's own graph (the uncached fallback) is compiled in Dynamo's
    context, as any backend does.
    """
    if compiler is InnerCompiler.EAGER:
        return gm
    if not own_tracing_context:
        return _compile_with(gm, list(inputs), compiler, config_patches)
    for node in gm.graph.nodes:
        # Bindings of data-dependent values to the symbols of Dynamo's shape environment: the
        # re-trace below makes its own in its own environment (keeping Dynamo's names collides).
        node.meta.pop("unbacked_bindings", None)
    mode = static_fake_mode()
    with torch._guards.tracing(torch._guards.TracingContext(mode)):
        return _compile_with(gm, fake_inputs(mode, inputs), compiler, config_patches)


def _compile_with(
    gm, inputs: list[Any], compiler: InnerCompiler, config_patches: Mapping[str, Any]
) -> Callable[..., Any]:
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)  # type: ignore[return-value]
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, inputs, config_patches=dict(config_patches))  # type: ignore[return-value]


def compile_inner(
    spec: SpecializedGraph,
    example_inputs: Sequence[Any],
    compiler: InnerCompiler,
    config_patches: Mapping[str, Any],
) -> CompiledStep:
    inputs = [example_inputs[i] for i in spec.input_indices]
    start = time.perf_counter()
    fn = compile_graph(spec.graph_module, inputs, compiler, config_patches, own_tracing_context=True)
    return CompiledStep(fn, spec.input_indices, spec.num_compute_nodes, time.perf_counter() - start)
