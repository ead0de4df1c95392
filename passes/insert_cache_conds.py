"""Rewrite every block into a ``torch.cond`` between its real computation and the prediction.

For block ``l`` with cache points ``p`` the pass emits::

    outputs_l = torch.ops.higher_order.cond(
        sc_is_full, sc_full_<block>, sc_cached_<block>,
        (block inputs..., sc_y_full_p, sc_dy_p for p in the block..., sc_coef, sc_refresh, sc_stats))

The *full* branch is the block itself followed by the cache update of each of its points: the
change statistics the host decides with, written into ``sc_stats[p]``; the refreshed difference
estimate of SPEC §1 (paper eq. 6), ``dy <- (y - y_full) * sc_refresh[p]``; and ``y_full <- y``. The
*cached* branch is the closed-form prediction ``y_full + sc_coef[p] * dy``. The state tensors are new
graph inputs (the runtime owns them, one set per stream); the lowering specialises the predicate.

``sc_stats[p]`` holds, in float32, for the value ``prev = y_full + sc_coef[p] * dy`` the previous
step had: ``[|y - prev|_1, |prev|_1, |dy_new|_1, |y|_1]``: the step's relative change and the change
a later cached step will make (``sc_compile.contract.STAT_COLUMNS``).

A point that no cached step reads (its prediction reaches the model output through no path that a
cached step runs: :func:`read_at_cached_step`) keeps, with ``statistic="subsample"`` (the
default), a *sketch* instead of full buffers: a fixed strided subsample of its elements in
float32 (:func:`sc_compile.contract.sketch_plan`). Its full branch updates the sketch buffers and
its statistics row from the subsample exactly as it would from the full value; its cached branch
has no prediction to give, and returns a zero tensor tagged :data:`UNPREDICTED_META_KEY` that the
lowering checks no cached-step graph keeps.

With ``prediction="residual"`` the buffers hold ``r = y - a`` instead of ``y``, where the *anchor*
``a`` is the point's value with every residual branch of its block removed: the block input
carried along the residual stream through the skip connections and the stream's casts, views,
slices and ``cat`` (Flux's single blocks join and split their two streams). Both branches rebuild
the anchor from the block inputs; the statistics are taken on ``r``; the cached branch returns
``a + r_full + sc_coef[p] * dr``.

With ``second_order=True`` (an α table whose two-difference coefficients are in use) each point
has a third buffer ``sc_dy_prev_p``, the difference before last, and the cond takes a second
coefficient vector ``sc_coef2`` after ``sc_refresh``: the full branch shifts ``dy`` into
``dy_prev`` before refreshing it (and measures its change against
``y_full + sc_coef[p] * dy + sc_coef2[p] * dy_prev``), the cached branch predicts
``y_full + sc_coef[p] * dy + sc_coef2[p] * dy_prev``. Without it the graph is the two-buffer one.
"""

from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.config import Prediction
from sc_compile.contract import (
    COEF,
    COEF2,
    IS_FULL,
    REFRESH,
    STAT_COLUMNS,
    STATS,
    CachePointSpec,
    Sketch,
    Statistic,
    dy_name,
    dy_prev_name,
    sketch_plan,
    stats_row,
    y_full_name,
)
from sc_compile.errors import UnsupportedGraphError
from sc_compile.passes.choose_cache_points import replay_nodes
from sc_compile.passes.find_residual_outputs import (
    bias_add_carrier,
    is_add,
    is_cast,
    skip_operand,
    stream_inputs,
)
from sc_compile.passes.layout import (
    ANALYSIS_META_KEYS,
    POINT_SPEC_META_KEY,
    TIMESTEP_META_KEY,
    BlockInfo,
    blocks_of,
    example_value,
    required_tensor_meta,
    tensor_meta,
)

# Set on the stand-in value a sketched point's cached branch returns (the point's index).
UNPREDICTED_META_KEY = "sc_unpredicted_point"


