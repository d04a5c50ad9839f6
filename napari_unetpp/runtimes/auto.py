"""The backend of an auto run not measured yet: it measures PyTorch against the other runtimes on one of the run's
own batches, then keeps the fastest for the rest of the run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import numpy as np

from napari_unetpp.runtimes.base import NAMES, PRECISIONS, Backend, Choice, RuntimeUnavailable
from napari_unetpp.runtimes.choices import decide, kept_choice
from napari_unetpp.runtimes.cores import Watch, hold_cores, watch_cores
from napari_unetpp.runtimes.device import is_oom
from napari_unetpp.runtimes.failures import failed_here, mark_failed, memo_key
from napari_unetpp.runtimes.torch_backend import TorchBackend

__all__ = ["AutoBackend"]

log = logging.getLogger(__name__)
_MEASURING: dict[str, threading.Lock] = {}  # per choice key: held while one run measures it
_measuring_lock = threading.Lock()


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class AutoBackend(Backend):
    """Measures PyTorch against the other runtimes installed on one of the run's batches (its first, unless another
    run was using the CPU), then keeps the fastest for the rest of the run.

    A measuring call runs the batch through each runtime twice (a warm-up for first-run allocations and kernel
    choice, then a timed run) and returns the fastest one's output. A runtime that cannot be built or fails on the
    batch is left out (logged), and a measurement without it is not saved. Otherwise the answer is saved, so this
    happens once per machine and batch shape.

    One run measures a key at a time, and only while no other thread's run holds the cores
    (:class:`~napari_unetpp.runtimes.cores.CoreHold`): a batch that finds the key being measured, or the cores taken,
    runs on PyTorch without measuring (a slider preview during a whole-stack run answers at once instead of waiting
    seconds for exports and timings), and the next batch tries again, so a preview overlapping the start of a long
    run does not cost that run its faster runtime. The outputs of such a run come from two runtimes (its first
    batches from PyTorch), which agree to about 1e-6 in fp32 (ONNX Runtime against PyTorch on the shipped EM model:
    9e-7 at L2, 1.5e-6 at L4, masks equal; in a bf16 run, to bf16's rounding). A measurement during which another
    run took the cores serves its own run but is not remembered.

    ``precision`` is PyTorch's in this run (``"fp32"``, or ``"bf16"`` on a CPU with native bf16, where OpenVINO bf16
    is among ``others``); the other runtimes compute in theirs (:data:`~napari_unetpp.runtimes.base.PRECISIONS`).
    """

    def __init__(
        self,
        torch_backend: TorchBackend,
        others: dict[str, Callable[[], Backend]],
        key: str,
        depth: int,
        precision: str = "fp32",
        candidates: Collection[str] | None = None,
    ) -> None:
        self.torch, self._others, self.key, self.depth = torch_backend, others, key, depth
        self.precision = precision
        # every runtime a run in this precision measures (those failed here too: a measurement without one is
        # not saved), not the runtimes of the other precision
        self.candidates = tuple(others if candidates is None else candidates)
        self.choice = Choice("auto", precision, "measuring")
        self.decided: Backend | None = None
        self._unmeasured = 0  # batches run on PyTorch so far, waiting to measure

    def memory(self) -> object | None:
        return None if self.decided is None else self.decided.memory()

    def release(self) -> bool:
        return True if self.decided is None else self.decided.release()

    def _settle(self, backend: Backend, choice: Choice) -> None:
        if self._unmeasured and backend is not self.torch:  # else PyTorch ran the whole run anyway
            n = self._unmeasured
            choice = replace(
                choice,
                reason=f"{choice.reason}; PyTorch ran the first {n} batch{'es' if n > 1 else ''}, "
                "while another run used the CPU",
            )
        self.decided, self.choice = backend, choice
        backend.choice = choice

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.decided is not None:
            return self.decided(x)
        with _measuring_lock:
            lock = _MEASURING.setdefault(self.key, threading.Lock())
        if not lock.acquire(blocking=False):
            return self._meanwhile(x, "another run is measuring this shape")
        try:
            memo = memo_key(self.key, self.torch.net, self.depth, self.candidates)  # measured since make_backend?
            known = kept_choice((memo, self.key), ("torch", *self._others))
            if known is not None:
                backend = self._use(known)
            else:
                with hold_cores(), watch_cores() as watch:
                    if not watch.disturbed:
                        return self._measure(x, watch)
                backend = None
        finally:
            lock.release()
        return backend(x) if backend is not None else self._meanwhile(x, "another run was using the CPU")

    def _meanwhile(self, x: np.ndarray, why: str) -> np.ndarray:
        """This batch on PyTorch, unmeasured; the decision stays open for the next batch."""
        self._unmeasured += 1
        self.choice = Choice("torch", self.precision, f"{why}: not measured")
        return self.torch(x)

    def _use(self, choice: Choice) -> Backend:
        """The runtime another run's measurement chose, settled on (PyTorch if it cannot be built here)."""
        backend: Backend = self.torch
        if choice.runtime != "torch":
            try:
                backend = self._others[choice.runtime]()
            except RuntimeUnavailable as exc:
                log.warning("%s not used: %s", NAMES[choice.runtime], exc)
                choice = Choice("torch", self.precision, str(exc))
        self._settle(backend, choice)
        return backend

    def _measure(self, x: np.ndarray, watch: Watch) -> np.ndarray:
        backends: dict[str, Backend] = {"torch": self.torch}
        failed = []
        net = self.torch.net
        for name, make in self._others.items():
            if name in failed_here(net, self.depth):  # failed on another thread since this run began
                continue
            try:
                backends[name] = make()
            except RuntimeUnavailable as exc:  # a failed export or compilation: not tried again in this process
                failed.append(str(exc))
                mark_failed(net, self.depth, name, exc)
                log.warning("%s not used: %s", NAMES[name], exc)
        seconds, outs = {}, {}
        # each runtime's warm-up, then its timed run at once: timed after every warm-up, PyTorch measured about 2x
        # slower than alone on 2 cores (OpenVINO bf16 at L1 and L4: 4.6x/2.8x PyTorch bf16 that way, 2.4x/1.5x this way)
        for name in list(backends):  # a runtime that fails here is left out
            try:
                backends[name](x)
                seconds[name], outs[name] = _time(lambda b=backends[name]: b(x))  # type: ignore[misc]
            except (RuntimeError, MemoryError) as exc:
                if name == "torch" or is_oom(exc):
                    raise  # out of memory: the caller halves the batch and this measures again
                failed.append(f"{NAMES[name]} failed ({exc})")
                mark_failed(net, self.depth, name, exc)
                log.warning("%s not used: it failed on the first batch (%s)", NAMES[name], exc)
                backends.pop(name)
        if len(backends) == 1:
            self._settle(self.torch, Choice("torch", self.precision, "; ".join(dict.fromkeys(failed))))
            return outs["torch"]
        shape = f"{x.shape[0]}x{'x'.join(map(str, x.shape[2:]))}"
        without = sorted(failed_here(net, self.depth, self.candidates))  # earlier in this process, or just now
        keep = "run" if watch.disturbed else "process" if without else "saved"
        precisions = {"torch": self.precision} | {r: PRECISIONS[r] for r in backends if r != "torch"}
        memo = memo_key(self.key, net, self.depth, self.candidates)
        choice = decide(self.key, self.depth, shape, seconds, keep, memo, without, precisions)
        self._settle(backends[choice.runtime], choice)
        for backend in backends.values():
            if backend is not self.decided:
                backend.release()
        return outs[choice.runtime]
