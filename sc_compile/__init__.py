"""sc_compile: ScalingCache as a torch.compile backend.

``torch.compile(transformer, backend="scalingcache")`` runs a diffusion transformer with fewer full
evaluations per generation: after a warm-up, steps whose accumulated change stays under the
running mean skip every block and predict the last block's output as ``y_full + c_t * dy`` from
calibrated differential scaling coefficients α (ScalingCache, ICLR 2026).

Importing this package is light: torch and the backend load on first use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sc_compile.alpha import AlphaTable
    from sc_compile.config import ScalingCacheConfig
    from sc_compile.explanation import Explanation
    from sc_compile.reporting import GenerationReport

__all__ = [
    "AlphaTable",
    "calibrate",
    "ScalingCacheConfig",
    "compile",
    "explain",
    "generation",
    "report",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AlphaTable":
        from sc_compile.alpha import AlphaTable

        return AlphaTable
    if name == "ScalingCacheConfig":
        from sc_compile.config import ScalingCacheConfig

        return ScalingCacheConfig
    raise AttributeError(f"module 'sc_compile' has no attribute {name!r}")


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
    """Calibrate an α table (paper eq. 5); see :func:`sc_compile.calibration.calibrate`."""
    from sc_compile.calibration import calibrate as _calibrate

    return _calibrate(target, samples, **kwargs)


def report(model: torch.nn.Module) -> GenerationReport:
    """The last generation's record of ``model`` (compiled, or the module that was compiled)."""
    from sc_compile.runtime import latest_runtime

    return latest_runtime(model).report()


@contextlib.contextmanager
def generation(model: torch.nn.Module, num_inference_steps: int | None = None) -> Iterator[None]:
    """Mark one generation explicitly: the first call inside starts it, leaving the block ends it.

    Pipelines whose timesteps do not go back up between generations, interrupted generations, and
    callers that know the step count (it scales the default warm-up and enables
    ``final_full_steps``) use this; plain diffusers pipelines need not.
    """
    from sc_compile.runtime import runtimes_of, session_for

    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int, but got {num_inference_steps!r}")
    session = session_for(model)
    assert session is not None
    session.generation_epoch += 1
    session.num_inference_steps = num_inference_steps
    try:
        yield
    finally:
        for runtime in runtimes_of(model):
            runtime.end_generation()
        session.num_inference_steps = None
        session.generation_epoch += 1


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Explanation:
    """What the pass finds in ``model`` for these inputs, without running a generation."""
    from sc_compile.explanation import explain as _explain

    return _explain(model, *args, **kwargs)
