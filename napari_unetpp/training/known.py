"""Which pixels are ground truth, and the validation split that stays put.

Known pixels are, in order of precedence: an explicit ``known`` mask; the listed ``slices`` (indices over the labels'
leading, non-YX axes, e.g. z for a ZYX stack); ``"all"``; or by default every slice holding at least one non-zero
label. Pixels equal to ``ignore_label`` are unknown in every case. Unknown pixels never enter the loss.

Known pixels are cut into blocks (about a quarter of each axis, 16-128 px). A block goes to validation when a hash of
(pair, slice, block position) falls under ``val_fraction``: the split depends on nothing else, so the same pixels
stay in validation when the user corrects more slices and fine-tunes again (no leakage across rounds). The items
these functions change are :class:`~napari_unetpp.training.data.TrainingItem` (``train``, ``val``, ``target``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from napari_unetpp.errors import TrainingDataError

__all__ = [
    "annotated_slices",
    "block_hash",
    "blocks",
    "cover_classes",
    "fallback_block",
    "known_mask",
    "split_validation",
]


def blocks(shape: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Even blocks of about a quarter of each axis (16-128 px): (block position, slices)."""
    edges = []
    for d in shape:
        n = max(1, round(d / int(np.clip(d // 4, 16, 128))))
        edges.append(np.linspace(0, d, n + 1).round().astype(int))
    for pos in np.ndindex(*[len(e) - 1 for e in edges]):
        yield pos, tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, pos))


def block_hash(text: str) -> float:
    """A number in [0, 1) that depends on ``text`` alone (the split's key and a block position)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def split_validation(known: np.ndarray, key: str, val_fraction: float) -> np.ndarray:
    """Validation mask inside ``known``: blocks whose hash of (key, block position) is below ``val_fraction``."""
    val = np.zeros_like(known)
    for pos, sl in blocks(known.shape):
        if block_hash(f"{key}|{pos}") < val_fraction:
            val[sl] = known[sl]
    return val


def fallback_block(items: Sequence[Any], keys: Sequence[str]) -> None:
    """When no block fell under the fraction: the known block with the smallest hash over *all* items goes to
    validation. The choice depends only on the blocks' keys, not on how much is painted where, so it stays put
    when the user paints more; a new slice moves it only to a block the earlier model never trained on."""
    cands = [
        (block_hash(f"{key}|{pos}"), ii, sl)
        for ii, (it, key) in enumerate(zip(items, keys))
        for pos, sl in blocks(it.train.shape)
        if it.train[sl].any()
    ]
    if cands:
        _, ii, sl = min(cands, key=lambda c: c[0])
        it = items[ii]
        it.val[sl] = it.train[sl]
        it.train = it.train & ~it.val


def cover_classes(items: Sequence[Any], keys: Sequence[str], num_classes: int) -> None:
    """Multi-class models: a class the user painted that no validation block holds (a small organ beside a large
    one) gets one: of the blocks holding its training pixels, the one with the smallest hash moves to validation,
    as long as the class keeps training pixels elsewhere. Without it, validation would score the model on the
    other classes only and the best state could be one that never predicts this class."""
    for c in range(1, num_classes):
        if any((it.target[it.val] == c).any() for it in items):
            continue
        cands = [
            (block_hash(f"{key}|{pos}"), ii, sl)
            for ii, (it, key) in enumerate(zip(items, keys))
            for pos, sl in blocks(it.train.shape)
            if (it.target[sl][it.train[sl]] == c).any()
        ]
        if len(cands) < 2:
            continue
        _, ii, sl = min(cands, key=lambda t: t[0])
        it = items[ii]
        it.val[sl] = it.train[sl]
        it.train = it.train & ~it.val


def annotated_slices(labels: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
    """Which slices (over the leading, non-YX axes) hold a label other than 0 and ``ignore_label``: the default
    ground truth. A bool array of the leading shape (0-d for a single plane)."""
    nonzero = labels != 0
    if ignore_label is not None:
        nonzero &= labels != ignore_label
    return nonzero.any(axis=(-2, -1)) if labels.ndim > 2 else np.asarray(nonzero.any())


def known_mask(pair: Any, labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """The known pixels of a :class:`~napari_unetpp.training.data.TrainingPair` (its ``known`` mask, else its
    ``slices``, else every annotated slice), less ``ignore_label``.

    Raises:
        TrainingDataError: a mask or slice that does not fit the labels (one sentence).
    """
    lead = labels.ndim - 2
    if pair.known is not None:
        known = np.asarray(pair.known, dtype=bool)
        if known.shape != labels.shape:
            raise TrainingDataError(f"the known-pixel mask has shape {known.shape} but the labels {labels.shape}.")
        known = known.copy()
    elif isinstance(pair.slices, str):
        if pair.slices != "all":
            raise ValueError(f"slices must be a list of indices, 'all' or None, got {pair.slices!r}.")
        known = np.ones(labels.shape, bool)
    elif pair.slices is None:
        annotated = annotated_slices(labels, ignore_label)
        known = np.broadcast_to(annotated.reshape(annotated.shape + (1, 1)), labels.shape).copy()
    else:
        if lead == 0:
            raise TrainingDataError("slices were given for a 2D image; leave them out (or use 'all').")
        known = np.zeros(labels.shape, bool)
        for s in pair.slices:
            idx = tuple(int(v) for v in s) if isinstance(s, (tuple, list)) else (int(s),)
            if len(idx) > lead or any(not 0 <= v < n for v, n in zip(idx, labels.shape)):
                raise TrainingDataError(f"slice {s} is outside the labels of shape {labels.shape}.")
            known[idx] = True
    if ignore_label is not None:
        known &= labels != ignore_label
    return known
