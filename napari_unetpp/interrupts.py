"""Ctrl-C, in one place: held off for a group of renames, or turned into a request to stop a long job gently.

Both act only in the main thread (Python delivers signals there; elsewhere they are no-ops), and both put the
previous handler back when they end.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["ctrl_c_held", "ctrl_c_sets"]


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Ignore Ctrl-C for the few microseconds of a group of renames, so outputs are all in place or none are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def ctrl_c_sets(stop: threading.Event, message: str) -> Iterator[None]:
    """The first Ctrl-C sets ``stop`` and prints ``message`` to stderr (the job ends at its next step and keeps
    what it has); a second one interrupts (``KeyboardInterrupt``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{message}", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
