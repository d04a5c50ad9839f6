"""What a prediction returns and reports: :class:`Prediction`, :class:`Progress`, and the empty result a run fills.

Everything that builds a result (a plan's :meth:`~napari_unetpp.inference.plan.PredictionPlan.allocate`, the zoom
adapter's result at the image's own size) goes through :func:`empty_prediction`, so the arrays, their names and their
order of allocation are the same whichever path made them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

__all__ = ["Allocator", "Prediction", "Progress", "empty_prediction"]

Allocator = Callable[[tuple[int, ...], str, str], Any]


@dataclass
class Prediction:
    """Result of :func:`~napari_unetpp.inference.predict.predict`.

    Attributes:
        mask: Binary mask (0/1, uint8) for 1-class models or class labels for multi-class models, with the image's
            axes minus C (``axes``).
        probabilities: Level -> probability map (``prob_dtype``); binary models: same shape as ``mask``;
            multi-class: ``(classes, *mask.shape)``.
        ensemble: Mean of heads 1..k (the paper's accurate mode), when computed.
        depth: The level k that produced ``mask`` (with ``mode``).
        mode: ``"pruned"`` (head k alone) or ``"ensemble"`` (mean of heads 1..k).
        threshold: Foreground threshold used for 1-class models.
        axes: Axes of ``mask``.
        seconds: Wall-clock time of the run.
        ran_on: What ran the network, where, and why, in one sentence: e.g. ``"CPU · ONNX Runtime fp32 (1.52x
            PyTorch on this CPU at L4, batches of 4x512x512)"`` (see :mod:`napari_unetpp.runtimes`).
        tiles: Number of tiles evaluated.
        cue: The instance cue (probability in [0, 1]) of the level (or ensemble) that made ``mask``, for a model
            with a cue (see :class:`~napari_unetpp.model.network.UNetPlusPlusConfig`); else None.
        cues: Level -> cue map for the kept levels, for a model with a cue.
        objects: Instance labels (uint32, unique across the whole array) when ``objects`` was asked for.
        objects_method: The split that made ``objects`` (``"learned"`` falls back to ``"watershed"`` for a model
            without a cue), or ``"none"``.
        channels: How the image's channels were fitted to the model: ``"channel N of M"``, ``"RGB as grey
            (luminance)"``, or ``""`` (as they were).
        objects_count: The largest object ID in ``objects`` (the number of objects).
        runtime: What ran the network: ``"torch"``, ``"onnx"`` (ONNX Runtime fp32), ``"openvino"`` (OpenVINO fp32),
            ``"openvino-bf16"``, ``"onnx-int8"``, ``"openvino-int8"``, or ``"predictor"`` (a predictor the caller
            passed in).
    """

    mask: np.ndarray
    probabilities: dict[int, np.ndarray]
    ensemble: np.ndarray | None
    depth: int
    mode: str
    threshold: float
    axes: str
    seconds: float = 0.0
    ran_on: str = "cpu"
    tiles: int = 0
    cue: np.ndarray | None = None
    cues: dict[int, np.ndarray] = field(default_factory=dict)
    objects: np.ndarray | None = None
    objects_method: str = "none"
    channels: str = ""
    objects_count: int = 0
    runtime: str = "torch"

    @property
    def device(self) -> str:
        """Deprecated alias of :attr:`ran_on` (read, set, and accepted as a keyword by the constructor and
        :func:`dataclasses.replace`; kept for one release)."""
        warnings.warn("Prediction.device is deprecated; read Prediction.ran_on instead.", DeprecationWarning, 2)
        return self.ran_on

    @device.setter
    def device(self, value: str) -> None:
        warnings.warn("Prediction.device is deprecated; set Prediction.ran_on instead.", DeprecationWarning, 2)
        self.ran_on = value


def _accepting_device(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that also takes the old keyword ``device=`` (deprecated), as the value of ``ran_on``."""
    names = [f.name for f in fields(Prediction)]

    @functools.wraps(init)
    def __init__(self: Prediction, *args: Any, device: str | None = None, **kwargs: Any) -> None:
        if device is not None:
            warnings.warn("Prediction(device=...) is deprecated; pass ran_on=... instead.", DeprecationWarning, 2)
            if len(args) > names.index("ran_on"):
                args = (*args[: names.index("ran_on")], device, *args[names.index("ran_on") + 1 :])
            else:
                kwargs["ran_on"] = device
        init(self, *args, **kwargs)

    return __init__


Prediction.__init__ = _accepting_device(Prediction.__init__)  # type: ignore[method-assign]


@dataclass
class Progress:
    """Progress of :func:`~napari_unetpp.inference.predict.predict_iter`.

    Attributes:
        done: Tiles evaluated so far.
        total: Tiles in the whole run.
        planes_done: Indices (over the non-spatial, non-channel axes) of the planes completed since the last report.
        partial: The result being filled; the planes reported done are final in it.
    """

    done: int
    total: int
    planes_done: list[tuple[int, ...]] = field(default_factory=list)
    partial: Prediction | None = None

    @property
    def fraction(self) -> float:
        """Completed fraction in [0, 1]."""
        return self.done / max(self.total, 1)


def empty_prediction(
    shape: tuple[int, ...],
    num_classes: int,
    levels: Sequence[int],
    mode: str,
    prob_dtype: str,
    *,
    cue: bool,
    objects: bool,
    allocate: Allocator | None = None,
    **fields: Any,
) -> Prediction:
    """An empty :class:`Prediction` with a mask of ``shape``: ``allocate(shape, dtype, name)`` makes each array
    (default ``np.zeros``), in this order: ``"mask"``, ``"L<k>"`` (level k's probabilities, for each of ``levels``),
    ``"ensemble"`` (ensemble mode), ``"cue"`` and ``"cue_L<k>"`` (with ``cue``), ``"objects"`` (with ``objects``).
    ``fields`` sets the other attributes (``depth``, ``mode`` and ``axes`` are required)."""
    alloc = allocate or (lambda shape, dtype, name: np.zeros(shape, dtype))
    pshape = shape if num_classes == 1 else (num_classes, *shape)
    return Prediction(
        mask=alloc(shape, "uint8" if num_classes <= 255 else "uint16", "mask"),
        probabilities={lv: alloc(pshape, prob_dtype, f"L{lv}") for lv in levels},
        ensemble=alloc(pshape, prob_dtype, "ensemble") if mode == "ensemble" else None,
        mode=mode,
        cue=alloc(shape, prob_dtype, "cue") if cue else None,
        cues={lv: alloc(shape, prob_dtype, f"cue_L{lv}") for lv in levels} if cue else {},
        objects=alloc(shape, "uint32", "objects") if objects else None,
        **fields,
    )
