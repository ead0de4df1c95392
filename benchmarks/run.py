"""ScalingCache against its peers: ``python benchmarks/run.py [--model ...] [--quick] ...``.

The benchmark is the ``cachebench`` package beside this file (``cachebench/cli.py`` documents what it
measures; ``--help`` lists the options); this is its entry point.
"""

from __future__ import annotations

import sys

from cachebench.cli import main

if __name__ == "__main__":
    sys.exit(main())
