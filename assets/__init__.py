"""Data files shipped with sc_compile, installed as the package ``sc_compile.assets``.

``demo_flux/`` and ``demo_wan/`` hold the trained demo models (``config.json``, weights, class
embeddings, model card) and their α tables (``alpha*.safetensors``). Code finds them with
:func:`sc_compile.resources.assets_dir`, never by a path relative to the source tree.
"""
