"""What the analysis passes found: blocks, their residual outputs and the chosen cache points.

These records hold ``torch.fx.Node`` references into the graph the analysis ran on, so they are
valid only for that graph; :class:`~sc_compile.contract.CachePointSpec` is the node-free summary
the runtime and the reports keep.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.fx

from sc_compile.contract import CachePointSpec


@dataclasses.dataclass
class BlockInfo:
    """One top-level block (``transformer_blocks.3``) of the traced model."""

    name: str
    # Nodes of the block in graph order; they move into the block's cond branch.
    members: list[torch.fx.Node]
    # Values from outside the block that members read, in first-use order.
    inputs: list[torch.fx.Node]
    # Member values read after the block (the block's outputs), in graph order.
    outputs: list[torch.fx.Node]
    # Residual-add outputs on the block's residual stream (``y = x + gate * f(x)``), in order.
    residual_outputs: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    # The cache points chosen for this block (a subset of members), in graph order.
    cache_points: list[torch.fx.Node] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CacheLayout:
    """Everything the passes found; stored in ``gm.meta`` under ``LAYOUT_META_KEY``."""

    model_class: str
    blocks: list[BlockInfo]
    granularity: str = "block"
    # What the buffers hold: "hidden" (the point's value) or "residual" (over the block input).
    prediction: str = "hidden"
    cache_points: list[CachePointSpec] = dataclasses.field(default_factory=list)
    # Name of the placeholder that carries the diffusion timestep.
    timestep_input: str | None = None

    @property
    def num_points(self) -> int:
        return len(self.cache_points)

    def fingerprint(self) -> str:
        """A hash of the cache-point layout that ignores batch and sequence sizes.

        Two graphs of the same architecture and granularity share it at any resolution or batch;
        another architecture, depth or granularity changes it. It is what α files are checked by.
        """
        parts = [self.model_class, self.granularity]
        if self.prediction != "hidden":  # hidden-state layouts keep the fingerprints they always had
            parts.append(self.prediction)
        for point in self.cache_points:
            parts.append(f"{point.block}:{len(point.shape)}:{point.shape[-1] if point.shape else 0}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
