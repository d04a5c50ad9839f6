"""Where to correct next: the planes and regions where the nested heads disagree most.

UNet++'s heads 1..k are segmenters of increasing depth sharing one encoder; where they disagree the network is
unsure. Their spread (:func:`~napari_unetpp.inference.postprocess.level_disagreement`, the Segment widget's
"disagreement" layer) costs no extra forward pass: :func:`correction_order` ranks regions of every plane by it.

    pred = predict(stack, "nuclei", levels="all")
    for s in correction_order(pred)[:5]:
        print(s)                       # "slice 12, top left: 0.31"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_unetpp.inference.postprocess import level_disagreement

__all__ = ["REGION_NAMES", "Suggestion", "correction_order", "disagreement_map"]

REGION_NAMES = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "centre",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}


@dataclass(frozen=True)
class Suggestion:
    """One region to correct.

    Attributes:
        plane: Indices over the leading axes (``()`` for a single plane).
        region: Where in the plane, in words (a 3 x 3 grid: ``"top left"`` ... ``"bottom right"``).
        score: Mean disagreement of the heads there (their standard deviation; 0 = all agree).
        box: The region's ``(y0, y1, x0, x1)`` in pixels.
    """

    plane: tuple[int, ...]
    region: str
    score: float
    box: tuple[int, int, int, int]

    def __str__(self) -> str:
        where = f"slice {', '.join(map(str, self.plane))}, " if self.plane else ""
        return f"{where}{self.region}: {self.score:.2f}"

    @property
    def centre(self) -> tuple[float, ...]:
        """The region's centre in data coordinates (leading indices, then y and x): where to move the view."""
        y0, y1, x0, x1 = self.box
        return (*map(float, self.plane), (y0 + y1) / 2, (x0 + x1) / 2)


def disagreement_map(probabilities: Mapping[int, np.ndarray] | Sequence[np.ndarray], classes: bool = False) -> Any:
    """The heads' spread per pixel, from per-level probabilities (a prediction's ``probabilities``, with
    ``levels="all"``); ``classes``: the maps have a leading class axis (multi-class models), averaged over."""
    maps = list(probabilities.values()) if isinstance(probabilities, Mapping) else list(probabilities)
    if len(maps) < 2:
        raise ValueError("where to correct needs two levels or more: predict with levels='all' at depth 2 or deeper.")
    spread = level_disagreement(maps).astype(np.float32)
    return spread.mean(axis=0) if classes else spread


def correction_order(prediction: Any, *, top: int | None = None, grid: int = 3) -> list[Suggestion]:
    """Regions of every plane, most uncertain first (mean spread of the heads in each cell of a ``grid`` x ``grid``
    split of the plane).

    Args:
        prediction: A :class:`~napari_unetpp.inference.result.Prediction` with two levels or more (``levels="all"``),
            or a disagreement map (the image's shape without C; e.g. the widget's disagreement layer).
        top: Keep the first ``top`` (default all).
        grid: Cells per side (3: the named regions of :data:`REGION_NAMES`).

    Raises:
        ValueError: fewer than two levels, or a map with fewer than two dimensions.
    """
    if hasattr(prediction, "probabilities"):
        mask = np.asarray(prediction.mask)
        spread = disagreement_map(prediction.probabilities, classes=prediction_has_classes(prediction, mask))
    else:
        spread = np.asarray(prediction, dtype=np.float32)
    if spread.ndim < 2:
        raise ValueError(f"a disagreement map needs two dimensions or more, got {spread.shape}.")
    h, w = spread.shape[-2:]
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    out = []
    for plane in np.ndindex(*spread.shape[:-2]):
        img = spread[plane]
        for gy in range(grid):
            for gx in range(grid):
                cell = img[ys[gy] : ys[gy + 1], xs[gx] : xs[gx + 1]]
                if cell.size == 0:
                    continue
                name = REGION_NAMES.get((gy, gx), f"row {gy + 1}, column {gx + 1}") if grid == 3 else f"cell {gy},{gx}"
                box = (int(ys[gy]), int(ys[gy + 1]), int(xs[gx]), int(xs[gx + 1]))
                out.append(Suggestion(tuple(int(v) for v in plane), name, float(cell.mean()), box))
    out.sort(key=lambda s: -s.score)
    return out[:top] if top is not None else out


def prediction_has_classes(prediction: Any, mask: np.ndarray) -> bool:
    """Whether a prediction's probabilities carry a leading class axis (multi-class models)."""
    first = next(iter(prediction.probabilities.values()), None)
    return first is not None and np.ndim(first) == mask.ndim + 1
