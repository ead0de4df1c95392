"""Graph passes of the ScalingCache backend.

Each pass is a plain function in its own module, named for what it does, taking a
``torch.fx.GraphModule`` and returning a :class:`torch.fx.passes.infra.pass_base.PassResult`.
Analysis passes annotate the nodes they find (``node.meta``, keys in
:mod:`sc_compile.passes.layout`); the rewrite reads the annotations and leaves the node-free
layout on its new inputs. :func:`run_cache_passes` runs them in their one fixed order.
"""

from sc_compile.passes.pass_manager import (
    CACHE_PASSES,
    PassFailedError,
    run_cache_passes,
)

__all__ = ["CACHE_PASSES", "PassFailedError", "run_cache_passes"]
