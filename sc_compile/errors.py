"""The errors sc_compile raises: one base, :class:`ScalingCacheError`, and one class per kind of refusal.

Every class keeps the built-in base it has always had (``RuntimeError``, ``ValueError`` or
``MemoryError``) beside the common one, so ``except ScalingCacheError`` catches all of ours and an
existing ``except ValueError`` keeps catching what it caught. The base derives from ``Exception``
alone: deriving it from ``RuntimeError`` would make an :class:`AlphaTableError` a ``RuntimeError``
too, a change for code that already tells the two apart.

This module sits at the bottom of the layers (see ARCHITECTURE.md): it imports nothing of ours and
nothing heavy, and every other module imports its errors from here. The modules that raised them
first still export them under their old names (``sc_compile.passes.find_blocks.UnsupportedGraphError``
is this module's class).
"""

from __future__ import annotations

__all__ = [
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
    "ScalingCacheError",
    "StochasticSamplerError",
    "UncacheableSplitError",
    "UnsupportedGraphError",
]


class ScalingCacheError(Exception):
    """The base of every error sc_compile raises; its message says what was wrong and what to do."""


# Configuration and data: options, α tables, budgets.


class AlphaTableError(ScalingCacheError, ValueError):
    """An α table is malformed or does not fit the model it is used with."""


class BudgetError(ScalingCacheError, ValueError):
    """No schedule meets the budget."""


class CacheMemoryError(ScalingCacheError, MemoryError):
    """The cache buffers would not fit the declared budget or the device's free memory."""


# Compile time: the passes and the capture checks.


class PassFailedError(ScalingCacheError, RuntimeError):
    """A pass raised an unexpected error; the message names it and the passes that ran before."""


class NoBlocksFoundError(ScalingCacheError, RuntimeError):
    """The graph has no ``<name>.<int>`` top-level blocks that ScalingCache could cache."""


class UnsupportedGraphError(ScalingCacheError, RuntimeError):
    """The blocks exist but the graph around them cannot be rewritten safely."""


class GraphBreakError(UnsupportedGraphError):
    """Dynamo split the model into several graphs; the message names the break and where it is."""


class RegionalCompilationError(UnsupportedGraphError):
    """A single block was compiled on its own (diffusers regional compilation)."""


class ForeignCacheError(UnsupportedGraphError):
    """Another cache (diffusers ``enable_cache`` or a caching hook) is installed on the model."""


class BlockGraphError(UnsupportedGraphError):
    """A per-block graph ScalingCache cannot cache exactly; the message says why and what to do."""


# Run time: the clock and the dispatcher's guards.


class ClockError(ScalingCacheError, RuntimeError):
    """A call cannot be placed in a generation without guessing; the message says what to do."""


class GradEnabledError(ScalingCacheError, RuntimeError):
    """A call with autograd recording: the cache updates its state in place."""


class StochasticSamplerError(ScalingCacheError, RuntimeError):
    """A sampler that injects fresh noise every step, with hidden-state prediction."""


class BatchTimestepError(ScalingCacheError, ValueError):
    """The samples of one batch are at different timesteps."""


class UncacheableSplitError(ScalingCacheError, RuntimeError):
    """A model split at graph breaks into graphs none of which holds a block."""
