"""Which threads are running on the CPU's cores, so that a runtime is measured only while it has them to itself.

A measurement must have the cores to itself: a slider preview timed while a whole-stack run computes (or the stack
run timed while a preview computes) measures the contention, and saved it would choose wrongly for good. Every CPU
run holds the cores while it lasts (prediction's runner; a measurement holds them too; a fine-tune on the CPU), by
thread.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["CoreHold", "Watch", "hold_cores", "watch_cores"]

_cores_lock = threading.Lock()
_holds: dict[int, int] = {}  # id of a CoreHold -> the thread it was taken on
_watches: list[Watch] = []  # the measurements running now


@dataclass
class Watch:
    """One measurement's view of the cores: whether another thread's run held them at some moment of it."""

    thread: int
    disturbed: bool = False


class CoreHold:
    """A run using the CPU's cores, from :func:`hold_cores` until :meth:`release` (or until it is collected: a
    generator dropped without closing). While another thread holds them, no runtime is measured, and a measurement
    during which another thread took them is not remembered."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        with _cores_lock:
            _holds[id(self)] = self.thread
            for w in _watches:
                if w.thread != self.thread:
                    w.disturbed = True
        self._release = weakref.finalize(self, _holds.pop, id(self), None)

    def release(self) -> None:
        """The run is over (again: nothing)."""
        with _cores_lock:
            self._release()

    def __enter__(self) -> CoreHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_cores() -> CoreHold:
    """Say that this thread runs on the CPU's cores until ``.release()`` (or as ``with hold_cores(): ...``): a
    prediction does it for its whole run; a long CPU job beside predictions (training) may too."""
    return CoreHold()


@contextlib.contextmanager
def watch_cores() -> Iterator[Watch]:
    """``with watch_cores() as w``: ``w.disturbed`` says whether another thread held the cores at its start or
    took them since."""
    w = Watch(threading.get_ident())
    with _cores_lock:
        w.disturbed = any(t != w.thread for t in list(_holds.values()))  # a copy: a collected hold leaves any time
        _watches.append(w)
    try:
        yield w
    finally:
        with _cores_lock:
            _watches.remove(w)
