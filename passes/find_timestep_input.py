"""Find the graph input that carries the diffusion timestep.

The runtime places each call in a generation by the timestep when no pipeline clock does: it is
a graph input named like a timestep (the last component of Dynamo's source name,
``L['kwargs']['timestep']`` or ``L['timestep']``) that holds a few values at most.
"""

from __future__ import annotations

import torch
import torch.fx

from sc_compile.passes.find_blocks import UnsupportedGraphError
from sc_compile.passes.layout import tensor_meta

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "time", "sigma", "sigmas")

def _source_name(node: torch.fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    return source.name if source is not None and hasattr(source, "name") else node.name


def find_timestep_input(gm: torch.fx.GraphModule, model_class: str) -> int:
    """Index of the placeholder carrying the diffusion timestep."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for index, node in enumerate(placeholders):
        name = _source_name(node)
        # Last component of L['kwargs']['timestep'] / L['timestep'].
        leaf = name.replace('"', "'").rstrip("]").split("[")[-1].strip("'") if "[" in name else name
        leaf = leaf.lower()
        meta = tensor_meta(node)
        if leaf in TIMESTEP_NAMES and meta is not None and meta.numel() <= 4096:
            candidates.append(index)
    if not candidates:
        raise UnsupportedGraphError(
            f"{model_class}: could not find the timestep input among the graph inputs "
            f"{[_source_name(p) for p in placeholders if not isinstance(tensor_meta(p), torch.nn.Parameter)][:12]}. "
            "ScalingCache places each call in a generation by the timestep: pass it as a tensor named "
            "'timestep' (diffusers pipelines do)."
        )
    return candidates[0]
