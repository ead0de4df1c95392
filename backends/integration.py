"""Where the backend reads Dynamo's and diffusers' internals.

What Dynamo is compiling (its current instruction translator: the traced frame's ``self``, the
``torch.compile`` call it compiles for, the graph break that cut the graph, the names of its resume
functions), the Python frames running above the backend call, diffusers' private context-parallel
configuration and the marks of diffusers' own caches are read here and nowhere else, so that a
change in either library has one place to follow.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from types import CodeType, FrameType
from typing import Any

import torch

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

# How Dynamo names the function that resumes a frame after a graph break.
_RESUME_PREFIX = "torch_dynamo_resume_in_"
_RESUME_NAME = re.compile(rf"^{_RESUME_PREFIX}(?P<function>.+)_at_(?P<line>\d+)$")
_TORCH_DIR = os.path.dirname(torch.__file__)


def traced_module() -> torch.nn.Module | None:
    """The ``nn.Module`` whose forward Dynamo is compiling (``self`` of the traced frame)."""
    tx = current_translator()
    if tx is None:
        return None
    for value in tx.f_locals.values():
        if isinstance(value, torch.nn.Module):
            return getattr(value, "_orig_mod", value)
    return None


def compile_token() -> object | None:
    """What identifies the ``torch.compile`` call Dynamo is compiling for (shared by its recompiles)."""
    tx = current_translator()
    return None if tx is None else tx.output.compiler_fn


def identity_input(example_inputs: Sequence[Any], module: torch.nn.Module | None) -> int | None:
    """Index of the graph input that is ``module``'s first parameter (it names the module a call runs)."""
    first = next(module.parameters(), None) if module is not None else None
    if first is None:
        return None
    return next((i for i, value in enumerate(example_inputs) if value is first), None)


def context_parallel_group(module: torch.nn.Module | None) -> Any:
    """The process group of diffusers context parallelism (``model.enable_parallelism``), if any."""
    config = getattr(module, "_parallel_config", None)
    cp_config = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp_config, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()


def current_translator() -> Any:
    """Dynamo's instruction translator of the frame it is compiling (``None`` outside Dynamo)."""
    from torch._dynamo import symbolic_convert

    # InstructionTranslator.current_tx() raises AttributeError in a thread where Dynamo never
    # traced (its thread-local is unset): read the thread-local the same way it does, with None
    # for "not set" (a graph rebuilt at call time, after Dynamo finished).
    return getattr(symbolic_convert.tls, "current_tx", None)


def running_frames(*skip: str) -> Iterator[FrameType]:
    """The Python frames running above the caller, innermost first, less PyTorch's own (such as
    ``Module._call_impl``), this module's and those of files under the ``skip`` paths."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename != __file__ and not filename.startswith((_TORCH_DIR, *skip)):
            yield frame
        frame = frame.f_back


def running_module_frames() -> Iterator[tuple[torch.nn.Module, FrameType]]:
    """Module methods running in Python above the backend call, innermost first (user code
    only: PyTorch's own frames, such as ``Module._call_impl``, are left out)."""
    for frame in running_frames():
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            yield owner, frame


def calling_module(*skip: str) -> torch.nn.Module | None:
    """``self`` of the innermost frame running above the caller outside PyTorch and ``skip``
    (the code that called a compiled graph), where that frame is a module method."""
    frame = next(running_frames(*skip), None)
    owner = frame.f_locals.get("self") if frame is not None else None
    return owner if isinstance(owner, torch.nn.Module) else None


def place(filename: str, line: int | None) -> str:
    return f"{filename}:{line}" if line is not None else filename


def resumed_function(code: CodeType) -> str | None:
    """The function a Dynamo resume function (``torch_dynamo_resume_in_<function>_at_<line>``)
    continues after a graph break, or ``None`` for any other code."""
    resumed = _RESUME_NAME.match(code.co_name)
    return None if resumed is None else resumed.group("function")


def graph_break_site(tx: Any) -> str | None:
    """The graph break that ends the graph ``tx`` compiles, or that it resumes after, and where
    (``None`` when the graph is not cut by a break)."""
    reason = getattr(tx.output, "compile_subgraph_reason", None)
    resumed = _RESUME_NAME.match(tx.f_code.co_name)
    where: str | None = None
    if reason is not None and reason.graph_break:
        frame_info = reason.user_stack[-1] if reason.user_stack else None
        site = place(frame_info.filename, frame_info.lineno) if frame_info is not None else tx.f_code.co_filename
        where = (
            f"graph break: {reason.reason.strip().splitlines()[0]} at {site}"
            f"{f' ({frame_info.line.strip()})' if frame_info is not None and frame_info.line else ''}"
        )
    elif resumed is not None:
        where = (
            f"graph break in {resumed.group('function')}() at "
            f"{place(tx.f_code.co_filename, int(resumed.group('line')))}"
        )
    return where


def foreign_cache(modules: list[torch.nn.Module]) -> str | None:
    """Another cache installed on one of ``modules`` (diffusers ``enable_cache`` or a caching
    hook), described; ``None`` when there is none."""
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
