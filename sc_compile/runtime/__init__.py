"""The runtime: what runs at every call of a compiled graph.

``dispatcher`` (the one dispatcher of every graph kind) over ``protocol`` (what a graph kind
provides: its state in a generation and how a step runs), ``dispatch`` (whole-graph runtime, the
session's reports), ``per_block`` (per-block graphs), ``generations`` (sessions, generations,
explicit scopes), ``state`` (the preallocated buffers), ``cuda_graphs`` (the step graphs replayed
as CUDA graphs) and ``registry`` (all state kept across calls, weakly held; ``registry.reset()``).
"""
