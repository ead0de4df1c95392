"""Examples that use sc_compile; not part of the installed library. Run them from the repository
root as ``python -m examples.<name>...``."""
