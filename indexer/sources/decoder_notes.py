"""Pillow's own warnings and log lines, kept off the user's terminal.

Pillow reports what it works around in odd files (a corrupt EXIF block, a TIFF tag past the end
of the file, a palette with byte transparency) as UserWarnings from its modules and as lines on
its loggers; a folder of odd TIFFs makes hundreds. They are notes for Pillow's developers, not
for someone indexing photos: a picture that decodes needs none of them, and one that fails keeps
the log lines of warning level and above in its failure reason (Pillow's "More samples per pixel
than can be decoded: 9" says more than "not a picture").

Warnings filters and loggers are process-wide and pictures decode in several threads at once, so
nothing here is swapped per picture (warnings.catch_warnings is not thread-safe before Python
3.14): one filter and one log handler are installed once, and the handler keeps each thread's
lines apart. Python 3.11 offers no thread-safe way to tell one thread's warnings from another's,
so Pillow's warnings are dropped rather than recorded; a failing picture's own exception carries
the reason.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

KEPT = 3  # lines a failure reason keeps: the first ones explain, the rest repeat them

_thread = threading.local()


class _Collector(logging.Handler):
    """Keeps the lines of the thread that logged them, while that thread decodes a picture."""

    def emit(self, record: logging.LogRecord) -> None:
        lines = getattr(_thread, "lines", None)
        if lines is not None and len(lines) < KEPT:
            message = record.getMessage()
            if message not in lines:
                lines.append(message)


def install() -> None:
    """Drop Pillow's warnings and route its log lines to the collector; once per process."""
    logger = logging.getLogger("PIL")
    if any(isinstance(handler, _Collector) for handler in logger.handlers):
        return
    # Pillow warns with the default stacklevel, so its warnings are attributed to its own modules;
    # its deprecation notices point at the caller's code and are left alone.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    handler = _Collector(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False  # nor to the root logger, whatever an application configured there


@contextmanager
def collected() -> Iterator[list[str]]:
    """The lines Pillow logs in this thread while the block runs (at most KEPT, distinct)."""
    _thread.lines = lines = []
    try:
        yield lines
    finally:
        _thread.lines = None
