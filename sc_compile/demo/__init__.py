"""Small trained demo DiT models (image: Flux, video: Wan) for sc_compile.

The demo models are tiny class-conditional diffusion transformers trained on
Fashion-MNIST (Debian package ``dataset-fashion-mnist``). They run through the
real diffusers ``FluxPipeline`` / ``WanPipeline`` with a pixel-space "VAE shell",
so no hub access, tokenizer or text encoder is needed.

Submodules (imported lazily; nothing heavy is imported here):

* :mod:`sc_compile.demo.data`   -- Fashion-MNIST loading and moving-clip synthesis
* :mod:`sc_compile.demo.models` -- configs, VAE shells, pipelines, ``load_flux_demo`` / ``load_wan_demo``
* :mod:`sc_compile.demo.train`  -- ``python -m sc_compile.demo.train --model flux|wan --out DIR``
* :mod:`sc_compile.demo.check`  -- class-separability statistic of generated samples
"""
