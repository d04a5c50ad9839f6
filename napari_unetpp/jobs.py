"""Long work is a generator that yields progress and returns its result; this runs one to the end.

Every long job comes as a pair with one name pattern: ``<job>_iter`` is the generator (``predict_iter``,
``fine_tune_iter``), ``<job>`` runs it to the end (``predict``, ``fine_tune``). The napari widgets drive the
generators in thread workers (:mod:`napari_unetpp.napari.workers`); everything else calls :func:`run_to_end`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

__all__ = ["run_to_end"]

P = TypeVar("P")
R = TypeVar("R")


def run_to_end(gen: Generator[P, None, R], on_progress: Callable[[P], None] | None = None) -> R:
    """Exhaust ``gen``, passing each yielded value to ``on_progress``; return the generator's return value."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(p)
