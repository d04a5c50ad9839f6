"""Scribbles, and the training data they become while the user paints.

Scribbles follow ilastik's and convpaint's convention: **0 = not annotated, 1 = background, 2.. = class 1..** (for a
1-class model 2 is the foreground). :func:`from_corrected_mask` turns a corrected mask (the Segment widget's layer: 0
is background) into scribbles on the planes the user edited, those planes being fully known.

:class:`LiveData` keeps one training item per annotated plane and rebuilds only the planes that changed, so a stroke
costs a plane, not the stack. Its validation is held out as batch fine-tuning holds it out (blocks chosen by a hash
of the plane and block position, :func:`~napari_unetpp.training.known.split_validation`), with two live rules:

- pixels that have trained once never move to validation (the split would otherwise score pixels the network saw);
- while the held-out strokes are too few to score (fewer than :data:`MIN_VAL_PIXELS`, or no class in them, or the
  training pixels would lose a class), everything trains and nothing is scored yet: the first thin strokes start
  training at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from napari_unetpp.data.axes import Layout, fit_channels, layout
from napari_unetpp.errors import TrainingDataError
from napari_unetpp.inference.plan import image_stats
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.training.data import TrainingItem, TrainingSet, plane_item

__all__ = ["BACKGROUND", "MIN_VAL_PIXELS", "UNKNOWN", "LiveData", "from_corrected_mask", "to_labels"]

UNKNOWN, BACKGROUND = 0, 1
MIN_VAL_PIXELS = 256  # held-out stroke pixels (with a class among them) before validation scores anything


def to_labels(scribbles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scribbles -> (labels, known): 1 -> 0 (background), 2.. -> 1.. (classes), 0 -> unknown."""
    s = np.asarray(scribbles)
    if s.dtype.kind not in "iub":
        raise TrainingDataError(f"scribbles must be integers (0 unknown, 1 background, 2 class), got {s.dtype}.")
    known = s > 0
    return np.where(known, s.astype(np.int64) - 1, 0), known


def from_corrected_mask(mask: np.ndarray, planes: Iterable[Any] | None = None) -> np.ndarray:
    """A corrected mask (0 background, 1.. class) as scribbles: on ``planes`` (indices over the leading axes; None:
    all) every pixel is known (mask + 1); elsewhere nothing is."""
    mask = np.asarray(mask)
    if planes is None:
        return (mask.astype(np.int64) + 1).astype(np.uint8 if mask.max(initial=0) < 255 else np.int32)
    out = np.zeros(mask.shape, np.uint8 if mask.max(initial=0) < 255 else np.int32)
    for p in planes:
        idx = tuple(p) if isinstance(p, (tuple, list)) else (p,)
        out[idx] = mask[idx] + 1
    return out


