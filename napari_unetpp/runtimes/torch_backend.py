"""The network run by PyTorch itself: what every device and precision can run, and what the other runtimes are
measured against.

Two ways in: ``backend(batch)`` takes and returns NumPy arrays (the host pipeline: tiles read and blended on the
CPU), :meth:`TorchBackend.tensor` takes and returns tensors on the backend's device (the device pipeline,
:mod:`napari_unetpp.inference.on_device`). On an accelerator its memory is the device's caching allocator, kept
between back-to-back runs (:func:`~napari_unetpp.runtimes.memory.device_memory`), and a fixed batch shape can be
compiled (:meth:`TorchBackend.compile_for`, ``torch.compile``) once per network, depth, shape and precision.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from napari_unetpp.model.network import probabilities
from napari_unetpp.runtimes.base import Backend, Choice, one_line
from napari_unetpp.runtimes.device import autocast_context, is_oom, memory_format
from napari_unetpp.runtimes.memory import device_memory

__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

# Compiled forwards per network: {(depth, batch shape, precision, memory format): function}, or None where compiling
# failed (never tried again for that key). Weak, so a network that is dropped takes its compiled graphs with it.
_compiled: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], Callable[..., torch.Tensor] | None]]
_compiled = weakref.WeakKeyDictionary()


class TorchBackend(Backend):
    """The network in PyTorch (autocast where it pays, channels-last)."""

    def __init__(self, net: Any, depth: int, device: torch.device, precision: str, choice: Choice) -> None:
        self.net, self.depth, self.device, self.precision, self.choice = net, depth, device, precision, choice
        self.num_classes, self.cue = net.config.num_classes, net.config.has_cue
        self.fmt = memory_format(net, device)
        self.compiled_calls = 0  # batches that ran through a compiled graph (what a benchmark reports)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(self.device, non_blocking=True)
        return self.tensor(t).cpu().numpy()

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *tile)`` float32 on :attr:`device` -> ``(B, k, classes [+ cue], *tile)`` float32 probabilities on
        :attr:`device`, through the compiled graph of this shape if :meth:`compile_for` made one."""
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            t = x.contiguous(memory_format=self.fmt)
            fn = _compiled.get(self.net, {}).get(self._key(tuple(t.shape)))
            if fn is not None:
                try:
                    logits = fn(self.net, self.depth, self.cue, t)
                    self.compiled_calls += 1
                except Exception as exc:  # noqa: BLE001 - a compiler failure must not fail the run
                    if is_oom(exc):
                        raise  # out of memory: the caller halves the batch; compiling did not fail
                    self._give_up(tuple(t.shape), exc)
                    logits = self._heads(t)
            else:
                logits = self._heads(t)
            return probabilities(logits.float(), self.num_classes, dim=2)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return _heads(self.net, self.depth, self.cue, t)

    # ------------------------------------------------------------------------------------------------ compile
    def _key(self, shape: tuple[int, ...]) -> tuple[Any, ...]:
        return self.depth, shape, self.precision, str(self.fmt)

    def is_compiled(self, shape: tuple[int, ...]) -> bool:
        """Whether batches of ``shape`` run through a compiled graph (or compiling them failed here before)."""
        return self._key(tuple(shape)) in _compiled.get(self.net, {})

    def compile_for(self, shape: tuple[int, ...]) -> None:
        """Compile the forward for batches of exactly ``shape`` (``torch.compile``, static shapes; the compilation
        itself happens on the next batch of that shape, 4-5 s on an H100). Kept per network, depth, shape and
        precision for the rest of the process; a compiler that fails (no Triton, no C++ compiler) is logged once
        and that shape runs eagerly from then on."""
        per_net = _compiled.setdefault(self.net, {})
        key = self._key(tuple(shape))
        if key in per_net:
            return
        try:
            per_net[key] = torch.compile(_heads, dynamic=False)  # not a bound method: it would hold the network
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile unsupported on this Python
            self._give_up(tuple(shape), exc)

    def _give_up(self, shape: tuple[int, ...], exc: BaseException) -> None:
        log.warning("torch.compile not used for L%d batches of %s: %s", self.depth, shape, one_line(exc))
        _compiled.setdefault(self.net, {})[self._key(shape)] = None

    # ------------------------------------------------------------------------------------------------- memory
    def memory(self) -> object | None:
        """On an accelerator, its caching allocator (kept between back-to-back runs); on the CPU, nothing."""
        return device_memory(self.device) if self.device.type != "cpu" else None

    def release(self) -> bool:
        """Give an accelerator's cached memory back (False while a run or a live session uses it)."""
        return device_memory(self.device).release() if self.device.type != "cpu" else True


def _heads(net: Any, depth: int, cue: bool, t: torch.Tensor) -> torch.Tensor:
    """Heads 1..depth of ``net`` on ``t``: ``(B, k, classes [+ cue], ...)`` logits."""
    outs = net(t, depth=depth, cue=True) if cue else net(t, depth=depth)
    return torch.stack(outs, dim=1)
