"""Which part of the model is the graph Dynamo handed the backend? Sort it, or refuse clearly.

ScalingCache skips every block of a step together. Dynamo hands it the model's forward as one
graph, or less: at a **graph break** Dynamo ends a graph and resumes in another one
(``compile_subgraph_reason.graph_break``, resume functions ``torch_dynamo_resume_in_*``), or gives
up on the model's forward (a break inside its loop over the blocks) and compiles the modules it
calls one by one while the forward runs in Python; **regional compilation** (diffusers
``compile_repeated_blocks``, ``module.compile()`` on a block) compiles each block on its own. Each
of these used to surface as a misleading error from a pass ("found no transformer blocks" naming
the timestep embedder, "could not find the timestep input"). **Another cache** already installed on
the model (diffusers ``enable_cache`` or a caching hook) is refused: two caches would both skip
work on the same steps.

A break in the model's own forward, where Dynamo resumes in the same forward (a break between
blocks, before the output head, after the embedders), is not refused: :func:`check_whole_model`
returns a :class:`GraphPiece` and the backend caches every piece that holds blocks, with one clock
and one decision per step for all pieces (``sc_compile/runtime/dispatch.py``). A break that makes Dynamo
compile the blocks on their own (a break inside a block, diffusers group offloading) and regional
compilation are not refused either: a graph of a block (or part of one) called from a model's
forward running in Python is a :class:`BlockGraph`, cached per block
(``sc_compile/runtime/per_block.py``); a graph outside the blocks of such a model (an embedder, the
head, an offloading hook) is an :class:`OutsideBlocksGraph` and runs as it is.

Each refusal names the cause, where it is, and the fix. The errors derive from
:class:`UnsupportedGraphError`, so ``options={'fallback': 'inductor'}`` still compiles the graph
uncached with a warning.
"""

from __future__ import annotations

import dataclasses
import re
from types import FrameType

import torch
import torch.fx

from sc_compile.backends.integration import (
    current_translator,
    foreign_cache,
    graph_break_site,
    place,
    resumed_function,
    running_module_frames,
)
from sc_compile.errors import ForeignCacheError, GraphBreakError

_NUMBERED = re.compile(r"(?:^|\.)[A-Za-z_]\w*\.\d+(?:\.|$)")
_TOP_LEVEL_NUMBERED = re.compile(r"^[A-Za-z_]\w*\.\d+(?:\.|$)")
_TOP_LEVEL_BLOCK = re.compile(r"^[A-Za-z_]\w*\.\d+$")

WHOLE_MODEL_FIX = (
    "ScalingCache needs Dynamo to trace the model's forward itself (as one graph, or split at breaks in "
    "that forward): compile the whole transformer with torch.compile(model, backend='scalingcache', "
    "fullgraph=True), which reports any break as an error at its source; remove the break (or move it out "
    "of the transformer's forward). "
    "options={'fallback': 'inductor'} compiles such a model uncached with a warning instead."
)


@dataclasses.dataclass(frozen=True)
class GraphPiece:
    """This graph is one piece of the model's forward, which Dynamo split at a graph break and
    resumes in the same forward (so every piece sees the model's own module paths)."""

    # The model whose forward was split.
    module: torch.nn.Module
    # The break: what it is and where (file:line), as Dynamo reported it.
    where: str
    # Whether this graph resumes the forward after a break (it joins the step the forward's
    # first piece was placed in) rather than starting it.
    resumes: bool


@dataclasses.dataclass(frozen=True)
class BlockGraph:
    """This graph is a block, or part of one, that Dynamo compiles on its own while the forward of
    the model holding it runs in Python (a break inside the block, a hook on it such as diffusers
    group offloading, regional compilation): cached per block (``sc_compile/runtime/per_block.py``)."""

    # The model whose forward runs in Python and calls the block.
    model: torch.nn.Module
    # The block's path in the model (``'blocks.1'``), and what of it the graph runs.
    block_path: str
    # Why Dynamo compiles it on its own, and where (for messages).
    where: str


@dataclasses.dataclass(frozen=True)
class OutsideBlocksGraph:
    """A graph of code outside the blocks (an embedder, the head, a hook, another method of the
    model) that Dynamo compiles on its own while the model's forward runs in Python: it runs as it
    is at every step. ``refusal`` is what to say if no graph of the compile ever holds a block."""

    model: torch.nn.Module | None
    refusal: str


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """``module``'s dotted name inside ``root`` (``None`` if it is not a proper descendant)."""
    for name, candidate in root.named_modules():
        if candidate is module and name:
            return name
    return None


