"""Specialise a graph Dynamo traced with symbolic sizes to the sizes of one call.

The cache buffers need static shapes, so a dynamic-shape graph (``dynamic=True``, or Dynamo's
automatic dynamic shapes after a size changed) is specialised per distinct set of input sizes
before the cache passes run on it: size expressions are folded into constants and the metadata is
propagated anew with static fake inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from sc_compile.passes.find_blocks import input_size_symbols
from sc_compile.passes.find_timestep_input import source_name

log = logging.getLogger(__name__)


def static_fake_mode() -> Any:
    """A fake mode of our own whose shape environment gives the graph's data-dependent values
    (``nonzero``, boolean-mask indexing, ``.item()``) symbols of their own, as Dynamo's did when it
    captured them. Without one, re-tracing a graph Dynamo captured whole fails on the first such op
    (``DynamicOutputShapeException``, ``DataDependentOutputException``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True, allow_dynamic_output_shape_ops=True))


def fake_inputs(mode: Any, inputs: Sequence[Any]) -> list[Any]:
    """``inputs`` as fake tensors of ``mode`` with static sizes (other values as they are)."""
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether Dynamo traced ``gm`` with symbolic input sizes (``dynamic=True`` or automatic
    dynamic shapes). The symbols of data-dependent ops (``nonzero``) and of float inputs
    (``.item()`` of a LoRA scale) are not sizes: such a graph is static and needs no
    specialisation."""
    return any(
        input_size_symbols(node.meta.get("example_value")) for node in gm.graph.nodes if node.op == "placeholder"
    )


def _concrete(value: Any, shape_env: Any, bindings: Mapping[Any, int]) -> int | float | bool | None:
    """The value of a symbolic size expression under ``bindings``; ``None`` if it is not fixed by
    the input sizes (a data-dependent value)."""
    if not isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return None
    expr = shape_env.replace(value.node.expr)
    if not expr.free_symbols <= bindings.keys():
        return None
    result = expr.xreplace(dict(bindings))
    if isinstance(value, torch.SymBool):
        return bool(result)
    return int(result) if isinstance(value, torch.SymInt) else float(result)


class _FakePropagator(torch.fx.Interpreter):
    """Records every node's fake value (``example_value``) for fake inputs of static size."""

    def __init__(self, gm: torch.fx.GraphModule, mode: Any):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, node: torch.fx.Node) -> Any:
        with self.mode:
            result = super().run_node(node)
        if node.op != "output":
            node.meta["example_value"] = result
            node.meta.pop("val", None)
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value


def specialize_to_inputs(gm: torch.fx.GraphModule, args: Sequence[Any]) -> torch.fx.GraphModule:
    """A copy of a symbolic-size Dynamo graph with every size fixed to those of ``args``.

    Symbols are bound to the sizes of ``args`` with Dynamo's shape environment; every size input
    and every size expression they fix is folded into a constant, and so is ``.item()`` of a
    global constant tensor (a function default Dynamo lifted as an input, such as RoPE's theta).
    Values computed from tensor data (the unbacked symbols of ``nonzero`` or ``.item()`` on a
    float input, a LoRA scale, a norm's eps) are never folded. The metadata is then propagated
    anew with fake inputs of static size in a fake mode of our own; no tensor data is computed
    (a real run cannot record every view: ``view_as_complex`` of a reshaped view fails to fake).
    """
    from sc_compile.passes.pass_manager import copy_graph_module

    static = copy_graph_module(gm)
    placeholders = [n for n in static.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise RuntimeError(f"the graph has {len(placeholders)} inputs but was called with {len(args)}")
    values = [n.meta.get("example_value") for n in placeholders]
    shape_env = next(
        (s.node.shape_env for v in values for s in _symbolic_parts(v)),
        None,
    )
    assert shape_env is not None, "specialize_to_inputs needs a graph with symbolic input sizes"
    bindings = shape_env.bind_symbols([v if isinstance(v, torch.Tensor | torch.SymInt) else None for v in values], args)
    argument = dict(zip(placeholders, args, strict=True))
    folded: dict[torch.fx.Node, Any] = {}
    for node in static.graph.nodes:
        value = node.meta.get("example_value")
        concrete = _concrete(value, shape_env, bindings)
        if concrete is None and _is_global_constant_item(node):
            concrete = argument[node.args[0]].item()  # type: ignore[index]
        if concrete is not None:
            folded[node] = concrete
    for node, concrete in folded.items():
        for user in list(node.users):
            user.replace_input_with(node, concrete)  # type: ignore[arg-type]
    for node in reversed(list(static.graph.nodes)):
        if node in folded and node.op != "placeholder" and not node.users:
            static.graph.erase_node(node)
    static.graph.lint()
    static.recompile()
    mode = static_fake_mode()
    with torch.no_grad():
        _FakePropagator(static, mode).run(*fake_inputs(mode, args))
    return static


def _symbolic_parts(value: Any) -> list[Any]:
    if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
        return [value]
    if isinstance(value, torch.Tensor):
        return [s for s in (*value.shape, *value.stride()) if isinstance(s, torch.SymInt)]
    return []


def _is_global_constant_item(node: torch.fx.Node) -> bool:
    """``.item()`` of a global constant tensor (a function default Dynamo lifted as an input),
    never of a user input, a module attribute or a parameter."""
    if not (node.op == "call_method" and node.target == "item"):
        return False
    source = node.args[0]
    return isinstance(source, torch.fx.Node) and source.op == "placeholder" and source_name(source).startswith("G[")


class ShapeSpecializingRuntime:
    """ScalingCache for a graph Dynamo traced with dynamic sizes.

    Dynamo marks a size dynamic after it changes (automatic dynamic shapes: a second resolution or
    batch size). The cache buffers need static shapes, so each distinct set of input sizes gets
    its own static specialisation, built by the backend's pipeline on its first call and logged;
    the Dynamo graph stays one.
    """

    def __init__(
        self, gm: torch.fx.GraphModule, build: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable[..., Any]]
    ):
        # build(static graph, inputs): the backend's pipeline (passes, lowering, runtime) for it.
        self.gm = gm
        self.build = build
        self.by_sizes: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a if isinstance(a, int) else None for a in args)
        runtime = self.by_sizes.get(key)
        if runtime is None:
            log.info("ScalingCache: specialising a dynamic-shape graph to sizes %s", [k for k in key if k is not None])
            static = specialize_to_inputs(self.gm, args)
            runtime = self.build(static, args)
            self.by_sizes[key] = runtime
        return runtime(*args)