def _fake_mode(gm: torch.fx.GraphModule):
    """A fake mode of our own for the new inputs' metadata: Dynamo's has a shape environment
    whose guards must not learn about tensors Dynamo never saw."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _set_example(node: torch.fx.Node, value: object) -> None:
    node.meta["example_value"] = value
    node.meta["val"] = value


def _new_placeholder(graph: torch.fx.Graph, name: str, example: torch.Tensor, fake_mode) -> torch.fx.Node:
    node = graph.placeholder(name)
    node._dynamo_source = None  # type: ignore[attr-defined]
    node.meta["tensor_dict"] = {}
    fake = fake_mode.from_tensor(example, static_shapes=True) if fake_mode is not None else example
    _set_example(node, fake)
    return node


def _block_attr_name(prefix: str, block: str) -> str:
    return f"sc_{prefix}_" + re.sub(r"\W", "_", block)


def read_at_cached_step(blocks: list[BlockInfo], graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The cache points whose predictions a cached step reads (``prediction="hidden"``).

    Walks back from the graph output the way the cached-step graph computes it: a node outside
    the blocks reads its inputs; a block output that is a cache point is that point's prediction;
    any other block output is replayed from the block's points and inputs (as the cached branch
    does), so the points and the outside values the replay reads are read in turn.
    """
    owner = {member: block for block in blocks for member in block.members}
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    read: set[torch.fx.Node] = set()
    seen: set[torch.fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        block = owner.get(node)
        if block is None:
            stack.extend(node.all_input_nodes)
            continue
        points, members = set(block.cache_points), set(block.members)
        if node in points:
            read.add(node)
            continue
        needed = replay_nodes(node, points, members)
        if needed is None:
            raise RuntimeError(
                f"block {block.name!r}: output {node.name!r} is neither a cache point nor derived from one"
            )
        for member in needed:
            for source in member.all_input_nodes:
                if source in points:
                    read.add(source)
                elif source not in members:
                    stack.append(source)
    return read


class _BranchBuilder:
    """Builds one cond branch as a standalone GraphModule over the cond operands."""

    def __init__(self, operands: list[torch.fx.Node]):
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        for operand in operands:
            placeholder = self.graph.placeholder(operand.name)
            placeholder.meta = dict(operand.meta)
            self.env[operand] = placeholder

    def copy(self, node: torch.fx.Node) -> torch.fx.Node:
        new = self.graph.node_copy(node, lambda n: self.env[n])
        self.env[node] = new
        return new

    def fn(self, target, *args, **kwargs) -> torch.fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def method(self, name: str, *args) -> torch.fx.Node:
        return self.graph.call_method(name, args)

    def finish(self, outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
        self.graph.output(tuple(outputs))
        self.graph.lint()
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


PREDICTIONS = ("hidden", "residual")


def _anchor(
    b: _BranchBuilder,
    node: torch.fx.Node,
    block: BlockInfo,
    members: set[torch.fx.Node],
    memo: dict[torch.fx.Node, torch.fx.Node],
) -> torch.fx.Node:
    """Emit into ``b`` the value of ``node`` with the block's residual branches removed (its anchor)."""
    if node not in members:
        return b.env[node]
    if node in memo:
        return memo[node]
    if is_add(node):
        carrier = skip_operand(node, members) or bias_add_carrier(node, members)
        if carrier is not None:
            memo[node] = _anchor(b, carrier, block, members, memo)
            return memo[node]
    carried = stream_inputs(node)
    if is_cast(node) and carried:
        # A cast's other arguments (``type_as(other)``) only name a dtype: cast to the node's own.
        memo[node] = b.method("to", _anchor(b, carried[0], block, members, memo), required_tensor_meta(node).dtype)
        return memo[node]
    others = [a for a in node.all_input_nodes if a in members and a not in carried]
    if not carried or others:
        raise UnsupportedGraphError(
            f"prediction='residual': in block {block.name!r} the residual stream passes through "
            f"{node.format_node()}, which is not a residual add, cast, view, slice or cat, so the block "
            "input under the cache point cannot be rebuilt cheaply. Use prediction='hidden' (the default)."
        )

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        return _anchor(b, a, block, members, memo) if a in members else b.env[a]

    memo[node] = b.graph.node_copy(node, arg)
    return memo[node]


def _contiguous(builder: _BranchBuilder, node: torch.fx.Node, original: torch.fx.Node) -> torch.fx.Node:
    """Cond branches must agree on strides: the prediction is contiguous, so the real value is too."""
    meta = tensor_meta(original)
    if meta is not None and not meta.is_contiguous():
        return builder.graph.call_method("clone", (node,), {"memory_format": torch.contiguous_format})
    return node


# A point's buffers as graph operands: (y_full, dy, index, sketch or None, dy_prev or None).
PointBuffers = tuple[torch.fx.Node, torch.fx.Node, int, Sketch | None, torch.fx.Node | None]


def _point_operands(buffers: PointBuffers) -> list[torch.fx.Node]:
    """A point's buffers in cond operand order: ``y_full``, ``dy`` (, ``dy_prev``)."""
    y_full, dy, _, _, dy_prev = buffers
    return [y_full, dy] if dy_prev is None else [y_full, dy, dy_prev]


def _second_term(
    b: _BranchBuilder, value: torch.fx.Node, dy_prev: torch.fx.Node | None, coef2: torch.fx.Node | None, index: int
) -> torch.fx.Node:
    """``value + coef2[index] * dy_prev`` (``value`` itself for a first-order graph)."""
    if dy_prev is None or coef2 is None:
        return value
    coef2_p = b.fn(operator.getitem, b.env[coef2], index)
    return b.fn(operator.add, value, b.fn(operator.mul, dy_prev, coef2_p))


def _full_branch(
    block: BlockInfo,
    operands: list[torch.fx.Node],
    buffers: dict[torch.fx.Node, PointBuffers],
    coef: torch.fx.Node,
    refresh: torch.fx.Node,
    stats: torch.fx.Node,
    prediction: Prediction,
    coef2: torch.fx.Node | None = None,
) -> torch.fx.GraphModule:
    b = _BranchBuilder(operands)
    for member in block.members:
        b.copy(member)
    writes: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    members = set(block.members)
    memo: dict[torch.fx.Node, torch.fx.Node] = {}
    for point in block.cache_points:
        y_full_op, dy_op, index, sketch, dy_prev_op = buffers[point]
        y_full, dy = b.env[y_full_op], b.env[dy_op]
        dy_prev = b.env[dy_prev_op] if dy_prev_op is not None else None
        if sketch is not None:
            # The subsample, a view of the (contiguous) value: no full-size temporary.
            flat = b.method("reshape", b.env[point], -1)
            observed = b.method("float", b.fn(operator.getitem, flat, slice(None, sketch.stop, sketch.stride)))
            value32, stored = observed, observed
        else:
            value32 = b.method("float", b.env[point])
            stored = b.env[point]
        if prediction == "residual":
            anchor = _anchor(b, point, block, members, memo)
            value32 = b.fn(operator.sub, value32, b.method("float", anchor))
            stored = b.method("to", value32, required_tensor_meta(point).dtype)
        y_full32 = b.method("float", y_full)
        dy32 = b.method("float", dy)
        coef_p = b.fn(operator.getitem, b.env[coef], index)
        refresh_p = b.fn(operator.getitem, b.env[refresh], index)
        prev = b.fn(operator.add, y_full32, b.fn(operator.mul, dy32, coef_p))
        prev = _second_term(b, prev, b.method("float", dy_prev) if dy_prev is not None else None, coef2, index)
        change = b.fn(operator.sub, value32, prev)
        new_dy = b.fn(operator.mul, b.fn(operator.sub, value32, y_full32), refresh_p)

        def l1(x: torch.fx.Node) -> torch.fx.Node:
            return b.method("sum", b.method("abs", x))

        row = b.fn(
            torch.stack,
            stats_row(change_l1=l1(change), prev_l1=l1(prev), next_change_l1=l1(new_dy), value_l1=l1(value32)),
        )
        b.fn(torch.ops.aten.copy_.default, b.fn(torch.ops.aten.select.int, b.env[stats], 0, index), row)
        buffer_dtype = torch.float32 if sketch is not None else required_tensor_meta(point).dtype
        if dy_prev is not None:
            # The difference before last: the dy this step replaces, as a computed value. Inductor
            # (torch 2.13) writes a mutated input whose new value is another input, or a clone of
            # one, from that input after its own update: dy_prev would get the new dy. -(-dy) is dy
            # exactly (negation is exact) and is a kernel's value (tests/test_second_order_predictor.py
            # checks the shift under Inductor).
            writes.append((dy_prev, b.fn(operator.neg, b.fn(operator.neg, dy))))
        writes.append((dy, b.method("to", new_dy, buffer_dtype)))
        writes.append((y_full, stored))
    # Every read of the old buffers above happens before the first write below.
    for destination, source in writes:
        b.fn(torch.ops.aten.copy_.default, destination, source)
    return b.finish([_contiguous(b, b.env[o], o) for o in block.outputs])


def _cached_branch(
    block: BlockInfo,
    operands: list[torch.fx.Node],
    buffers: dict[torch.fx.Node, PointBuffers],
    coef: torch.fx.Node,
    prediction: Prediction,
    coef2: torch.fx.Node | None = None,
) -> torch.fx.GraphModule:
    b = _BranchBuilder(operands)
    points = set(block.cache_points)
    members = set(block.members)
    memo: dict[torch.fx.Node, torch.fx.Node] = {}
    # Anchors first, from the block inputs alone (before any point's prediction enters b.env).
    anchors = {p: _anchor(b, p, block, members, memo) for p in block.cache_points} if prediction == "residual" else {}
    for point in block.cache_points:
        y_full_op, dy_op, index, sketch, dy_prev_op = buffers[point]
        meta = required_tensor_meta(point)
        if sketch is not None:
            # No cached step reads this point (read_at_cached_step): a typed stand-in that the
            # lowering checks is gone from every cached-step graph.
            stand_in = b.fn(torch.zeros, tuple(meta.shape), dtype=meta.dtype, device=meta.device)
            stand_in.meta[UNPREDICTED_META_KEY] = index
            b.env[point] = stand_in
            continue
        coef_p = b.fn(operator.getitem, b.env[coef], index)
        # y_t = y_full + c_t * dy: the closed form of the paper's recursion, no buffer writes. The
        # cast back to the point's dtype matters when the buffers have another (cache_dtype).
        value = b.fn(operator.add, b.env[y_full_op], b.fn(operator.mul, b.env[dy_op], coef_p))
        value = _second_term(b, value, b.env[dy_prev_op] if dy_prev_op is not None else None, coef2, index)
        if prediction == "residual":
            value = b.fn(operator.add, anchors[point], value)
        b.env[point] = b.method("to", value, meta.dtype)
    for output in block.outputs:
        if output in points:
            continue
        needed = set(replay_nodes(output, points, members) or ())
        for member in block.members:
            if member in needed and member not in b.env:
                b.copy(member)
    return b.finish([_contiguous(b, b.env[o], o) for o in block.outputs])


def insert_cache_conds(
    gm: torch.fx.GraphModule,
    prediction: Prediction | str = Prediction.HIDDEN,
    statistic: Statistic | str = Statistic.SUBSAMPLE,
    second_order: bool = False,
) -> PassResult:
    """Rewrite each block the analyses marked into a cond over new state inputs; mark each cache
    point's ``y_full`` input with the point's :class:`~sc_compile.contract.CachePointSpec`.
    ``second_order``: each point keeps the difference before last too (module docstring)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, but got {prediction!r}")
    prediction, statistic = Prediction(prediction), Statistic(statistic)
    blocks = blocks_of(gm)
    graph = gm.graph
    fake_mode = _fake_mode(gm)
    points = [point for block in blocks for point in block.cache_points]
    if not points:
        raise RuntimeError(
            "no cache point is marked: find_blocks found no block with outputs, or find_residual_outputs "
            "and choose_cache_points did not run"
        )
    # With residual prediction every block's prediction adds to the one before it: a cached step
    # reads every point.
    read = set(points) if prediction == "residual" else read_at_cached_step(blocks, graph)

    specs: list[CachePointSpec] = []
    for block in blocks:
        for point in block.cache_points:
            meta = required_tensor_meta(point)
            shape = tuple(int(s) for s in meta.shape)
            sketch = None
            if point not in read and statistic is Statistic.SUBSAMPLE:
                sketch = sketch_plan(math.prod(shape), meta.dtype.itemsize, shape[-1] if shape else 1)
            specs.append(
                CachePointSpec(
                    index=len(specs),
                    block=block.name,
                    node_name=point.name,
                    shape=shape,
                    dtype=meta.dtype,
                    feeds_output=point in read,
                    sketch=sketch,
                )
            )
    device = required_tensor_meta(blocks[-1].cache_points[0]).device
    num_points = len(specs)

    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    buffers: dict[torch.fx.Node, PointBuffers] = {}
    with graph.inserting_after(last_placeholder):
        # inserting_after keeps inserting at the same spot, so create in reverse order.
        stats = _new_placeholder(graph, STATS, torch.empty(num_points, len(STAT_COLUMNS), device=device), fake_mode)
    with graph.inserting_before(stats):
        is_full = _new_placeholder(graph, IS_FULL, torch.empty((), dtype=torch.bool, device=device), fake_mode)
        for point, spec in zip(points, specs, strict=True):
            empty = torch.empty(spec.buffer_shape(), dtype=spec.buffer_dtype(None), device=device)
            y_full = _new_placeholder(graph, y_full_name(spec.index), empty, fake_mode)
            y_full.meta[POINT_SPEC_META_KEY] = spec
            dy = _new_placeholder(graph, dy_name(spec.index), empty, fake_mode)
            dy_prev = _new_placeholder(graph, dy_prev_name(spec.index), empty, fake_mode) if second_order else None
            buffers[point] = (y_full, dy, spec.index, spec.sketch, dy_prev)
        coef = _new_placeholder(graph, COEF, torch.empty(num_points, device=device), fake_mode)
        refresh = _new_placeholder(graph, REFRESH, torch.empty(num_points, device=device), fake_mode)
        coef2 = None
        if second_order:
            coef2 = _new_placeholder(graph, COEF2, torch.empty(num_points, device=device), fake_mode)

    # Outputs of rewritten blocks are replaced by the cond's results; later blocks read those.
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    branches: list[torch.fx.GraphModule] = []
    for block in blocks:
        inputs = [replaced.get(n, n) for n in block.inputs]
        member_set = set(block.members)
        point_buffers = [t for p in block.cache_points for t in _point_operands(buffers[p])]
        operands = inputs + point_buffers + [coef, refresh, *([coef2] if coef2 is not None else []), stats]
        full_gm = _full_branch(block, operands, buffers, coef, refresh, stats, prediction, coef2)
        cached_gm = _cached_branch(block, operands, buffers, coef, prediction, coef2)
        full_name, cached_name = _block_attr_name("full", block.name), _block_attr_name("cached", block.name)
        gm.add_submodule(full_name, full_gm)
        gm.add_submodule(cached_name, cached_gm)
        branches += [full_gm, cached_gm]
        with graph.inserting_before(block.members[0]):
            true_attr = graph.get_attr(full_name)
            false_attr = graph.get_attr(cached_name)
            cond = graph.call_function(torch.ops.higher_order.cond, (is_full, true_attr, false_attr, tuple(operands)))
            _set_example(cond, tuple(example_value(o) for o in block.outputs))
            results = []
            for k, output in enumerate(block.outputs):
                result = graph.call_function(operator.getitem, (cond, k))
                result.meta = dict(output.meta)
                results.append(result)

        def outside(user: torch.fx.Node, members: set[torch.fx.Node] = member_set) -> bool:
            return user not in members

        for output, result in zip(block.outputs, results, strict=True):
            output.replace_all_uses_with(result, delete_user_cb=outside)
            replaced[output] = result
        for member in reversed(block.members):
            graph.erase_node(member)
    # The analyses' marks are consumed: none is left on the graph or copied into a branch (the
    # branch inputs copy their operands' metadata, the cond results the block outputs').
    for node in graph.nodes:
        for key in ANALYSIS_META_KEYS:
            node.meta.pop(key, None)
    for branch in branches:
        for node in branch.graph.nodes:
            for key in (*ANALYSIS_META_KEYS, TIMESTEP_META_KEY, POINT_SPEC_META_KEY):
                node.meta.pop(key, None)
    return PassResult(gm, True)
