"""The decision of each step: full or cached, and the coefficients of a cached step.

``decisions`` (the per-unit decision seam), ``schedule`` (dynamic, static and planned schedules),
``budget`` (the budget planner) and ``coefficients`` (α tables turned into per-step coefficients).
"""
