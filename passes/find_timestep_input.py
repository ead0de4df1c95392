"""Find the graph input that carries the diffusion timestep.

When no pipeline clock places a call, the runtime places it in a generation by its timestep, so
the backend needs to know which graph input that is. The model knowledge is data: a registry of
the diffusers families whose forward names the timestep (:data:`TIMESTEP_INPUTS`), and a generic
rule for every other model (:data:`GENERIC_TIMESTEP_INPUT`). An input is the timestep when the
last component of its Dynamo source name (``L['kwargs']['timestep']``, ``L['timestep']``) is one
of the rule's names and it holds at most ``max_elements`` values (a timestep has one per sample,
or per frame; a hidden state that happens to be called ``t`` does not qualify).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from sc_compile.errors import UnsupportedGraphError
from sc_compile.passes.layout import TIMESTEP_META_KEY, tensor_meta


@dataclasses.dataclass(frozen=True)
class TimestepInput:
    """How a model family's forward takes the diffusion timestep."""

    # Argument names (compared in lower case), tried together: the first graph input with one wins.
    names: tuple[str, ...]
    # The most values a timestep input holds.
    max_elements: int = 4096


GENERIC_TIMESTEP_INPUT = TimestepInput(names=("timestep", "timesteps", "t", "time", "sigma", "sigmas"))
"""The rule for a model no entry of :data:`TIMESTEP_INPUTS` names."""

TIMESTEP_INPUTS: dict[str, TimestepInput] = {
    "Cosmos3OmniTransformer": TimestepInput(("vision_timesteps",)),
    "DiTTransformer2DModel": TimestepInput(("timestep",)),
    "FluxTransformer2DModel": TimestepInput(("timestep",)),
    "HiDreamImageTransformer2DModel": TimestepInput(("timesteps",)),
    "HunyuanVideoTransformer3DModel": TimestepInput(("timestep",)),
    "PixArtTransformer2DModel": TimestepInput(("timestep",)),
    "QwenImageTransformer2DModel": TimestepInput(("timestep",)),
    "SD3Transformer2DModel": TimestepInput(("timestep",)),
    "WanTransformer3DModel": TimestepInput(("timestep",)),
    "ZImageTransformer2DModel": TimestepInput(("t",)),
}
"""The timestep argument of diffusers model classes, by class name."""


def register_timestep_input(model_class: str, names: Sequence[str], max_elements: int = 4096) -> None:
    """Name the timestep argument of the models of class ``model_class`` (a class name)."""
    if not names:
        raise ValueError(f"names must name at least one argument, but got {names!r}")
    TIMESTEP_INPUTS[model_class] = TimestepInput(tuple(name.lower() for name in names), max_elements)


def timestep_rule(model_class: str) -> TimestepInput:
    """The registered rule of ``model_class``, or the generic one."""
    return TIMESTEP_INPUTS.get(model_class, GENERIC_TIMESTEP_INPUT)


def source_name(node: torch.fx.Node) -> str:
    """The name of the value Dynamo lifted into the placeholder ``node`` (``L['timestep']``), or
    the placeholder's own name for a graph Dynamo did not trace."""
    source = getattr(node, "_dynamo_source", None)
    return source.name if source is not None and hasattr(source, "name") else node.name


def _leaf_name(node: torch.fx.Node) -> str:
    """The last component of the input's source name, in lower case (``L['kwargs']['timestep']``
    and ``L['timestep']`` give ``timestep``)."""
    name = source_name(node)
    leaf = name.replace('"', "'").rstrip("]").split("[")[-1].strip("'") if "[" in name else name
    return leaf.lower()


def timestep_input_candidates(gm: torch.fx.GraphModule, model_class: str) -> list[int]:
    """Indices of the placeholders that ``model_class``'s rule takes for the timestep, in order."""
    rule = timestep_rule(model_class)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for index, node in enumerate(placeholders):
        meta = tensor_meta(node)
        if _leaf_name(node) in rule.names and meta is not None and meta.numel() <= rule.max_elements:
            candidates.append(index)
    return candidates


def find_timestep_input(gm: torch.fx.GraphModule, model_class: str) -> int:
    """Index of the placeholder carrying the diffusion timestep.

    Raises :class:`UnsupportedGraphError`, listing the graph's inputs, when there is none.
    """
    candidates = timestep_input_candidates(gm, model_class)
    if not candidates:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        raise UnsupportedGraphError(
            f"{model_class}: could not find the timestep input among the graph inputs "
            f"{[source_name(p) for p in placeholders if not isinstance(tensor_meta(p), torch.nn.Parameter)][:12]}. "
            "ScalingCache places each call in a generation by the timestep: pass it as a tensor named "
            "'timestep' (diffusers pipelines do)."
        )
    return candidates[0]


def mark_timestep_input(gm: torch.fx.GraphModule, model_class: str = "", required: bool = True) -> PassResult:
    """Mark the timestep input (``node.meta[TIMESTEP_META_KEY]``; an analysis: the graph is
    unchanged). ``required``: raise as :func:`find_timestep_input` does when there is none;
    otherwise mark nothing (a piece of a split forward after a break, which joins the step of
    the forward's first piece)."""
    model_class = model_class or type(gm).__name__
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        node.meta.pop(TIMESTEP_META_KEY, None)
    if required:
        index: int | None = find_timestep_input(gm, model_class)
    else:
        candidates = timestep_input_candidates(gm, model_class)
        index = candidates[0] if candidates else None
    if index is not None:
        placeholders[index].meta[TIMESTEP_META_KEY] = True
    return PassResult(gm, False)
