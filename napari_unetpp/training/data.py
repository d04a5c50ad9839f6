"""Fine-tuning data: the user's pairs (image and corrected labels), and the normalised planes they become.

:func:`prepare_data` normalises each plane (or volume) holding known pixels with the model's recipe, encodes its
target as the model learns it, and splits its known pixels into training and validation blocks; which pixels are
known, and how the split stays put across rounds, is :mod:`.known`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unetpp.data.axes import fit_channels, layout
from napari_unetpp.data.normalization import check_pixels
from napari_unetpp.errors import InputError, TrainingDataError
from napari_unetpp.inference.postprocess import encode_cue_target
from napari_unetpp.inference.predict import normalization_stats
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.training.known import (
    annotated_slices,
    cover_classes,
    fallback_block,
    known_mask,
    split_validation,
)

__all__ = [
    "TrainingDataError",
    "TrainingItem",
    "TrainingPair",
    "TrainingSet",
    "annotated_slices",
    "fitted_image",
    "pad_item",
    "parse_slices",
    "plane_item",
    "prepare_data",
]


@dataclass
class TrainingPair:
    """One image with its (corrected) labels.

    The image's channels are fitted to the model as :func:`~napari_unetpp.inference.predict.predict` fits them
    (:func:`~napari_unetpp.data.axes.fit_channels`): ``channel`` N of a C axis for a 1-channel model, an RGB(A) image as
    its luminance, otherwise as it is; what the model then reads must have its number of channels.

    Attributes:
        image: Array (numpy, memmap, dask) with axes ``axes`` (guessed when None: YX, ZYX, TZYX, YXC).
        labels: Integer array of the image's shape without its channel axis (0 = background; for 1-class models
            any value > 0 is foreground, for multi-class models the value is the class).
        axes: The image's axes.
        slices: Which slices are ground truth: indices over the labels' leading non-YX axes (ints, or tuples for
            TZYX), ``"all"``, or None = every slice with a non-zero label.
        known: Explicit bool mask of known pixels (labels' shape); overrides ``slices``.
        focus: Bool mask of pixels the user changed (sampled more often); optional.
        name: Where the pair came from (layer or file name), for the model card.
        spacing: Pixel size per axis letter (e.g. ``{"Z": 2.0, "Y": 0.98, "X": 0.98}`` mm), recorded in the card so
            predictions at another pixel size are resampled to it (:mod:`napari_unetpp.data.scale`).
        spacing_unit: Unit of ``spacing`` (``"um"``, ``"nm"``, ``"mm"``; ``""`` unknown).
        channel: For a 1-channel model and a multi-channel image: train on channel N of its C axis (default None:
            RGB(A) as grey, other images as they are), as ``predict(channel=N)`` segments it.
    """

    image: Any
    labels: Any
    axes: str | None = None
    slices: Sequence[Any] | str | None = None
    known: np.ndarray | None = None
    focus: np.ndarray | None = None
    name: str = ""
    spacing: dict[str, float] | None = None
    spacing_unit: str = ""
    channel: int | None = None


@dataclass
class TrainingItem:
    """One plane (2D model) or volume (3D model) of training data, padded to at least the patch size."""

    image: np.ndarray  # (C, *S) float32, normalised
    target: np.ndarray  # (*S) int64
    train: np.ndarray  # (*S) bool: known, training
    val: np.ndarray  # (*S) bool: known, validation
    focus: np.ndarray | None  # (*S) bool: changed by the user (training pixels only)
    source: str  # "pair 0, slice (3,)"
    # flat indices of training, foreground and changed pixels (filled by index())
    train_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    fg_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    focus_idx: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    # multi-class targets: the foreground indices per class (empty for one class)
    class_idx: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    # False when the target's values are not classes: a model with an instance cue gets its encoded cue target
    # (napari_unetpp.inference.postprocess.encode_cue_target: foreground > 0)
    classes: bool = True

    def index(self) -> None:
        self.train_idx = np.flatnonzero(self.train)
        self.fg_idx = np.flatnonzero(self.train & (self.target > 0))
        values = np.unique(self.target.ravel()[self.fg_idx]) if self.classes else np.empty(0)
        self.class_idx = (
            {int(c): self.fg_idx[self.target.ravel()[self.fg_idx] == c] for c in values} if len(values) > 1 else {}
        )
        self.focus_idx = np.flatnonzero(self.train & self.focus) if self.focus is not None else np.empty(0, int)


@dataclass
class TrainingSet:
    """The prepared items of one fine-tuning run, with a summary for the model card."""

    items: list[TrainingItem]
    spatial_dims: int
    summary: dict[str, Any]

    @property
    def n_train(self) -> int:
        return int(sum(it.train.sum() for it in self.items))

    @property
    def n_val(self) -> int:
        return int(sum(it.val.sum() for it in self.items))


def parse_slices(text: str) -> list[int] | str | None:
    """``"3, 7, 10-12"`` -> ``[3, 7, 10, 11, 12]``; ``"all"`` -> ``"all"``; ``""`` -> None.

    Raises:
        ValueError: with the offending part named.
    """
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "all":
        return "all"
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"cannot read slice {part!r}; write slices like '3, 7, 10-12'.") from None
    return sorted(set(out))


def prepare_data(
    pairs: TrainingPair | Sequence[TrainingPair],
    model: Any,
    *,
    ignore_label: int | None = None,
    val_fraction: float = 0.2,
    pad_to: Sequence[int] | None = None,
) -> TrainingSet:
    """Normalise the images with the model's recipe, find the known pixels and split them into training and
    validation blocks.

    Raises:
        TrainingDataError: mismatched shapes, labels that are empty or one class, values the model cannot
            learn, or too little data for a validation split (each message says what to do).
        InputError: bad axes or non-finite image values.
    """
    lm = resolve_model(model)
    cfg = lm.module.config
    pairs = [pairs] if isinstance(pairs, TrainingPair) else list(pairs)
    if not pairs:
        raise TrainingDataError("no training data: give at least one image with its labels.")
    items: list[TrainingItem] = []
    keys: list[str] = []  # the split's key per item
    summary: dict[str, Any] = {"pairs": []}
    for pi, pair in enumerate(pairs):
        image, lay, channel_note = _fitted(pair, cfg)
        img_shape_noc = tuple(int(s) for a, s in zip(lay.axes, image.shape) if a != "C")
        labels = np.asarray(pair.labels)
        if labels.shape != img_shape_noc:
            raise TrainingDataError(
                f"the labels have shape {labels.shape} but the image {img_shape_noc} (without "
                f"channels); pick the labels drawn on this image."
            )
        if labels.dtype.kind not in "iub":
            if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
                labels = labels.astype(np.int64)
            else:
                raise TrainingDataError(f"labels must be integers, got {labels.dtype}.")
        lab_axes = "".join(a for a in lay.axes if a != "C")
        if lab_axes[-2:] != "YX":
            raise TrainingDataError(f"labels need Y and X as their last axes, got {lab_axes!r}.")
        known = known_mask(pair, labels, ignore_label)
        # a cue model learns the object split only from instance labels (more than one object value); a binary
        # mask trains its foreground alone
        instance_labels = bool(cfg.has_cue and int(np.max(labels[known], initial=0)) > 1)
        focus = None if pair.focus is None else np.asarray(pair.focus, bool)
        if focus is not None and focus.shape != labels.shape:
            raise TrainingDataError(f"the focus mask has shape {focus.shape} but the labels {labels.shape}.")
        stats = normalization_stats(image, lm, axes=lay.axes)
        order = [lab_axes.index(a) for a in lay.loop] + [lab_axes.index(a) for a in lay.spatial]
        lab_t, known_t = labels.transpose(order), known.transpose(order)
        focus_t = focus.transpose(order) if focus is not None else None
        n_loop = len(lay.loop)
        used = []
        for idx in np.ndindex(*lab_t.shape[:n_loop]):
            kn = known_t[idx]
            if not kn.any():
                continue
            key = f"{pi}:{idx}"
            keys.append(key)
            focus_i = None if focus_t is None else focus_t[idx] & kn
            raw = np.asarray(lay.src[idx])  # ([C], *S)
            item = plane_item(raw, lab_t[idx], kn, lm, stats, key, val_fraction, instance_labels, focus_i)
            item.source = f"pair {pi} slice {idx}"
            items.append(item)
            used.append(idx)
        summary["pairs"].append(
            {
                "name": pair.name or f"pair {pi}",
                "shape": list(labels.shape),
                "axes": lay.axes,
                **({"channels": channel_note} if channel_note else {}),
                "known_slices": [list(u) for u in used][:200],
                "known_pixels": int(known.sum()),
                **({"instance_labels": instance_labels} if cfg.has_cue else {}),
                **({"spacing": dict(pair.spacing)} if pair.spacing else {}),
                **({"spacing_unit": pair.spacing_unit} if pair.spacing and pair.spacing_unit else {}),
            }
        )
    if not items:
        raise TrainingDataError(
            "no known pixels: the labels are empty in the chosen slices; correct at least one "
            "slice (paint objects and background) or list the slices you corrected."
        )
    n_val = sum(int(it.val.sum()) for it in items)
    if n_val == 0:  # no block fell into validation: take the stablest one
        fallback_block(items, keys)
    if cfg.num_classes > 2:
        cover_classes(items, keys, cfg.num_classes)
    _check_classes(items, cfg.num_classes)
    for it in items:
        it.index()
    ds = TrainingSet(items, cfg.spatial_dims, summary)
    min_train = 32**cfg.spatial_dims
    if ds.n_train < min_train or ds.n_val < 16**cfg.spatial_dims:
        raise TrainingDataError(
            f"too little annotated data for a validation split ({ds.n_train + ds.n_val} known "
            f"pixels); correct at least one whole slice, or several."
        )
    if pad_to is not None:
        for it in ds.items:
            pad_item(it, pad_to)
    summary.update(
        n_items=len(items),
        train_pixels=ds.n_train,
        val_pixels=ds.n_val,
        foreground_fraction=round(
            float(sum((it.target[it.train | it.val] > 0).sum() for it in items) / max(ds.n_train + ds.n_val, 1)), 4
        ),
    )
    return ds


def plane_item(
    raw: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    model: Any,
    stats: Sequence[tuple[float, float]],
    key: str,
    val_fraction: float,
    instance_labels: bool = False,
    focus: np.ndarray | None = None,
) -> TrainingItem:
    """One plane (or volume) of training data: ``raw`` (``([C], *S)``, the model's channels) normalised with the
    model's recipe and the image's ``stats``, ``labels`` encoded as the model learns them, and its ``known`` pixels
    split into training and validation blocks by ``key`` (:func:`~.known.split_validation`). Not indexed.

    Raises:
        InputError: non-finite pixel values.
        TrainingDataError: a label value the model has no class for.
    """
    lm = resolve_model(model)
    cfg, norm = lm.module.config, lm.normalization
    raw = raw if raw.ndim == cfg.spatial_dims + 1 else raw[None]
    check_pixels(raw, task="fine-tuning")
    img = np.stack([norm.apply(raw[c], stats[c]) for c in range(raw.shape[0])])
    tgt = np.asarray(labels).astype(np.int64)
    if cfg.has_cue:  # foreground and the distance cue in one integer target
        tgt = encode_cue_target(np.where(known, tgt, 0), cfg.spatial_dims, instance_labels)
    elif cfg.num_classes == 1:
        tgt = (tgt > 0).astype(np.int64)
    elif (tgt[known] < 0).any() or (tgt[known] >= cfg.num_classes).any():
        bad = int(tgt[known][(tgt[known] < 0) | (tgt[known] >= cfg.num_classes)][0])
        raise TrainingDataError(
            f"the labels hold the value {bad} but the model has {cfg.num_classes} classes "
            f"(0..{cfg.num_classes - 1}); set it as the ignore label or repaint it."
        )
    val = split_validation(known, key, val_fraction)
    return TrainingItem(img, tgt, known & ~val, val, focus, key, classes=not cfg.has_cue)


def _fitted(pair: TrainingPair, cfg: Any) -> tuple[Any, Any, str]:
    return fitted_image(pair.image, pair.axes, pair.channel, cfg)


def fitted_image(image: Any, axes: str | None, channel: int | None, cfg: Any) -> tuple[Any, Any, str]:
    """An image as a model of config ``cfg`` reads it for training (channels fitted by the function predict uses),
    its layout, and a note of what was done to its channels ("" when nothing).

    Raises:
        InputError: bad axes, a channel the image lacks, or a channel count the model cannot read.
    """
    image, axes, note = fit_channels(image, axes, cfg.spatial_dims, cfg.in_channels, channel)
    lay = layout(image, axes, cfg.spatial_dims)
    if lay.n_ch != cfg.in_channels:
        where = " (axis C)" if lay.has_c else " (no C axis)"
        hint = "pick one channel (channel=N, --channel N)" if cfg.in_channels == 1 else "pick another model or image"
        raise InputError(f"the model expects {cfg.in_channels} channel(s) but the image has {lay.n_ch}{where}; {hint}.")
    return image, lay, note


def _check_classes(items: list[TrainingItem], num_classes: int) -> None:
    present = set()
    for it in items:
        vals = it.target[it.train | it.val]
        present.update(np.unique((vals > 0).astype(np.int64) if num_classes == 1 else vals).tolist())
    if len(present) < 2:
        only = next(iter(present), 0)
        what = "background (0)" if only == 0 else f"label {only}"
        raise TrainingDataError(
            f"the known pixels are all {what}: the model needs both objects and background; "
            f"paint the missed objects (or background) in the corrected slices."
        )


def pad_item(it: TrainingItem, size: Sequence[int]) -> None:
    """Pad an item to at least ``size`` per spatial axis: reflected image, unknown labels."""
    pads = [(0, max(0, s - d)) for s, d in zip(size, it.target.shape)]
    if not any(p[1] for p in pads):
        return
    mode = "reflect" if all(p[1] < d for p, d in zip(pads, it.target.shape)) else "symmetric"
    it.image = np.pad(it.image, [(0, 0)] + pads, mode=mode)  # type: ignore[call-overload]
    it.target = np.pad(it.target, pads)
    it.train = np.pad(it.train, pads)
    it.val = np.pad(it.val, pads)
    if it.focus is not None:
        it.focus = np.pad(it.focus, pads)
    it.index()
