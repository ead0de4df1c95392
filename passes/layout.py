"""What the analysis passes find, and the node-free layout the passes hand on.

The analyses annotate the nodes of the graph they analyse (``node.meta``) instead of keeping
references to them: ``find_blocks`` marks each block's member nodes with the block's name
(:data:`BLOCK_META_KEY`), ``find_residual_outputs`` marks the residual-module outputs
(:data:`RESIDUAL_OUTPUT_META_KEY`), ``choose_cache_points`` the cache points
(:data:`CACHE_POINT_META_KEY`) and ``find_timestep_input`` the timestep input
(:data:`TIMESTEP_META_KEY`). An annotation lives and dies with its node, so the pass manager's
dead-code elimination between passes cannot leave a later pass a stale reference.
:func:`blocks_of` reads the annotations back as :class:`BlockInfo` records, valid until the graph
next changes. ``insert_cache_conds`` consumes the annotations and marks each cache point's
``y_full`` state input with the point's node-free :class:`~sc_compile.contract.CachePointSpec`
(:data:`POINT_SPEC_META_KEY`); :func:`cache_layout_of` reads the :class:`CacheLayout` from those.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.fx

from sc_compile.config import Granularity, Prediction
from sc_compile.contract import CachePointSpec

# The top-level block (``transformer_blocks.3``) a node belongs to (find_blocks).
BLOCK_META_KEY = "sc_block"
# Set on a residual-module output on its block's residual stream (find_residual_outputs).
RESIDUAL_OUTPUT_META_KEY = "sc_residual_output"
# Set on a cache point (choose_cache_points).
CACHE_POINT_META_KEY = "sc_cache_point"
# Set on the graph input that carries the diffusion timestep (find_timestep_input).
TIMESTEP_META_KEY = "sc_timestep_input"
# The node-free spec of a cache point, on its ``y_full`` state input (insert_cache_conds).
POINT_SPEC_META_KEY = "sc_cache_point_spec"

# What the analyses annotate; insert_cache_conds removes them from every node it keeps or copies.
ANALYSIS_META_KEYS = (BLOCK_META_KEY, RESIDUAL_OUTPUT_META_KEY, CACHE_POINT_META_KEY)


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """One top-level block (``transformer_blocks.3``) of the analysed graph, read from the
    annotations by :func:`blocks_of`. Its nodes belong to that graph as it was when read."""

    name: str
    # Nodes of the block in graph order; they move into the block's cond branch.
    members: tuple[torch.fx.Node, ...]
    # Values from outside the block that members read, in first-use order.
    inputs: tuple[torch.fx.Node, ...]
    # Member values read after the block (the block's outputs), in graph order.
    outputs: tuple[torch.fx.Node, ...]
    # Residual-add outputs on the block's residual stream (``y = x + gate * f(x)``), in order.
    residual_outputs: tuple[torch.fx.Node, ...] = ()
    # The cache points chosen for this block (a subset of members), in graph order.
    cache_points: tuple[torch.fx.Node, ...] = ()


def block_inputs(members: list[torch.fx.Node] | tuple[torch.fx.Node, ...]) -> list[torch.fx.Node]:
    """Values from outside the block that ``members`` read, in first-use order."""
    member_set = set(members)
    inputs: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in member_set and arg not in seen:
                seen.add(arg)
                inputs.append(arg)
    return inputs


def block_outputs(members: list[torch.fx.Node] | tuple[torch.fx.Node, ...]) -> list[torch.fx.Node]:
    """Member values read after the block, in graph order."""
    member_set = set(members)
    return [n for n in members if any(user not in member_set for user in n.users)]


def blocks_of(gm: torch.fx.GraphModule) -> list[BlockInfo]:
    """The blocks ``find_blocks`` annotated on ``gm``, in graph order, with what the later
    analyses annotated on their nodes."""
    members: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        name = node.meta.get(BLOCK_META_KEY)
        if name is not None:
            members.setdefault(name, []).append(node)
    blocks = []
    for name, nodes in members.items():
        blocks.append(
            BlockInfo(
                name=name,
                members=tuple(nodes),
                inputs=tuple(block_inputs(nodes)),
                outputs=tuple(block_outputs(nodes)),
                residual_outputs=tuple(n for n in nodes if n.meta.get(RESIDUAL_OUTPUT_META_KEY)),
                cache_points=tuple(n for n in nodes if n.meta.get(CACHE_POINT_META_KEY)),
            )
        )
    return blocks


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What the passes produced, without a node: the cache points of the cond-guarded graph, in
    the order of their state inputs, and the timestep input."""

    model_class: str
    # The blocks that hold cache points, in graph order.
    block_names: tuple[str, ...]
    granularity: Granularity
    # What the buffers hold: the point's value (hidden) or its residual over the block input.
    prediction: Prediction
    cache_points: tuple[CachePointSpec, ...]
    # Where the buffers live (the device of the cache points' values).
    device: torch.device
    # Index of the graph input that carries the diffusion timestep (``None``: not found, and
    # not required).
    timestep_index: int | None = None

    @property
    def num_points(self) -> int:
        return len(self.cache_points)

    def fingerprint(self) -> str:
        """A hash of the cache-point layout that ignores batch and sequence sizes.

        Two graphs of the same architecture and granularity share it at any resolution or batch;
        another architecture, depth or granularity changes it. It is what α files are checked by.
        """
        parts = [self.model_class, self.granularity]
        if self.prediction is not Prediction.HIDDEN:  # hidden-state layouts keep the fingerprints they always had
            parts.append(self.prediction)
        for point in self.cache_points:
            parts.append(f"{point.block}:{len(point.shape)}:{point.shape[-1] if point.shape else 0}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_layout_of(
    gm: torch.fx.GraphModule, *, model_class: str, granularity: Granularity, prediction: Prediction
) -> CacheLayout:
    """The node-free layout of a cond-guarded graph, read from its annotated inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    annotated = [n for n in placeholders if POINT_SPEC_META_KEY in n.meta]
    if not annotated:
        raise RuntimeError("insert_cache_conds must run before the layout is read (no cache point state inputs)")
    points = tuple(n.meta[POINT_SPEC_META_KEY] for n in annotated)
    timestep = [i for i, n in enumerate(placeholders) if n.meta.get(TIMESTEP_META_KEY)]
    return CacheLayout(
        model_class=model_class,
        block_names=tuple(dict.fromkeys(p.block for p in points)),
        granularity=granularity,
        prediction=prediction,
        cache_points=points,
        device=required_tensor_meta(annotated[-1]).device,
        timestep_index=timestep[0] if timestep else None,
    )


def example_value(node: torch.fx.Node) -> object:
    """The fake value Dynamo recorded for ``node`` (``None`` when there is none)."""
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_meta(node: torch.fx.Node) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def required_tensor_meta(node: torch.fx.Node) -> torch.Tensor:
    """The fake tensor of a node that must be tensor-valued (a cache point, a block output)."""
    meta = tensor_meta(node)
    if meta is None:
        raise RuntimeError(f"node {node.name!r} has no tensor metadata (example_value)")
    return meta
