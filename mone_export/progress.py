"""Progress reporting: a tqdm bar on a terminal, plain log lines elsewhere, nothing with ``--quiet``.

A bar redraws itself with carriage returns and cursor escape codes, which turn a CI log into noise; so bars are only
drawn when standard error is a terminal, and a stage that finishes writes one plain line instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, TypeVar

__all__ = ["on_terminal", "progress_bar"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether standard error is an interactive terminal (where progress bars may be drawn)."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool = True, **options):
    """A tqdm bar over ``iterable`` that is drawn only when ``enabled`` and standard error is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and on_terminal()), file=sys.stderr, leave=False, **options)


logging.getLogger(__name__).addHandler(logging.NullHandler())