def check_whole_model(
    module: torch.nn.Module | None, *, failed: bool = False
) -> GraphPiece | BlockGraph | OutsideBlocksGraph | None:
    """Raise when the graph being compiled is not the whole model's forward, a piece of it
    that Dynamo split at a break in the model's own forward (then return that piece), or a graph
    Dynamo compiles on its own while the model's forward runs in Python (then return a
    :class:`BlockGraph` for a block or part of one, an :class:`OutsideBlocksGraph` otherwise).

    Called from the backend while Dynamo compiles (it reads Dynamo's current translator and
    the Python frames above it). ``failed``: the passes found nothing to cache in this graph,
    so any enclosing module whose forward runs in Python explains it; otherwise only an
    enclosing module that holds the traced one inside a numbered block does (a wrapper that
    calls a whole compiled transformer from its own forward is fine).
    """
    tx = current_translator()
    if tx is None:
        return None
    running = list(running_module_frames())
    outer_modules = [m for m, _ in running]
    candidates = ([module] if module is not None else []) + outer_modules
    foreign = foreign_cache(candidates)
    if foreign is not None:
        raise ForeignCacheError(
            f"{foreign}. Another cache is already installed on this model, and two caches would both "
            "skip work on the same steps (its decisions and ScalingCache's would compound, silently). "
            "Remove it first (model.disable_cache(), or remove its hooks) and compile the model with "
            "ScalingCache alone, or use that cache without backend='scalingcache'."
        )
    if module is not None and getattr(module, "_compiled_call_impl", None) is not None and running:
        enclosing = _enclosing_model(module, running, outermost=True)
        if enclosing is not None:
            block_path = _module_path(enclosing, module) or type(module).__name__
            return BlockGraph(
                enclosing, block_path, f"regional compilation of {block_path!r} ({type(module).__name__})"
            )
        # Compiled on its own but not inside a block of a running model (``transformer.compile()``
        # called from a wrapper's forward): the whole model, as any compile of it.
    resumed = resumed_function(tx.f_code)
    where = graph_break_site(tx)
    if where is not None:
        owner = _frame_module(module, tx, running)
        if owner is not None and _enclosing_model(owner, running) is None:
            model = None if holds_blocks(owner) else _model_holding(owner, running)
            if model is not None:
                # A module outside the blocks (an embedder, the head) of a model whose forward runs
                # in Python, split by a break (a hook on it): it runs as it is.
                return OutsideBlocksGraph(
                    model,
                    f"ScalingCache: Dynamo compiles {type(owner).__name__} of {type(model).__name__} on its own, split "
                    f"at a {where}, and no graph of the model holds a transformer block. {WHOLE_MODEL_FIX}",
                )
            return GraphPiece(owner, where, resumes=resumed is not None)
        enclosing = _enclosing_model(owner, running, outermost=True) if owner is not None else None
        if owner is not None and enclosing is not None:
            owner_path = _module_path(enclosing, owner) or type(owner).__name__
            return BlockGraph(enclosing, owner_path, f"{where} inside {owner_path!r} ({type(owner).__name__})")
        if owner is None:
            # Code outside any module (a hook such as group offloading's, a function) that Dynamo
            # compiles on its own: it runs as it is.
            return OutsideBlocksGraph(
                running[-1][0] if running else None,
                f"ScalingCache: Dynamo gave up on the forward of {_model_name(module, outer_modules)} at a {where}, "
                "and none of the graphs it compiled holds a transformer block, so nothing would be cached. "
                f"{WHOLE_MODEL_FIX}",
            )
    if module is None:
        # A function outside any module with nothing to cache, compiled on its own while the
        # forward of a model with blocks runs in Python: it runs as it is.
        model = next((outer for outer, _ in reversed(running) if holds_blocks(outer)), None) if failed else None
        if model is None:
            return None
        return OutsideBlocksGraph(
            model,
            f"ScalingCache: Dynamo compiled {tx.f_code.co_name}() on its own while {type(model).__name__}'s forward "
            f"runs in Python, and no graph of the model holds a transformer block. {WHOLE_MODEL_FIX}",
        )
    enclosing = _enclosing_model(module, running, outermost=True)
    for outer, frame in running:
        if enclosing is not None and outer is not enclosing:
            continue
        path = None
        if outer is module and failed and frame.f_code.co_name != tx.f_code.co_name:
            # Another method of the model itself (``self.patchify``), compiled while its forward
            # runs in Python.
            compiled = f"{type(module).__name__}.{tx.f_code.co_name}"
        else:
            path = _module_path(outer, module)
            if path is None or not (failed or _NUMBERED.search(path)):
                continue
            compiled = f"{path!r} ({type(module).__name__}) of {type(outer).__name__}"
        runs_in_python = (
            f"{type(outer).__name__}.{frame.f_code.co_name} runs in Python (it is now at "
            f"{place(frame.f_code.co_filename, frame.f_lineno)}) because Dynamo gave up on it after a "
            "graph break inside it (a break in a loop skips the whole frame)"
        )
        if path is not None and _TOP_LEVEL_NUMBERED.search(path):
            # A block (or part of one) called from the model's forward running in Python.
            return BlockGraph(outer, path, f"Dynamo compiles {compiled} on its own: {runs_in_python}")
        if failed:
            return OutsideBlocksGraph(
                outer,
                f"ScalingCache: Dynamo compiled {compiled} on its own: {runs_in_python}; none of the graphs it "
                f"compiled holds a transformer block, so nothing would be cached. {WHOLE_MODEL_FIX}",
            )
        raise GraphBreakError(f"Dynamo compiled {compiled} on its own: {runs_in_python}. {WHOLE_MODEL_FIX}")
    return None


