"""The shipped demo DiT models (image: Flux, video: Wan) and ``sc-compile demo``.

The demo models are tiny class-conditional diffusion transformers trained on Fashion-MNIST. They
run through the real diffusers ``FluxPipeline`` / ``WanPipeline`` with a pixel-space "VAE shell",
so no hub access, tokenizer or text encoder is needed. Their weights, class embeddings and α
tables are installed with the package (``sc_compile.assets``). The code that trained them is an
example in the source tree (``examples/demo_models/``), not part of the library.

Submodules (imported lazily; nothing heavy is imported here):

* :mod:`sc_compile.demo.models`   -- configs, VAE shells, pipelines, ``load_flux_demo`` / ``load_wan_demo``
* :mod:`sc_compile.demo.sampling` -- ``generate`` samples at the demo size, ``demo_size``
* :mod:`sc_compile.demo.main`     -- ``sc-compile demo``
"""
