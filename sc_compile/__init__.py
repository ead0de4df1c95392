"""sc_compile: ScalingCache as a torch.compile backend.

``torch.compile(transformer, backend="scalingcache")`` runs a diffusion transformer with fewer full
evaluations per generation: after a warm-up, steps whose accumulated change stays under the
running mean skip every block and predict the last block's output as ``y_full + c_t * dy`` from
calibrated differential scaling coefficients α (ScalingCache, ICLR 2026).

Importing this package is light: torch and the backend load on first use.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sc_compile.calibration.table import AlphaTable
    from sc_compile.config import ScalingCacheConfig
    from sc_compile.reporting.explanation import Explanation
    from sc_compile.reporting.report import GenerationReport

from sc_compile.errors import (
    AlphaTableError,
    BatchTimestepError,
    BlockGraphError,
    BudgetError,
    CacheMemoryError,
    ClockError,
    ForeignCacheError,
    GradEnabledError,
    GraphBreakError,
    NoBlocksFoundError,
    PassFailedError,
    RegionalCompilationError,
    ScalingCacheError,
    StochasticSamplerError,
    UncacheableSplitError,
    UnsupportedGraphError,
)

# Names loaded on first use, and the module that defines each.
_LAZY = {
    "AlphaTable": "sc_compile.calibration.table",
    "ScalingCacheConfig": "sc_compile.config",
}

__all__ = [
    "AlphaTable",
    "calibrate",
    "ScalingCacheConfig",
    "compile",
    "disable",
    "enable",
    "explain",
    "generation",
    "report",
    "uncached",
    # the errors, one hierarchy under ScalingCacheError (sc_compile/errors.py; imports nothing heavy)
    "ScalingCacheError",
    "AlphaTableError",
    "BatchTimestepError",
    "BlockGraphError",
    "BudgetError",
    "CacheMemoryError",
    "ClockError",
    "ForeignCacheError",
    "GradEnabledError",
    "GraphBreakError",
    "NoBlocksFoundError",
    "PassFailedError",
    "RegionalCompilationError",
    "StochasticSamplerError",
    "UncacheableSplitError",
    "UnsupportedGraphError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sc_compile' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def compile(  # noqa: A001 - the verb users expect, as torch.compile
    model: torch.nn.Module,
    config: ScalingCacheConfig | None = None,
    **torch_compile_kwargs: Any,
) -> torch.nn.Module:
    """``torch.compile(model, backend="scalingcache")`` with a config object.

    ``torch_compile_kwargs`` go to ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``, and
    ``options`` for Inductor options).
    """
    import torch

    from sc_compile.backends.scalingcache import scalingcache
    from sc_compile.config import ScalingCacheConfig

    config = config or ScalingCacheConfig()
    mode = torch_compile_kwargs.pop("mode", None)
    options = torch_compile_kwargs.pop("options", None)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        return scalingcache(gm, example_inputs, mode=mode, options=options, config=config)

    return torch.compile(model, backend=backend, **torch_compile_kwargs)  # type: ignore[return-value]


def calibrate(target: Any, samples: Any, **kwargs: Any) -> AlphaTable:
    """Calibrate an α table (paper eq. 5); see :func:`sc_compile.calibration.collect.calibrate`."""
    from sc_compile.calibration.collect import calibrate as _calibrate

    return _calibrate(target, samples, **kwargs)


def report(model: torch.nn.Module) -> GenerationReport:
    """The last generation's record of ``model`` (compiled, or the module that was compiled)."""
    from sc_compile.runtime.dispatch import report as _report

    return _report(model)


@contextlib.contextmanager
def generation(
    model: torch.nn.Module, num_inference_steps: int | None = None, *, stochastic_sampler: bool = False
) -> Iterator[None]:
    """Mark one generation explicitly: the calls of ``model`` inside are one generation.

    The generation has its own clock and its own cache buffers, so generations in separate threads
    each inside their own context are isolated. Inside, steps are told apart by the timestep
    input (see the README, "Generations, steps and streams"); :func:`enable` gives a pipeline's
    exact steps instead. ``num_inference_steps`` declares the step count (it scales the default
    warm-up and enables ``final_full_steps``; a run with more steps is refused, one with fewer
    warns). ``stochastic_sampler=True`` declares a sampler that injects noise every step:
    hidden-state prediction is then refused in favour of ``prediction="residual"``.
    """
    import threading

    from sc_compile.config import is_int_at_least
    from sc_compile.runtime.generations import (
        GenerationScope,
        module_key,
        pop_scope,
        push_scope,
        sessions_of,
    )

    if num_inference_steps is not None and not is_int_at_least(num_inference_steps, 1):
        raise ValueError(f"num_inference_steps must be a positive int, but got {num_inference_steps!r}")
    from sc_compile.clock.pipeline import end_stale_adoptions

    end_stale_adoptions()  # an adopted pipeline call that was interrupted
    for session in sessions_of(model):  # free a timestep-placed generation this thread left running
        if session.ambient is not None and session.ambient.owner == threading.get_ident():
            session.end_ambient()
    scope = GenerationScope(
        key=module_key(model), num_inference_steps=num_inference_steps, stochastic_sampler=stochastic_sampler
    )
    token = push_scope(scope)
    error: BaseException | None = None
    try:
        yield
    except BaseException as caught:
        error = caught
        raise
    finally:
        pop_scope(token)
        scope.finish(error)


@contextlib.contextmanager
def uncached(model: torch.nn.Module) -> Iterator[None]:
    """Calls of ``model`` inside run in full on scratch state, outside any generation (previews,
    probes): they neither advance nor read the generation that is running."""
    from sc_compile.runtime.generations import module_key, pop_uncached, push_uncached

    token = push_uncached(module_key(model))
    try:
        yield
    finally:
        pop_uncached(token)


def enable(pipe: Any, *, denoisers: Any = None) -> Any:
    """Give a pipeline's ScalingCache-compiled denoisers the pipeline's own step clock: a
    generation per pipeline call, steps from its scheduler, streams from its ``cache_context``;
    see :mod:`sc_compile.clock.pipeline`. Optional for a ``diffusers.DiffusionPipeline``, whose call
    the compiled model finds on its own. Returns ``pipe``."""
    from sc_compile.clock.pipeline import enable as _enable

    return _enable(pipe, denoisers=denoisers)


def disable(pipe: Any) -> Any:
    """Undo :func:`enable`, and stop the compiled denoisers from finding ``pipe``'s calls (the
    timestep clock then places them)."""
    from sc_compile.clock.pipeline import disable as _disable

    return _disable(pipe)


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Explanation:
    """What the pass finds in ``model`` for these inputs, without running a generation."""
    from sc_compile.reporting.explanation import explain as _explain

    return _explain(model, *args, **kwargs)
