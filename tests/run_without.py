"""Run ``python -m MODULE ARGS`` as in an environment without some installed packages.

``python tests/run_without.py PKG[,PKG...] MODULE [ARGS...]``: the packages cannot be imported and
``importlib.util.find_spec`` does not find them (how diffusers and sc_compile test for optional
packages), while their distribution metadata stays readable. Used to test the messages for a
missing optional dependency in the same virtual environment that has it installed.
"""

from __future__ import annotations

import importlib.machinery
import runpy
import sys


def hide(packages: set[str]) -> None:
    class Hiding:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in packages:
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):
            return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

        @classmethod
        def invalidate_caches(cls):
            importlib.machinery.PathFinder.invalidate_caches()

    sys.meta_path[:] = [Hiding if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path]


if __name__ == "__main__":
    hidden, module, *arguments = sys.argv[1:]
    hide(set(hidden.split(",")))
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
