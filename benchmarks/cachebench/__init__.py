"""The benchmark of ScalingCache against its peers, as modules (``benchmarks/run.py`` is the entry).

* ``settings``: what one run measures (model, samples, sweeps), one frozen dataclass.
* ``workloads``: the models and the diffusers pipelines around them.
* ``peers``: every method compared — uncached, ScalingCache, and each peer cache — as one small
  dataclass with one interface (``prepare`` a pipeline, ``read_records`` after the measured
  generation), and ``configurations``, the sweep that lists them.
* ``harness``: runs the configurations on a workload in one process (isolation, warm-up, measured
  generation, interleaved timing rounds).
* ``measurements``: what is measured per configuration (block-Linear MAC counts, full evaluations,
  peak RSS, Dynamo counters, timing statistics, fidelity); ``perceptual``: the offline feature
  distance.
* ``rendering``: the markdown tables and the plot of a results JSON.
* ``cli``: the command line.

Importing this package imports nothing heavy; torch, diffusers and the peers load when a run starts.
"""