def holds_blocks(model: torch.nn.Module) -> bool:
    """Whether ``model`` has top-level numbered children with parameters (``blocks.0``): the
    modules that Dynamo, when the model's forward runs in Python, compiles as per-block graphs."""
    return any(
        _TOP_LEVEL_BLOCK.match(name) is not None and next(module.parameters(), None) is not None
        for name, module in model.named_modules()
    )


def _model_holding(module: torch.nn.Module, running: list[tuple[torch.nn.Module, FrameType]]) -> torch.nn.Module | None:
    """A model with blocks whose forward runs in Python above ``module`` and that holds it."""
    for outer, _ in running:
        if outer is not module and holds_blocks(outer) and _module_path(outer, module) is not None:
            return outer
    return None


def running_models_holding(parameter: torch.Tensor) -> list[torch.nn.Module]:
    """Modules whose forward runs in Python above the caller and that hold ``parameter`` inside a
    numbered block, outermost last."""
    found = []
    for outer, _ in running_module_frames():
        for name, candidate in outer.named_parameters():
            if candidate is parameter and _TOP_LEVEL_NUMBERED.search(name):
                found.append(outer)
                break
    return found


def _frame_module(
    module: torch.nn.Module | None, tx: object, running: list[tuple[torch.nn.Module, FrameType]]
) -> torch.nn.Module | None:
    """The module whose method the graph comes from: ``self`` of the traced frame or, for a
    resume function (which does not keep ``self`` when nothing after the break reads it), of the
    running frame it resumes."""
    if module is not None:
        return module
    code = tx.f_code  # type: ignore[attr-defined]
    resumed = resumed_function(code)
    if resumed is None:
        return None
    for outer, frame in running:
        if frame.f_code.co_name == resumed and frame.f_code.co_filename == code.co_filename:
            return outer
    return None


def _enclosing_model(
    module: torch.nn.Module, running: list[tuple[torch.nn.Module, FrameType]], outermost: bool = False
) -> torch.nn.Module | None:
    """A module whose forward runs in Python above ``module`` and holds it inside a numbered
    block (``module`` is a block, or part of one, that Dynamo compiles on its own). ``outermost``:
    the outermost such module (the model, not a ``FeedForward`` whose ``net.0`` holds ``module``)."""
    found = None
    for outer, _ in running:
        path = _module_path(outer, module)
        if path is not None and _TOP_LEVEL_NUMBERED.search(path):
            if not outermost:
                return outer
            found = outer
    return found


def _model_name(module: torch.nn.Module | None, outer: list[torch.nn.Module]) -> str:
    chosen = outer[-1] if outer else module
    return type(chosen).__name__ if chosen is not None else "the compiled module"
