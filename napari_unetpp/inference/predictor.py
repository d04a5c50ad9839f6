"""Predictors for the sliding window (:class:`~napari_unetpp.inference.sliding_window.Predictor`): what prediction
wraps around a runtime, and the network being trained.

- :class:`SafePredictor` wraps any predictor: it runs a batch in chunks and halves them on out-of-memory, and, for a
  runtime other than PyTorch that fails otherwise, runs the rest on PyTorch (in an automatic choice) or raises one
  sentence (a runtime asked for by name). Prediction runs every batch through it.
- :func:`network_predictor` is a module being trained (or any ``UNetPlusPlus``), run by PyTorch in eval mode at its
  current weights: validation during fine-tuning scores it, and a live preview of training would show it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from napari_unetpp.inference.sliding_window import Predictor
from napari_unetpp.runtimes import (
    Choice,
    RuntimeUnavailable,
    TorchBackend,
    hold_cores,
    is_oom,
    release_memory,
    runtime_failed,
)

__all__ = ["SafePredictor", "describe_predictor", "network_predictor"]

log = logging.getLogger(__name__)


def network_predictor(
    module: Any, depth: int, device: torch.device, precision: str = "fp32", why: str = "the network being trained"
) -> TorchBackend:
    """``module`` (a ``UNetPlusPlus``, e.g. the one being trained) at ``depth`` as a predictor, run by PyTorch with
    its weights as they are when called (never a cached inference copy or an exported graph, which would hold
    earlier weights). The module must be in eval mode while it predicts (batch norms use their running statistics);
    the caller sets and restores that.

    Args:
        module: The network; its ``config`` gives the classes and the cue.
        depth: Heads 1..depth are returned.
        device: Where the module is.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (autocast).
        why: What :attr:`Choice.reason` says (in ``Prediction.ran_on``).
    """
    return TorchBackend(module, depth, device, precision, Choice("torch", precision, why))


def describe_predictor(predictor: Any, device: torch.device) -> tuple[str, str]:
    """``(ran_on, runtime)`` of a run: a runtime backend says what it is and why it was chosen; another predictor is
    named by its type."""
    choice = getattr(predictor, "choice", None)
    if isinstance(choice, Choice):
        return choice.describe(device), choice.runtime
    return f"{type(predictor).__name__} (a predictor passed in), with the tiles on {device}", "predictor"


class SafePredictor:
    """``predictor`` run in chunks of at most :attr:`batch` tiles, halved on out-of-memory (recognised strictly:
    :func:`~napari_unetpp.runtimes.is_oom`); another failure of a runtime other than PyTorch runs the rest on
    ``fallback(exc)`` (PyTorch) in an automatic choice, and is a one-sentence error where that runtime was asked
    for by name. A predictor that is no runtime (no ``choice``) raises its errors as they are. A CPU run holds the
    cores (:func:`~napari_unetpp.runtimes.hold_cores`) until :meth:`close`, so no runtime is measured meanwhile on
    another thread.

    Attributes:
        predictor: What runs now (the fallback, once it took over).
        batch: Tiles per call (halved on out-of-memory).
    """

    def __init__(
        self,
        predictor: Predictor,
        device: torch.device,
        batch: int,
        fallback: Callable[[BaseException], Predictor] | None = None,
    ) -> None:
        self.predictor, self.device, self.batch, self.fallback = predictor, device, batch, fallback
        self._cores = hold_cores() if device.type == "cpu" else None

    def close(self) -> None:
        """The run is over: the cores are free."""
        if self._cores is not None:
            self._cores.release()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, *tile)`` float32 input -> ``(B, k, classes [+ cue], *tile)`` float32 probabilities: NumPy
        arrays, or tensors on the predictor's device for a :class:`~napari_unetpp.runtimes.TorchBackend` (the device
        pipeline's)."""
        outs = []
        i = 0
        while i < len(x):
            chunk = x[i : i + self.batch]
            try:
                outs.append(self.forward(chunk))
                i += len(chunk)
                continue
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    choice = getattr(self.predictor, "choice", None)
                    if not isinstance(choice, Choice) or choice.runtime == "torch":
                        raise
                    if isinstance(exc, RuntimeUnavailable):
                        raise
                    if self.fallback is None:
                        raise runtime_failed(self.predictor, exc) from exc  # type: ignore[arg-type]
                    self.predictor, self.fallback = self.fallback(exc), None
                    continue
                if self.batch == 1:
                    raise MemoryError(
                        "out of memory even for a single tile; choose a smaller tile size (--tile) or the CPU."
                    ) from exc
            release_memory(self.device)  # out of memory: once the exception (and the tensors it holds) is gone
            self.batch = max(1, self.batch // 2)
            log.warning("out of memory: retrying with %d tile(s) per batch", self.batch)
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs) if isinstance(outs[0], torch.Tensor) else np.concatenate(outs)

    def forward(self, chunk: np.ndarray) -> np.ndarray:
        """One chunk through :attr:`predictor` (what a test may replace to make a run fail)."""
        if isinstance(chunk, torch.Tensor):
            assert isinstance(self.predictor, TorchBackend)
            return self.predictor.tensor(chunk)
        return self.predictor(chunk)
