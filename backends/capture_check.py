"""Is the graph Dynamo handed the backend the whole model? Refuse clearly when it is not.

ScalingCache skips every block of a step together and places each call in a generation by the
timestep the model receives, so it needs the model's forward as one Dynamo graph. Three things
give it less, and each used to surface as a misleading error from a pass ("found no transformer
blocks" naming the timestep embedder, "could not find the timestep input"):

* a **graph break**: Dynamo ends a graph at the break and resumes in another one
  (``compile_subgraph_reason.graph_break``, resume functions ``torch_dynamo_resume_in_*``), or gives
  up on the model's forward (a break inside a loop) and compiles the modules it calls one by one,
  while the forward itself runs in Python further up the stack;
* **regional compilation** (diffusers ``compile_repeated_blocks``, ``module.compile()`` on a block):
  each block is compiled on its own;
* **another cache** already installed on the model (diffusers ``enable_cache`` or a caching hook):
  two caches would both skip work on the same steps.

Each is refused with an error that names the cause, where it is, and the fix. The errors derive
from :class:`UnsupportedGraphError`, so ``options={'fallback': 'inductor'}`` still compiles the
graph uncached with a warning.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from types import FrameType

import torch
import torch.fx

from sc_compile.passes.find_blocks import UnsupportedGraphError

# Names under which diffusers' caching methods register their hooks (``diffusers/hooks/*``):
# blocks wrapped by any of these skip computation on some steps by themselves.
FOREIGN_CACHE_HOOKS = (
    "faster_cache_denoiser",
    "faster_cache_block",
    "fbc_leader_block_hook",
    "fbc_block_hook",
    "mag_cache_leader_block_hook",
    "mag_cache_block_hook",
    "pyramid_attention_broadcast",
    "sea_cache_root",
    "sea_cache_leader_block",
    "sea_cache_block",
    "taylorseer_cache",
)

_RESUME_PREFIX = "torch_dynamo_resume_in_"
_RESUME_NAME = re.compile(rf"^{_RESUME_PREFIX}(?P<function>.+)_at_(?P<line>\d+)$")
_NUMBERED = re.compile(r"(?:^|\.)[A-Za-z_]\w*\.\d+(?:\.|$)")
_TORCH_DIR = os.path.dirname(torch.__file__)

WHOLE_MODEL_FIX = (
    "ScalingCache needs the model's forward as one graph: compile the whole transformer with "
    "torch.compile(model, backend='scalingcache', fullgraph=True), which reports any break as an "
    "error at its source; remove the break (or move it out of the transformer's forward). "
    "options={'fallback': 'inductor'} compiles such a model uncached with a warning instead."
)


class GraphBreakError(UnsupportedGraphError):
    """Dynamo split the model into several graphs; the message names the break and where it is."""


class RegionalCompilationError(UnsupportedGraphError):
    """A single block was compiled on its own (diffusers regional compilation)."""


class ForeignCacheError(UnsupportedGraphError):
    """Another cache (diffusers ``enable_cache`` or a caching hook) is installed on the model."""


def _running_module_frames() -> Iterator[tuple[torch.nn.Module, FrameType]]:
    """Module methods running in Python above the backend call, innermost first (user code
    only: PyTorch's own frames, such as ``Module._call_impl``, are left out)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            yield owner, frame
        frame = frame.f_back


def _compiled_model_running() -> torch.nn.Module | None:
    """The innermost compiled module (``torch.compile(model)`` or ``model.compile()``) whose call
    is on the Python stack above the backend, PyTorch's own frames included."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
            return owner._orig_mod
        if isinstance(owner, torch.nn.Module) and getattr(owner, "_compiled_call_impl", None) is not None:
            return owner
        frame = frame.f_back
    return None


def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """``module``'s dotted name inside ``root`` (``None`` if it is not a proper descendant)."""
    for name, candidate in root.named_modules():
        if candidate is module and name:
            return name
    return None


def _place(filename: str, line: int | None) -> str:
    return f"{filename}:{line}" if line is not None else filename


def _foreign_cache(modules: list[torch.nn.Module]) -> str | None:
    for root in modules:
        config = getattr(root, "_cache_config", None)
        if getattr(root, "is_cache_enabled", False) and config is not None:
            return f"{type(root).__name__} has {type(config).__name__} enabled (enable_cache)"
        for name, module in root.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            hooks = getattr(registry, "hooks", None) or {}
            found = [hook for hook in hooks if hook in FOREIGN_CACHE_HOOKS]
            if found:
                return f"{name or type(root).__name__} carries the diffusers caching hook {found[0]!r}"
    return None


def check_whole_model(module: torch.nn.Module | None, *, failed: bool = False) -> None:
    """Raise when the graph being compiled is not the whole model's forward.

    Called from the backend while Dynamo compiles (it reads Dynamo's current translator and
    the Python frames above it). ``failed``: the passes found nothing to cache in this graph,
    so any enclosing module whose forward runs in Python explains it; otherwise only an
    enclosing module that holds the traced one inside a numbered block does (a wrapper that
    calls a whole compiled transformer from its own forward is fine).
    """
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        return
    running = list(_running_module_frames())
    outer_modules = [m for m, _ in running]
    candidates = ([module] if module is not None else []) + outer_modules
    foreign = _foreign_cache(candidates)
    if foreign is not None:
        raise ForeignCacheError(
            f"{foreign}. Another cache is already installed on this model, and two caches would both "
            "skip work on the same steps (its decisions and ScalingCache's would compound, silently). "
            "Remove it first (model.disable_cache(), or remove its hooks) and compile the model with "
            "ScalingCache alone, or use that cache without backend='scalingcache'."
        )
    if module is not None and getattr(module, "_compiled_call_impl", None) is not None and running:
        outer, frame = running[0]
        block_path = _module_path(outer, module) or type(module).__name__
        raise RegionalCompilationError(
            f"{type(module).__name__} ({block_path!r} of {type(outer).__name__}) is compiled on its own "
            "(regional compilation: diffusers' compile_repeated_blocks or module.compile()). ScalingCache "
            "works on the whole model: it skips all blocks of a step together and predicts the last "
            "block's output, and it tells the steps of a generation apart by the timestep the model "
            "receives; a single block has neither. Compile the whole transformer instead: "
            "torch.compile(model, backend='scalingcache'); regional compilation without caching is "
            "compile_repeated_blocks(backend='inductor')."
        )
    reason = getattr(tx.output, "compile_subgraph_reason", None)
    if reason is not None and reason.graph_break:
        where = reason.user_stack[-1] if reason.user_stack else None
        place = _place(where.filename, where.lineno) if where is not None else tx.f_code.co_filename
        raise GraphBreakError(
            f"Dynamo split {_model_name(module, outer_modules)} at a graph break: "
            f"{reason.reason.strip().splitlines()[0]} at {place}"
            f"{f' ({where.line.strip()})' if where is not None and where.line else ''}. This graph ends there and "
            f"the rest runs in other graphs. {WHOLE_MODEL_FIX}"
        )
    resumed = _RESUME_NAME.match(tx.f_code.co_name)
    if resumed is not None:
        place = _place(tx.f_code.co_filename, int(resumed.group("line")))
        raise GraphBreakError(
            f"Dynamo split {_model_name(module, outer_modules)} at a graph break in "
            f"{resumed.group('function')}() at {place}: this graph resumes after it. {WHOLE_MODEL_FIX}"
        )
    if module is None:
        model = _compiled_model_running() if failed else None
        if model is not None:
            # A function Dynamo met on its own (no module owns it) while a compiled model runs:
            # the model's compiled forward left this call to Python (a break in a loop skips
            # the whole caller frame; diffusers' hooks call such functions before the forward).
            code = tx.f_code
            raise GraphBreakError(
                f"Dynamo compiled {code.co_name}() ({_place(code.co_filename, code.co_firstlineno)}) on its own "
                f"while the compiled {type(model).__name__} runs: a graph break in its forward, or in a hook "
                f"that runs around it, left the caller of {code.co_name}() to Python, so this graph is a piece "
                f"of the model. {WHOLE_MODEL_FIX}"
            )
        return
    for outer, frame in running:
        if outer is module and failed and frame.f_code.co_name != tx.f_code.co_name:
            # Another method of the model itself (``self.patchify``), compiled while its forward
            # runs in Python.
            compiled = f"{type(module).__name__}.{tx.f_code.co_name}"
        else:
            path = _module_path(outer, module)
            if path is None or not (failed or _NUMBERED.search(path)):
                continue
            compiled = f"{path!r} ({type(module).__name__}) of {type(outer).__name__}"
        raise GraphBreakError(
            f"Dynamo compiled {compiled} on its own: "
            f"{type(outer).__name__}.{frame.f_code.co_name} runs in Python (it is now at "
            f"{_place(frame.f_code.co_filename, frame.f_lineno)}) because Dynamo gave up on it after a "
            f"graph break inside it (a break in a loop skips the whole frame). {WHOLE_MODEL_FIX}"
        )


def _model_name(module: torch.nn.Module | None, outer: list[torch.nn.Module]) -> str:
    chosen = outer[-1] if outer else module
    return type(chosen).__name__ if chosen is not None else "the compiled module"
