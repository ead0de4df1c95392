"""Messages that reach a console where progress bars may be drawn."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any


def log_above_progress_bars(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """Log ``message`` on a line of its own above any tqdm progress bar on the console.

    A pipeline's progress bar (diffusers draws one per call with ``tqdm.auto``) holds the console's
    last line; a record written to stderr while it is drawn would land in the middle of it. The
    bars on stdout and stderr are cleared for the record and redrawn after it (tqdm's own
    ``external_write_mode``, what ``tqdm.write`` uses); the logging configuration is left as it is.
    """
    if not logger.isEnabledFor(level):
        return
    from tqdm import std
    from tqdm.auto import tqdm as auto

    with contextlib.ExitStack() as stack:
        for bar_class in dict.fromkeys((std.tqdm, auto)):  # one set of bars each (shared where inherited)
            stack.enter_context(bar_class.external_write_mode(file=sys.stderr))
        logger.log(level, message, *args)
