"""Calibration: collecting trajectories, fitting coefficients, and the α table file.

``collect`` (runs generations in full and gathers the statistics), ``fitting`` (least squares
over the gathered Gram matrices) and ``table`` (the ``AlphaTable`` and its safetensors file).
"""
