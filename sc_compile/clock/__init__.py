"""The step clock: which generation, step and stream a call belongs to.

``step_clock`` (placement by the pipeline, a declared context or the timestep input) and
``pipeline`` (the diffusers pipeline integration: ``sc_compile.enable``, and the pipeline call a
compiled model finds on the stack).
"""
