"""Memory a run leaves behind, given back a moment after the run rather than at its end.

A large run keeps its memory for :data:`RELEASE_AFTER_S` seconds: the next run within that time (the next file of a
batch, a slider preview after a whole-stack run, a benchmark's repeat) skips the allocation. Measured at L4 on
5 x 512^2 slices with OpenVINO: 1.85 s a run back to back, against 2.85 s with the memory released at the end of
each run. What is kept:

- ONNX Runtime's arena and OpenVINO's buffers (1.5 GB at L4 on 4 x 512^2), per graph;
- an accelerator's caching allocator (CUDA, MPS): :func:`device_memory`, one per device, shared by every run there.
  It is not given back while a run uses it (:meth:`DeviceMemory.use`), nor while a live session trains and previews
  on that device (it holds it for the session); :func:`release_pending` gives it back at once before a batch
  fine-tune.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from napari_unetpp.runtimes.base import Backend
from napari_unetpp.runtimes.device import release_memory

__all__ = ["RELEASE_AFTER_S", "DeviceMemory", "device_memory", "release_later", "release_pending"]

RELEASE_AFTER_S = 10.0
_timer: Callable[..., Any] = threading.Timer  # what waits (tests put a timer they fire themselves)
_pending: dict[int, tuple[Any, Backend]] = {}  # by id of the memory's holder: (its timer, the backend)
_pending_lock = threading.Lock()


def release_later(backend: Backend, delay: float | None = None) -> None:
    """Give ``backend``'s memory back after ``delay`` seconds (:data:`RELEASE_AFTER_S`; 0: now). Another call for the
    same memory restarts the wait, so back-to-back runs keep it; if a run is using it when the time comes, it waits
    that long again."""
    holder = backend.memory()
    if holder is None:
        return
    delay = RELEASE_AFTER_S if delay is None else delay
    key = id(holder)
    with _pending_lock:
        old = _pending.pop(key, None)
        if old is not None:
            old[0].cancel()
        if delay > 0:
            token = object()  # which wait this is: a restarted wait's timer may still fire (cancel() came late)
            timer = _timer(delay, _release_due, (key, backend, delay, token))
            timer.daemon = True
            timer.token = token
            _pending[key] = (timer, backend)
            timer.start()
            return
    _release_or_retry(backend, RELEASE_AFTER_S)


def _release_due(key: int, backend: Backend, delay: float, token: object) -> None:
    with _pending_lock:
        entry = _pending.get(key)
        if entry is None or getattr(entry[0], "token", None) is not token:
            return  # restarted or released meanwhile
        del _pending[key]
    _release_or_retry(backend, delay)


def _release_or_retry(backend: Backend, retry_after: float) -> None:
    if not backend.release():  # a run is using it: try again later (never at once, or this would spin)
        release_later(backend, max(retry_after, 1.0))


def release_pending() -> None:
    """Give back now the memory waiting for :func:`release_later` (before training, which needs memory of its own)."""
    with _pending_lock:
        entries = list(_pending.values())
        _pending.clear()
    for timer, backend in entries:
        timer.cancel()
        _release_or_retry(backend, RELEASE_AFTER_S)


class DeviceMemory:
    """The cached memory of one accelerator (PyTorch's caching allocator): what :func:`release_later` gives back
    after a run on CUDA or MPS, unless it is in use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._users = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        """A run or a session starts using the memory: :meth:`release` keeps it until the matching :meth:`leave`."""
        with self._lock:
            self._users += 1

    def leave(self) -> None:
        """The run or session that :meth:`enter` ed is over."""
        with self._lock:
            self._users = max(0, self._users - 1)

    @contextmanager
    def use(self) -> Iterator[None]:
        """While inside, :meth:`release` does not give the memory back (a run uses it)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @property
    def in_use(self) -> bool:
        """Whether a run or a session holds it now."""
        return self._users > 0

    def release(self) -> bool:
        """Give the cached memory back to the driver; False (nothing done) while it is in use."""
        with self._lock:  # held throughout: a run that starts meanwhile waits in enter()
            if self._users:
                return False
            release_memory(self.device, collect=False)  # no collection on a timer's thread (napari's objects)
        return True


_devices: dict[str, DeviceMemory] = {}


def device_memory(device: torch.device | str) -> DeviceMemory:
    """The one :class:`DeviceMemory` of ``device`` (CUDA devices by index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    with _pending_lock:
        return _devices.setdefault(str(dev), DeviceMemory(dev))


@atexit.register
def _forget_pending() -> None:  # nothing to give back at exit; a release must not run while Python shuts down
    with _pending_lock:
        for timer, _ in _pending.values():
            timer.cancel()
        _pending.clear()
