"""Training and evaluation of the shipped demo models (not installed with the library).

The demo models are tiny class-conditional diffusion transformers trained on Fashion-MNIST
(Debian package ``dataset-fashion-mnist``); their definitions and loaders are part of the library
(:mod:`sc_compile.demo.models`), so that ``sc-compile demo`` runs from the wheel. Run from the
repository root:

* ``python -m examples.demo_models.train --model flux|wan --out DIR`` -- train (``train.py``)
* ``python -m examples.demo_models.check --model flux|wan`` -- class separability of samples (``check.py``)

``data.py`` reads Fashion-MNIST and synthesises the moving clips of the video model.
"""
