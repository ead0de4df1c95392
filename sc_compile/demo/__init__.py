"""The shipped demo DiT models (image: Flux and SD3, video: Wan) and ``sc-compile demo``.

The demo models are tiny class-conditional diffusion transformers trained on Fashion-MNIST. They
run through the real diffusers ``FluxPipeline`` / ``WanPipeline`` / ``StableDiffusion3Pipeline``
with a pixel-space "VAE shell", so no hub access, tokenizer or text encoder is needed. Their
weights, class embeddings and α tables are installed with the package (``sc_compile.assets``).
The code that trained them is an example in the source tree (``examples/demo_models/``), not
part of the library.

Submodules (imported lazily; nothing heavy is imported here):

* :mod:`sc_compile.demo.models`   -- configs, VAE shells, pipelines, ``load_{flux,wan,sd3}_demo``
* :mod:`sc_compile.demo.sampling` -- ``generate`` samples at the demo size, ``demo_size``
* :mod:`sc_compile.demo.main`     -- ``sc-compile demo``
"""

from __future__ import annotations

DEMO_EXTRA = 'pip install "sc-compile[demo]"'


def demo_extra_missing(error: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error to raise for ``error``: one naming the ``[demo]`` extra where ``transformers`` is
    what is missing, else ``error`` itself (any other import error is left as it is).

    The demo runs the real diffusers pipelines, whose modules import ``transformers``; without it
    diffusers fails with a bare ``No module named 'transformers'``.
    """
    if error.name != "transformers" and not (error.name or "").startswith("transformers."):
        return error
    return ModuleNotFoundError(
        "the demo models run in the real diffusers pipelines (FluxPipeline, WanPipeline), whose modules import "
        f"transformers, which is not installed; install the demo extra: {DEMO_EXTRA}",
        name=error.name,
    )


def require_demo_extra() -> None:
    """Raise :func:`demo_extra_missing`'s error where ``transformers`` cannot be imported."""
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError as error:
        raise demo_extra_missing(error) from error
