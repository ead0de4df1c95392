"""Where the data files shipped with sc_compile are.

The source tree keeps them in the top-level ``assets/`` folder; the wheel (and the editable
install, through the same ``package-dir`` mapping in ``pyproject.toml``) installs that folder as
the package ``sc_compile.assets``. Code reads them through :mod:`importlib.resources`, so an
installed wheel finds its own copy, wherever it is installed.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

ASSETS_PACKAGE = "sc_compile.assets"


def assets_dir() -> Path:
    """The directory of the shipped data files (``demo_flux/``, ``demo_wan/``, α tables).

    Raises ``RuntimeError`` when the package is not installed as files on disk (a zipped
    install): the loaders and the α table search need real files.
    """
    root = importlib.resources.files(ASSETS_PACKAGE)
    if not isinstance(root, Path) or not root.is_dir():
        raise RuntimeError(
            f"sc_compile's data files ({ASSETS_PACKAGE}) are not a directory on disk (found {root!r}); "
            "install sc-compile as an ordinary wheel (pip install sc-compile), not as a zip archive."
        )
    return root