class LiveData:
    """The training items of an image being painted, rebuilt per changed plane.

    Args:
        image: The image (numpy, memmap, dask) with ``axes`` (guessed when None).
        model: The model whose normalisation, channels and classes the items follow.
        axes: The image's axes.
        channel: For a 1-channel model and a multi-channel image: the channel it reads.
        val_fraction: Share of blocks held out (as batch fine-tuning).

    Attributes:
        shape: The scribbles' shape (the image's without C).
        planes: Which leading-axis indices are planes (``()`` for a single plane or a 3D model's volume).
    """

    def __init__(
        self, image: Any, model: LoadedModel, axes: str | None = None, channel: int | None = None, val_fraction=0.2
    ) -> None:
        cfg = model.module.config
        img, ax, self.channel_note = fit_channels(image, axes, cfg.spatial_dims, cfg.in_channels, channel)
        self.lay: Layout = layout(img, ax, cfg.spatial_dims)
        if self.lay.n_ch != cfg.in_channels:
            raise TrainingDataError(
                f"the model expects {cfg.in_channels} channel(s) but the image has {self.lay.n_ch}; pick one channel."
            )
        lab_axes = "".join(a for a in self.lay.axes if a != "C")
        if lab_axes != "".join(self.lay.loop) + self.lay.spatial:
            raise TrainingDataError(f"live training needs the image's plane axes last, got {lab_axes!r}.")
        self.shape = tuple(int(s) for a, s in zip(self.lay.axes, img.shape) if a != "C")
        self.model, self.val_fraction = model, float(val_fraction)
        self.stats = image_stats(self.lay, model.normalization)  # once: every plane is normalised alike
        self.items: dict[tuple[int, ...], TrainingItem] = {}
        self._trained: dict[tuple[int, ...], np.ndarray] = {}  # pixels that have trained (never validation)
        self.holding_out = False

    def plane_of(self, index: Any) -> tuple[int, ...]:
        """A plane index as a tuple over the leading axes (an int for a single leading axis)."""
        idx = tuple(int(v) for v in index) if isinstance(index, (tuple, list)) else (int(index),)
        n = len(self.lay.loop)
        if len(idx) != n or any(not 0 <= v < d for v, d in zip(idx, self.shape)):
            raise TrainingDataError(f"plane {index} is outside the image's {self.shape[:n] or 'single'} plane(s).")
        return idx

    def update(self, scribbles: np.ndarray, planes: Sequence[tuple[int, ...]], focus: dict | None = None) -> None:
        """Rebuild the items of ``planes`` from ``scribbles`` (the whole array); ``focus``: per plane, the pixels
        painted last (sampled more often)."""
        for idx, it in self.items.items():
            if idx not in planes:
                it.focus = None  # strokes painted earlier are replayed, not sampled more often
        for idx in planes:
            labels, known = to_labels(scribbles[idx])
            if not known.any():
                self.items.pop(idx, None)
                continue
            raw = np.asarray(self.lay.src[idx])
            f = None if focus is None or idx not in focus else focus[idx] & known
            key = f"live:{idx}"
            self.items[idx] = plane_item(raw, labels, known, self.model, self.stats, key, self.val_fraction, focus=f)

    def training_set(self) -> TrainingSet | None:
        """The items with the live validation rules applied (see the module), or None while the known pixels lack
        background or a class."""
        if not self.items:
            return None
        items = [self._held_out(idx, it) for idx, it in sorted(self.items.items())]
        known = np.concatenate([it.target[it.train | it.val] for it in items])
        if len(np.unique(known > 0 if self._one_class else known)) < 2:
            return None
        train = np.concatenate([it.target[it.train] for it in items])
        val = np.concatenate([it.target[it.val] for it in items])
        self.holding_out = bool(
            val.size >= MIN_VAL_PIXELS
            and (val > 0).any()
            and len(np.unique(train > 0 if self._one_class else train)) > 1
        )
        if not self.holding_out:  # too little held out to score: all of it trains
            items = [_with(it, train=it.train | it.val, val=np.zeros_like(it.val)) for it in items]
        for idx, it in zip(sorted(self.items), items):
            self._trained[idx] = self._trained.get(idx, np.zeros_like(it.train)) | it.train
            it.index()
        ds = TrainingSet(items, self.model.module.config.spatial_dims, {"pairs": []})
        ds.summary.update(n_items=len(items), train_pixels=ds.n_train, val_pixels=ds.n_val)
        return ds

    @property
    def _one_class(self) -> bool:
        return self.model.module.config.num_classes == 1 or self.model.module.config.has_cue

    def _held_out(self, idx: tuple[int, ...], it: TrainingItem) -> TrainingItem:
        """The item with pixels that trained before moved out of validation."""
        seen = self._trained.get(idx)
        if seen is None or not (it.val & seen).any():
            return _with(it)
        return _with(it, train=it.train | (it.val & seen), val=it.val & ~seen)


def _with(it: TrainingItem, **masks: np.ndarray) -> TrainingItem:
    """A copy of the item sharing its image and target, with new masks (the engine pads its copies)."""
    return TrainingItem(
        it.image,
        it.target,
        masks.get("train", it.train),
        masks.get("val", it.val),
        it.focus,
        it.source,
        classes=it.classes,
    )
