"""The runtime: what runs at every call of a compiled graph.

``dispatch`` (whole-graph runtime, the session's reports), ``per_block`` (per-block graphs),
``generations`` (sessions, generations, explicit scopes), ``state`` (the preallocated buffers) and
``cuda_graphs`` (the step graphs replayed as CUDA graphs).
"""
