"""Normalising Dynamo's ``nn_module_stack`` paths and naming the top-level block of a node.

Dynamo records the owning module of every node as a path rooted at the traced module, e.g.
``L['self'].__dict__['_modules']['transformer_blocks'].0.attn``. We normalise it to the dotted
form a user sees in ``model.named_modules()`` (``transformer_blocks.0.attn``). A *top-level block*
is a ``<name>.<int>`` child of the root: nested ``<name>.<int>`` paths (HunyuanVideo's token
refiner, ``context_embedder.token_refiner.refiner_blocks.0``) are parts of other modules, not blocks.
"""

from __future__ import annotations

import re

import torch.fx

_ROOT_PREFIX = re.compile(r"^(?:L|G)\[['\"][^'\"]+['\"]\]")
_DICT_MODULES = re.compile(r"\.__dict__\[['\"]_modules['\"]\]\[['\"]([^'\"]+)['\"]\]")
_MODULES_ITEM = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_STRING_ITEM = re.compile(r"\[['\"]([^'\"]+)['\"]\]")
_INT_ITEM = re.compile(r"\[(\d+)\]")
# diffusers hooks (context parallelism, caching hooks) replace ``forward`` by a partial of a bound
# method; Dynamo then names the module path through it (``forward.__self__.transformer_blocks.0``).
_BOUND_SELF = re.compile(r"(?:^|\.)[A-Za-z_]\w*\.__self__(?=\.|$)")
_NUMBERED_CHILD = re.compile(r"(?:^|\.)([A-Za-z_][A-Za-z0-9_]*)\.(\d+)(?:\.|$)")


def normalize_module_path(path: str) -> str:
    """Turn a Dynamo module path into the dotted name ``named_modules()`` uses.

    >>> normalize_module_path("L['self'].__dict__['_modules']['transformer_blocks'].0.attn")
    'transformer_blocks.0.attn'
    >>> normalize_module_path("L['self'].blocks[3]")
    'blocks.3'
    """
    path = _ROOT_PREFIX.sub("", path)
    path = _DICT_MODULES.sub(r".\1", path)
    path = _MODULES_ITEM.sub(r".\1", path)
    path = _STRING_ITEM.sub(r".\1", path)
    path = _INT_ITEM.sub(r".\1", path)
    path = _BOUND_SELF.sub("", path)
    return path.lstrip(".")


def module_paths(node: torch.fx.Node) -> list[str]:
    """The normalised module paths of ``node``'s owners, outermost first (empty at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        raw = value[0] if isinstance(value, tuple) else str(value)
        normalized = normalize_module_path(raw)
        if normalized:
            paths.append(normalized)
    return paths


def numbered_ancestor_of(node: torch.fx.Node) -> tuple[str, str] | None:
    """``(prefix, "<name>.<int>")`` for the outermost numbered module that owns ``node``.

    ``transformer_blocks.3.attn`` gives ``("", "transformer_blocks.3")``; a wrapper's
    ``transformer.blocks.0`` gives ``("transformer", "transformer.blocks.0")``.
    """
    for path in module_paths(node):
        match = _NUMBERED_CHILD.search(path)
        if match:
            end = match.end(2)
            prefix = path[: match.start(1)].rstrip(".")
            return prefix, path[:end]
    return None


def top_level_block_of(node: torch.fx.Node, root: str = "") -> str | None:
    """The ``<name>.<int>`` block directly under module ``root`` that owns ``node``, or ``None``.

    Blocks are the numbered children of the shallowest module that has any (the model itself for
    diffusers DiTs); numbered modules nested deeper (HunyuanVideo's token refiner,
    ``context_embedder.token_refiner.refiner_blocks.0``) are parts of other modules, not blocks.
    """
    found = numbered_ancestor_of(node)
    if found is None or found[0] != root:
        return None
    return found[1]


def module_classes(node: torch.fx.Node) -> dict[str, object]:
    """The class of each module that owns ``node``, by normalised path (as ``nn_module_stack`` records it)."""
    classes: dict[str, object] = {}
    for value in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(value, tuple) and len(value) >= 2:
            classes[normalize_module_path(str(value[0]))] = value[1]
    return classes
