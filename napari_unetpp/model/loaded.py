"""A model in memory: the network, its card, where it came from, and what is built from it for inference (built once
however many threads ask)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.files import read_calibration
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.runtimes import optimize_for_inference

__all__ = ["LoadedModel"]


class _BuildOnce:
    """Builds each key's value once however many threads ask at the same time (the others wait for it and get the
    same object); different keys build in parallel (an OpenVINO compilation for L4 does not hold up a slider's L2).
    Pickles and copies as a fresh one: locks do not travel, and a copy builds its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def __reduce__(self) -> tuple[type[_BuildOnce], tuple[()]]:
        return (_BuildOnce, ())

    def get(self, store: dict[str, Any], key: str, build: Callable[[], Any]) -> Any:
        """``store[key]``, made by ``build()`` (once) if it is not there."""
        if key in store:
            return store[key]
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            if key not in store:  # another thread may have built it while this one waited
                store[key] = build()
            return store[key]


@dataclass
class LoadedModel:
    """A model ready to use: the network (fp32, eval mode on CPU), its card and where it came from.

    What it builds for inference (the inference copy per device, ONNX Runtime sessions, OpenVINO compiled models:
    :meth:`inference_module`, :meth:`kept`) is built once however many threads ask at the same time (a slider preview
    beside a whole-stack run). Its int8 calibration tiles are :attr:`calibration`.
    """

    module: UNetPlusPlus
    card: ModelCard
    path: Path | None = None
    shipped: bool = False
    _cache: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    _once: _BuildOnce = field(default_factory=_BuildOnce, init=False, repr=False, compare=False)
    _calibration: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_module(cls, module: UNetPlusPlus, name: str = "unsaved", **card: Any) -> LoadedModel:
        """Wrap an in-memory network with a minimal card (e.g. right after training)."""
        return cls(module, ModelCard(name=name, architecture=module.config.to_dict(), **card))

    @property
    def normalization(self) -> Normalization:
        """The card's normalisation recipe."""
        return Normalization.from_dict(self.card.normalization)

    @property
    def max_depth(self) -> int:
        """Deepest level."""
        return self.module.max_depth

    @property
    def fingerprint(self) -> str:
        """What identifies these weights: the card's SHA-256 of the weights file, else (a model only in memory) a
        hash of its parameters, computed once. Two different files with the same ``name@vN`` differ here."""
        if self.card.weights_sha256:
            return self.card.weights_sha256

        def digest() -> str:
            h = hashlib.sha256()
            for k, v in self.module.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        return str(self.kept("fingerprint", digest))

    @property
    def calibration(self) -> np.ndarray | None:
        """The int8 calibration tiles, ``(n, C, *tile)`` float16
        (:func:`~napari_unetpp.runtimes.int8.calibration_tiles`): those set here (right after fine-tuning, also when
        the model could not be saved), else those saved beside the weights (read each time), else None."""
        if self._calibration is not None:
            return np.asarray(self._calibration)
        return None if self.path is None else read_calibration(Path(self.path))

    @calibration.setter
    def calibration(self, tiles: np.ndarray | None) -> None:
        self._calibration = tiles

    def inference_module(self, device: torch.device | str = "cpu") -> UNetPlusPlus:
        """Eval-mode copy on ``device`` with batch norms folded in; cached per device, built once."""
        dev = torch.device(device)
        return self._once.get(self._cache, str(device), lambda: optimize_for_inference(self.module, dev))

    def kept(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, kept on this model under ``key``: built once, however many threads ask at the same time.

        Args:
            key: What the value is kept under (e.g. ``"ort:<graph file>:t4"``).
            build: Makes the value (an ONNX Runtime session, an OpenVINO compiled model, a hash).
        """
        return self._once.get(self._memo, key, build)
