"""Scribbles, and the training data they become while the user paints.

Scribbles follow ilastik's and convpaint's convention: **0 = not annotated, 1 = background, 2.. = class 1..** (for a
1-class model 2 is the foreground). :func:`from_corrected_mask` turns a corrected mask (the Segment widget's layer: 0
is background) into scribbles on the planes the user edited, those planes being fully known.

:class:`LiveData` keeps one training item per annotated plane and rebuilds only the planes that changed, so a stroke
costs a plane, not the stack. Its validation is held out as batch fine-tuning holds it out (blocks chosen by a hash
of the plane and block position, :func:`~napari_unetpp.training.known.split_validation`), with two live rules:

- pixels that have trained once never move to validation (the split would otherwise score pixels the network saw);
- a block in which a pixel trained is never a validation block (held-out strokes never sit beside seen ones);
- while the held-out strokes are too few to score (fewer than :data:`MIN_VAL_PIXELS`, or no class among them) they
  wait, neither trained nor scored, and pile up; only when the training strokes would lack a class do the held-out
  ones train. The first thin strokes start training at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_unetpp.errors import TrainingDataError
from napari_unetpp.inference.plan import image_stats
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.training.data import TrainingItem, TrainingSet, fitted_image, plane_item
from napari_unetpp.training.known import blocks

__all__ = [
    "BACKGROUND",
    "MIN_VAL_PIXELS",
    "UNKNOWN",
    "LiveData",
    "check_scribbles",
    "from_corrected_mask",
    "to_labels",
]

UNKNOWN, BACKGROUND = 0, 1
MIN_VAL_PIXELS = 256  # held-out stroke pixels (with a class among them) before validation scores anything


def to_labels(scribbles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scribbles -> (labels, known): 1 -> 0 (background), 2.. -> 1.. (classes), 0 -> unknown."""
    s = np.asarray(scribbles)
    if s.dtype.kind not in "iub":
        raise TrainingDataError(f"scribbles must be integers (0 unknown, 1 background, 2 class), got {s.dtype}.")
    known = s > 0
    return np.where(known, s.astype(np.int64) - 1, 0), known


def check_scribbles(scribbles: np.ndarray, num_classes: int) -> None:
    """Raise one sentence unless ``scribbles`` are integers from 0 to the model's classes + 1 (0 unknown, 1
    background, 2.. class 1..; a 1-class model: 0, 1, 2)."""
    s = np.asarray(scribbles)
    if s.dtype.kind not in "iub":
        raise TrainingDataError(f"scribbles must be integers (0 unknown, 1 background, 2 class), got {s.dtype}.")
    top = 2 if num_classes == 1 else num_classes
    lo, hi = (int(s.min()), int(s.max())) if s.size else (0, 0)
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        raise TrainingDataError(
            f"the scribbles hold {bad}, but this model takes 0 (not annotated), 1 (background) and 2"
            + (f"..{top} (its classes)" if top > 2 else " (foreground)")
            + "; repaint with those labels."
        )


def from_corrected_mask(mask: np.ndarray, num_classes: int = 1) -> np.ndarray:
    """A corrected mask (0 background, 1.. class; for a 1-class model any value > 0 is foreground, e.g. object ids)
    as scribbles of the same shape, every pixel known: 1 background, 2.. class."""
    m = np.asarray(mask)
    if num_classes == 1:
        return (m > 0).astype(np.uint8) + 1
    return (m.astype(np.int64) + 1).clip(0, 255).astype(np.uint8)  # values past the classes: check_scribbles says


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
        img, self.lay, self.channel_note = fitted_image(image, axes, channel, cfg)  # as batch fine-tuning reads it
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

    def update(self, scribbles: Any, planes: Sequence[tuple[int, ...]], focus: dict | None = None) -> None:
        """Rebuild the items of ``planes`` from ``scribbles`` (the whole array, or a mapping of plane to its
        scribbles); ``focus``: per plane, the pixels painted last (sampled more often)."""
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
        background or a class.

        Held-out blocks accumulate while there are too few of them to score: they neither train nor count (the set
        holds no validation pixels) until they reach :data:`MIN_VAL_PIXELS` with a class among them; only when the
        training pixels would otherwise lack a class do they train (and never move back)."""
        if not self.items:
            return None
        order = sorted(self.items)
        items = [self._held_out(idx, self.items[idx]) for idx in order]
        if len(_classes_in(items, "known", self._one_class)) < 2:
            return None
        if len(_classes_in(items, "train", self._one_class)) < 2:  # the strokes of a class are all held out
            items = [_with(it, train=it.train | it.val, val=np.zeros_like(it.val)) for it in items]
        val = np.concatenate([it.target[it.val] for it in items])
        self.holding_out = bool(val.size >= MIN_VAL_PIXELS and (val > 0).any())
        for idx, it in zip(order, items):
            self._trained[idx] = self._trained.get(idx, np.zeros_like(it.train)) | it.train
        if not self.holding_out:  # too few to score yet: kept out of training, not scored
            items = [_with(it, val=np.zeros_like(it.val)) for it in items]
        for it in items:
            it.index()
        ds = TrainingSet(items, self.model.module.config.spatial_dims, {"pairs": []})
        ds.summary.update(n_items=len(items), train_pixels=ds.n_train, val_pixels=ds.n_val)
        return ds

    def clear(self) -> None:
        """Drop the items (the session is over): their normalised images are the largest thing a session holds."""
        self.items.clear()
        self._trained.clear()

    @property
    def _one_class(self) -> bool:
        return self.model.module.config.num_classes == 1 or self.model.module.config.has_cue

    def _held_out(self, idx: tuple[int, ...], it: TrainingItem) -> TrainingItem:
        """The item with every validation block in which a pixel trained before moved to training: held-out strokes
        never sit beside pixels of the same block that the network saw."""
        seen = self._trained.get(idx)
        if seen is None or not (it.val & seen).any():
            return _with(it)
        train, val = it.train.copy(), it.val.copy()
        for _, sl in blocks(it.val.shape):
            if val[sl].any() and seen[sl].any():
                train[sl] |= val[sl]
                val[sl] = False
        return _with(it, train=train, val=val)


def _classes_in(items: list[TrainingItem], which: str, one_class: bool) -> set[int]:
    """The classes (0 background, 1.. ; one class: 0/1) among the items' ``known``/``train`` pixels."""
    out: set[int] = set()
    for it in items:
        m = (it.train | it.val) if which == "known" else it.train
        vals = it.target[m]
        out.update(np.unique(vals > 0 if one_class else vals).tolist())
    return out


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
