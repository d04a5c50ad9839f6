"""Thread glue: run a core generator in a napari thread worker (or synchronously when NAPARI_UNETPP_SYNC=1).

Handlers are called on the main thread: ``on_yield(progress)`` for each yielded value, ``on_return(result)``, and
``on_error(message)`` with one sentence for the user. ``worker.quit()`` stops the generator at its next yield.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from typing import Any

import torch
from napari.utils.notifications import show_error

from napari_unetpp.errors import UserError
from napari_unetpp.jobs import run_to_end

log = logging.getLogger(__name__)

USER_ERRORS = (UserError, ValueError, MemoryError, FloatingPointError, torch.cuda.OutOfMemoryError)


def user_message(exc: BaseException) -> str:
    """One sentence for the user: the message of our own errors, a generic one with the cause otherwise."""
    if isinstance(exc, USER_ERRORS) and str(exc):
        return str(exc).splitlines()[0]
    if "out of memory" in str(exc).lower():
        return "Out of memory: choose a smaller tile size or the CPU."
    return f"UNet++ failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'})."


def synchronous() -> bool:
    """True when generators run in the calling thread (tests, scripting)."""
    return os.environ.get("NAPARI_UNETPP_SYNC") == "1"


def run_generator(
    gen_factory: Callable[[], Generator[Any, None, Any]],
    on_yield: Callable[[Any], None],
    on_return: Callable[[Any], None],
    on_error: Callable[[str], None] | None = None,
    on_finish: Callable[[], None] | None = None,
) -> Any:
    """Start ``gen_factory()`` in a napari thread worker; return the worker (None when run synchronously)."""

    def error(exc: BaseException) -> None:
        log.debug("worker error", exc_info=exc)
        (on_error or show_error)(user_message(exc))

    if synchronous():
        try:
            on_return(run_to_end(gen_factory(), on_yield))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence
            error(exc)
        finally:
            if on_finish:
                on_finish()
        return None

    from napari.qt.threading import create_worker

    def body():
        return (yield from gen_factory())

    worker = create_worker(body)
    worker.yielded.connect(on_yield)
    worker.returned.connect(on_return)
    worker.errored.connect(error)
    if on_finish:
        worker.finished.connect(on_finish)
    worker.start()
    return worker


def abandon(workers: list[Any], *_: Any, stop: Any = None) -> None:
    """A widget is going away: disconnect its running workers from it and ask them to stop (``stop``: an event the
    job polls, e.g. fine-tuning's, which then saves its best state). Connected to the widget's ``destroyed`` signal
    with the list itself, never the widget, so nothing keeps a closed widget alive and no handler runs on a deleted
    one."""
    if stop is not None:
        stop.set()
    for w in list(workers):
        for sig in ("yielded", "returned", "errored", "finished"):
            try:
                getattr(w, sig).disconnect()
            except (TypeError, RuntimeError):  # nothing connected, or already deleted
                pass
        try:
            w.quit()
        except RuntimeError:
            pass
    workers.clear()
