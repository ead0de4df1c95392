"""Graph passes of the ScalingCache backend.

Each pass is a plain function in its own module, named for what it does, taking a
``torch.fx.GraphModule`` and returning a :class:`torch.fx.passes.infra.pass_base.PassResult`.
Analysis passes record what they found in ``gm.meta`` under :data:`LAYOUT_META_KEY`; the rewrite
pass reads it. :func:`run_cache_passes` runs them in their one fixed order.
"""

from sc_compile.passes.pass_manager import (
    CACHE_PASSES,
    LAYOUT_META_KEY,
    PassFailedError,
    run_cache_passes,
)

__all__ = ["CACHE_PASSES", "LAYOUT_META_KEY", "PassFailedError", "run_cache_passes"]
