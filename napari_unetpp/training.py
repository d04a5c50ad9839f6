"""Fine-tuning on the user's corrections: a generator that yields progress and returns the saved model version.

    gen = fine_tune("em-membranes", TrainingPair(image, labels, slices=[3, 7]), minutes=2)
    for progress in gen: ...            # or: result = run_fine_tune(...)

Which pixels are ground truth
    Only *known* pixels enter the loss; everything else is ignored, never treated as background. Known pixels are,
    in order of precedence: an explicit ``known`` mask; the listed ``slices`` (indices over the labels' leading,
    non-YX axes, e.g. z for a ZYX stack); ``"all"``; or by default every slice holding at least one non-zero label.
    Pixels equal to ``ignore_label`` are unknown in every case.

Validation
    Known pixels are cut into blocks (about a quarter of each axis, 16-128 px). A block goes to validation when a hash
    of (pair, slice, block position) falls under ``val_fraction``: the split depends on nothing else, so the same
    pixels stay in validation when the user corrects more slices and fine-tunes again (no leakage across rounds).
    Validation runs the network on the whole slice (context included) and scores only validation pixels.

Training
    Patches centred on known training pixels, preferring pixels the user changed (``focus``) and foreground; flips,
    90-degree rotations, intensity jitter and a mild random affine; AdamW with warm-up and cosine decay at a small
    learning rate; batch norms frozen (their running statistics stay those of the base model); deep supervision with
    the hybrid loss over every head up to the trained depth. Mixed precision on CUDA, bf16 on CPUs that support it.
    The base model's validation score is measured first and counts as a candidate, so the saved version is never
    worse on validation than its parent. Stopping (the ``stop`` event, or closing the generator) saves the best
    state seen so far.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import autocast_dtype, describe_device, resolve_device
from .inference import InputError, _is_oom, _layout, _resolve_model, normalization_stats
from .losses import DeepSupervisionLoss
from .models import LoadedModel, ModelCard, save_model

__all__ = [
    "FineTuneConfig",
    "FineTuneResult",
    "TrainProgress",
    "TrainingDataError",
    "TrainingPair",
    "augment_batch",
    "dice_score",
    "fine_tune",
    "parse_slices",
    "prepare_data",
    "random_affine",
    "recommend_depth",
    "run_fine_tune",
    "sample_batch",
    "shrink_after_oom",
    "train_step",
    "validate",
]

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """The labels cannot be trained on (empty, one class, wrong shape, too little for a validation split)."""


@dataclass
class TrainingPair:
    """One image with its (corrected) labels.

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
    """

    image: Any
    labels: Any
    axes: str | None = None
    slices: Sequence[Any] | str | None = None
    known: np.ndarray | None = None
    focus: np.ndarray | None = None
    name: str = ""


@dataclass
class FineTuneConfig:
    """Fine-tuning hyperparameters (every field can also be passed to :func:`fine_tune` as a keyword).

    Attributes:
        minutes: Wall-clock budget (default: 2 when ``epochs`` is not given either).
        epochs: Epoch budget; an epoch is ``steps_per_epoch`` steps.
        steps_per_epoch: Steps between validations (default: enough patches to cover the training pixels once,
            at least 10).
        learning_rate: AdamW peak learning rate (default 3e-4: small, so the base model is adapted, not wrecked).
        weight_decay: AdamW weight decay (default 1e-4).
        warmup_steps: Linear warm-up steps (default 5).
        batch_size: Patches per step (default: 4 on CPU; on CUDA sized from free memory).
        patch_size: Patch edge in pixels (default 256 in 2D, 96 in 3D (32 along Z on CPU), capped by the image).
        train_depth: Train the sub-network of this depth only (fast update: 1 or 2); default all levels.
        deep_supervision_weights: One weight per head (default equal, as in the paper).
        ce_weight: Cross-entropy weight in the hybrid loss (default 1).
        dice_weight: Soft-Dice weight in the hybrid loss (default 1).
        val_fraction: Share of annotated blocks held out for validation (default 0.2).
        patience: Stop after this many validations without improvement (default 6; 0 = never).
        min_delta: Improvement that counts (mean Dice over levels; default 0.002).
        margin: Recommended depth = shallowest level within ``margin`` Dice of the best (default 0.01).
        focus_fraction: Share of patches centred on pixels the user changed (default 0.5).
        foreground_fraction: Share of the others centred on foreground (default 0.33).
        affine_probability: Chance of a random rotation (+-15 degrees) and scaling (0.85-1.15) (default 0.3).
        freeze_batchnorm: Keep batch-norm running statistics fixed (default True).
        ignore_label: Label value meaning "unknown" (default None).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (default auto).
        seed: Random seed (default 0).
    """

    minutes: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    batch_size: int | None = None
    patch_size: int | None = None
    train_depth: int | None = None
    deep_supervision_weights: tuple[float, ...] | None = None
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    val_fraction: float = 0.2
    patience: int = 6
    min_delta: float = 0.002
    margin: float = 0.01
    focus_fraction: float = 0.5
    foreground_fraction: float = 0.33
    affine_probability: float = 0.3
    freeze_batchnorm: bool = True
    ignore_label: int | None = None
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, got {self.minutes}.")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")


@dataclass
class TrainProgress:
    """What a fine-tuning run is doing.

    Attributes:
        phase: ``"prepared"``, ``"baseline"``, ``"train"``, ``"validate"``, ``"retry"`` (out of memory, smaller
            batch), ``"saving"``.
        step: Optimiser steps done.
        epoch: Validations done since the baseline.
        seconds: Time since the start.
        fraction: Share of the budget used (0..1), for progress bars.
        loss: Training loss of this step (``"train"``).
        val: Per-level validation Dice (``"baseline"``, ``"validate"``).
        best: Best mean validation Dice so far.
        message: One line for people.
    """

    phase: str
    step: int = 0
    epoch: int = 0
    seconds: float = 0.0
    fraction: float = 0.0
    loss: float | None = None
    val: dict[int, float] | None = None
    best: float | None = None
    message: str = ""


@dataclass
class FineTuneResult:
    """The outcome of :func:`fine_tune`.

    Attributes:
        model: The fine-tuned model (best validation state), with its card.
        path: Card path of the saved version (None with ``save=False``).
        scores: Per-level validation Dice of the saved state.
        baseline: Per-level validation Dice of the base model on the same pixels.
        recommended_depth: Shallowest level within ``margin`` of the best.
        history: One dict per validation (step, seconds, loss, per-level Dice).
        steps: Optimiser steps done.
        seconds: Wall-clock time.
        stopped: ``"budget"``, ``"early stopping"`` or ``"stopped by user"``.
        improved: Whether any trained state beat the base model on validation.
        device: Where it ran.
        data: Summary of the training data (for the card).
    """

    model: LoadedModel
    path: Path | None
    scores: dict[int, float]
    baseline: dict[int, float]
    recommended_depth: int
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    stopped: str
    improved: bool
    device: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class _Item:
    """One plane (2D model) or volume (3D model), padded to at least the patch size."""

    image: np.ndarray  # (C, *S) float32, normalised
    target: np.ndarray  # (*S) int64
    train: np.ndarray  # (*S) bool: known, training
    val: np.ndarray  # (*S) bool: known, validation
    focus: np.ndarray | None  # (*S) bool: changed by the user (training pixels only)
    source: str  # "pair 0, slice (3,)"
    train_idx: np.ndarray = field(default=None, repr=False)  # flat indices of training pixels
    fg_idx: np.ndarray = field(default=None, repr=False)
    focus_idx: np.ndarray = field(default=None, repr=False)

    def index(self) -> None:
        self.train_idx = np.flatnonzero(self.train)
        self.fg_idx = np.flatnonzero(self.train & (self.target > 0))
        self.focus_idx = np.flatnonzero(self.train & self.focus) if self.focus is not None else np.empty(0, int)


@dataclass
class _Dataset:
    items: list[_Item]
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


def _blocks(shape: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Even blocks of about a quarter of each axis (16-128 px): (block position, slices)."""
    edges = []
    for d in shape:
        n = max(1, round(d / int(np.clip(d // 4, 16, 128))))
        edges.append(np.linspace(0, d, n + 1).round().astype(int))
    for pos in np.ndindex(*[len(e) - 1 for e in edges]):
        yield pos, tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, pos))


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2 ** 64


def _split(known: np.ndarray, key: str, val_fraction: float) -> np.ndarray:
    """Validation mask inside ``known``: blocks whose hash of (key, block position) is below ``val_fraction``."""
    val = np.zeros_like(known)
    for pos, sl in _blocks(known.shape):
        if _hash01(f"{key}|{pos}") < val_fraction:
            val[sl] = known[sl]
    return val


def _fallback_block(known: np.ndarray, key: str) -> np.ndarray:
    """The known block with the smallest hash: validation when no block fell under the fraction."""
    cands = [(_hash01(f"{key}|{pos}"), sl) for pos, sl in _blocks(known.shape) if known[sl].any()]
    val = np.zeros_like(known)
    if cands:
        sl = min(cands, key=lambda c: c[0])[1]
        val[sl] = known[sl]
    return val


def _known_mask(pair: TrainingPair, labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
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
        nonzero = labels != 0
        if ignore_label is not None:
            nonzero &= labels != ignore_label
        annotated = nonzero.any(axis=(-2, -1)) if lead else np.asarray(nonzero.any())
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


def prepare_data(pairs: TrainingPair | Sequence[TrainingPair], model: Any, *, ignore_label: int | None = None,
                 val_fraction: float = 0.2, pad_to: Sequence[int] | None = None) -> _Dataset:
    """Normalise the images with the model's recipe, find the known pixels and split them into training and
    validation blocks.

    Raises:
        TrainingDataError: mismatched shapes, labels that are empty or one class, values the model cannot
            learn, or too little data for a validation split (each message says what to do).
        InputError: bad axes or non-finite image values.
    """
    lm = _resolve_model(model)
    cfg = lm.module.config
    pairs = [pairs] if isinstance(pairs, TrainingPair) else list(pairs)
    if not pairs:
        raise TrainingDataError("no training data: give at least one image with its labels.")
    items: list[_Item] = []
    summary: dict[str, Any] = {"pairs": []}
    for pi, pair in enumerate(pairs):
        lay = _layout(pair.image, pair.axes, cfg.spatial_dims)
        img_shape_noc = tuple(int(s) for a, s in zip(lay.axes, pair.image.shape) if a != "C")
        labels = np.asarray(pair.labels)
        if labels.shape != img_shape_noc:
            raise TrainingDataError(f"the labels have shape {labels.shape} but the image {img_shape_noc} (without "
                                    f"channels); pick the labels drawn on this image.")
        if labels.dtype.kind not in "iub":
            if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
                labels = labels.astype(np.int64)
            else:
                raise TrainingDataError(f"labels must be integers, got {labels.dtype}.")
        lab_axes = "".join(a for a in lay.axes if a != "C")
        if lab_axes[-2:] != "YX":
            raise TrainingDataError(f"labels need Y and X as their last axes, got {lab_axes!r}.")
        known = _known_mask(pair, labels, ignore_label)
        focus = None if pair.focus is None else np.asarray(pair.focus, bool)
        if focus is not None and focus.shape != labels.shape:
            raise TrainingDataError(f"the focus mask has shape {focus.shape} but the labels {labels.shape}.")
        stats = normalization_stats(pair.image, lm, axes=lay.axes)
        norm = lm.normalization
        order = [lab_axes.index(a) for a in lay.loop] + [lab_axes.index(a) for a in lay.spatial]
        lab_t, known_t = labels.transpose(order), known.transpose(order)
        focus_t = focus.transpose(order) if focus is not None else None
        n_loop = len(lay.loop)
        used = []
        for idx in np.ndindex(*lab_t.shape[:n_loop]):
            kn = known_t[idx]
            if not kn.any():
                continue
            raw = np.asarray(lay.src[idx])  # ([C], *S)
            raw = raw if lay.has_c else raw[None]
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                raise InputError("the image contains NaN or infinite values; replace them before fine-tuning.")
            img = np.stack([norm.apply(raw[c], stats[c]) for c in range(raw.shape[0])])
            tgt = lab_t[idx].astype(np.int64)
            if cfg.num_classes == 1:
                tgt = (tgt > 0).astype(np.int64)
            elif (tgt[kn] < 0).any() or (tgt[kn] >= cfg.num_classes).any():
                bad = int(tgt[kn][(tgt[kn] < 0) | (tgt[kn] >= cfg.num_classes)][0])
                raise TrainingDataError(f"the labels hold the value {bad} but the model has {cfg.num_classes} "
                                        f"classes (0..{cfg.num_classes - 1}); set it as the ignore label or "
                                        f"repaint it.")
            key = f"{pi}:{idx}"
            val = _split(kn, key, val_fraction)
            items.append(_Item(img, tgt, kn & ~val, val, None if focus_t is None else focus_t[idx] & kn,
                               f"pair {pi} slice {idx}"))
            used.append(idx)
        summary["pairs"].append({"name": pair.name or f"pair {pi}", "shape": list(labels.shape),
                                 "axes": lay.axes, "known_slices": [list(u) for u in used][:200],
                                 "known_pixels": int(known.sum())})
    if not items:
        raise TrainingDataError("no known pixels: the labels are empty in the chosen slices; correct at least one "
                                "slice (paint objects and background) or list the slices you corrected.")
    n_val = sum(int(it.val.sum()) for it in items)
    if n_val == 0:  # no block fell into validation: take the stablest one
        it = max(items, key=lambda i: i.train.sum())
        it.val = _fallback_block(it.train, it.source)
        it.train = it.train & ~it.val
    _check_classes(items, cfg.num_classes)
    for it in items:
        it.index()
    ds = _Dataset(items, cfg.spatial_dims, summary)
    min_train = 32 ** cfg.spatial_dims
    if ds.n_train < min_train or ds.n_val < 16 ** cfg.spatial_dims:
        raise TrainingDataError(f"too little annotated data for a validation split ({ds.n_train + ds.n_val} known "
                                f"pixels); correct at least one whole slice, or several.")
    if pad_to is not None:
        for it in ds.items:
            _pad_item(it, pad_to)
    summary.update(n_items=len(items), train_pixels=ds.n_train, val_pixels=ds.n_val,
                   foreground_fraction=round(float(sum((it.target[it.train | it.val] > 0).sum() for it in items)
                                                   / max(ds.n_train + ds.n_val, 1)), 4))
    return ds


def _check_classes(items: list[_Item], num_classes: int) -> None:
    present = set()
    for it in items:
        present.update(np.unique(it.target[it.train | it.val]).tolist())
    if len(present) < 2:
        only = next(iter(present), 0)
        what = "background (0)" if only == 0 else f"label {only}"
        raise TrainingDataError(f"the known pixels are all {what}: the model needs both objects and background; "
                                f"paint the missed objects (or background) in the corrected slices.")


def _pad_item(it: _Item, size: Sequence[int]) -> None:
    """Pad an item to at least ``size`` per spatial axis: reflected image, unknown labels."""
    pads = [(0, max(0, s - d)) for s, d in zip(size, it.target.shape)]
    if not any(p[1] for p in pads):
        return
    mode = "reflect" if all(p[1] < d for p, d in zip(pads, it.target.shape)) else "symmetric"
    it.image = np.pad(it.image, [(0, 0)] + pads, mode=mode)
    it.target = np.pad(it.target, pads)
    it.train = np.pad(it.train, pads)
    it.val = np.pad(it.val, pads)
    if it.focus is not None:
        it.focus = np.pad(it.focus, pads)
    it.index()


# ---------------------------------------------------------------------------------------------------- batches
def sample_batch(ds: _Dataset, rng: np.random.Generator, batch: int, patch: Sequence[int],
                 focus_fraction: float = 0.5, foreground_fraction: float = 0.33, centres: list | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``batch`` patches centred on training pixels: changed pixels first, then foreground, then any.

    Items are chosen in proportion to their training pixels; ``centres`` (a list), when given, receives
    ``(item index, centre)`` per patch. Patches near an edge are shifted inside the item.

    Returns:
        image ``(B, C, *patch)`` float32, target ``(B, *patch)`` int64, known ``(B, *patch)`` bool (training pixels
        only: validation pixels inside a patch are seen as input but never as labels).
    """
    weights = np.array([len(it.train_idx) for it in ds.items], dtype=np.float64)
    weights /= weights.sum()
    xs, ys, vs = [], [], []
    for _ in range(batch):
        ii = int(rng.choice(len(ds.items), p=weights))
        it = ds.items[ii]
        u = rng.random()
        if len(it.focus_idx) and u < focus_fraction:
            pool = it.focus_idx
        elif len(it.fg_idx) and rng.random() < foreground_fraction:
            pool = it.fg_idx
        else:
            pool = it.train_idx
        centre = np.unravel_index(int(pool[rng.integers(len(pool))]), it.target.shape)
        if centres is not None:
            centres.append((ii, tuple(int(c) for c in centre)))
        sl = tuple(slice(s, s + p) for s, p in
                   ((int(np.clip(c - p // 2, 0, d - p)), p) for c, p, d in zip(centre, patch, it.target.shape)))
        xs.append(it.image[(slice(None),) + sl])
        ys.append(it.target[sl])
        vs.append(it.train[sl])
    return np.stack(xs), np.stack(ys), np.stack(vs)


def augment_batch(x: np.ndarray, y: np.ndarray, v: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flips (every axis), 90-degree rotations (in YX), and per-channel gamma, gain, offset and noise."""
    xs, ys, vs = [], [], []
    nd = y.ndim - 1
    for b in range(x.shape[0]):
        a, t, m = x[b], y[b], v[b]
        k = int(rng.integers(4))
        if k:
            a, t, m = np.rot90(a, k, axes=(-2, -1)), np.rot90(t, k, axes=(-2, -1)), np.rot90(m, k, axes=(-2, -1))
        for ax in range(nd):
            if rng.random() < 0.5:
                a, t, m = np.flip(a, ax + 1), np.flip(t, ax), np.flip(m, ax)
        a = np.array(a, dtype=np.float32)
        for c in range(a.shape[0]):
            ch = a[c]
            gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
            inside = (ch > 0) & (ch < 1)
            ch[inside] = ch[inside] ** gamma
            ch *= rng.uniform(0.8, 1.25)
            ch += rng.uniform(-0.1, 0.1)
            sigma = rng.uniform(0, 0.05)
            if sigma > 0.005:
                ch += rng.normal(0, sigma, ch.shape).astype(np.float32)
        xs.append(a)
        ys.append(np.ascontiguousarray(t))
        vs.append(np.ascontiguousarray(m))
    return np.stack(xs), np.stack(ys), np.stack(vs)


def random_affine(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, rng: np.random.Generator,
                  probability: float = 0.3, max_degrees: float = 15.0, scale: tuple[float, float] = (0.85, 1.15)
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mild random rotation (in YX) and isotropic scaling per sample, on the device: bilinear for the image,
    nearest for labels; pixels pulled from outside the patch become unknown."""
    n = x.shape[0]
    chosen = rng.random(n) < probability
    if not chosen.any():
        return x, y, v
    nd = x.ndim - 2
    theta = torch.zeros(n, nd, nd + 1)
    theta[:, :nd, :nd] = torch.eye(nd)
    for b in np.flatnonzero(chosen):
        ang = math.radians(rng.uniform(-max_degrees, max_degrees))
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))  # log-uniform: zoom in as often as out
        # affine_grid orders coordinates (x, y[, z]): the first two are the image plane
        theta[b, :2, :2] = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) / s
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    ya = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    va = F.grid_sample(v[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    keep = torch.as_tensor(chosen, device=x.device)
    sel = keep.view(-1, *([1] * (x.ndim - 1)))
    return (torch.where(sel, xa, x), torch.where(keep.view(-1, *([1] * nd)), ya.long(), y),
            torch.where(keep.view(-1, *([1] * nd)), va > 0.5, v))


# ---------------------------------------------------------------------------------------------------- steps
def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: DeepSupervisionLoss, x: torch.Tensor,
               y: torch.Tensor, v: torch.Tensor, depth: int, amp: torch.dtype | None,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimiser step of deep supervision over heads 1..``depth`` on known pixels; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    if amp is not None:
        with torch.autocast(device_type=x.device.type, dtype=amp):
            outs = module(x, depth=depth)
    else:
        outs = module(x, depth=depth)
    loss = loss_fn(outs, y, v)
    if not torch.isfinite(loss):
        raise FloatingPointError("the training loss became NaN or infinite; lower the learning rate.")
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def dice_score(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, num_classes: int = 1) -> float:
    """Dice of foreground (1-class) or mean Dice over classes 1..C-1, on ``mask`` pixels; 1.0 when both are empty."""
    if mask is not None:
        pred, target = pred[mask], target[mask]
    classes = [1] if num_classes == 1 else range(1, num_classes)
    out = []
    for c in classes:
        p, t = (pred > 0) if num_classes == 1 else (pred == c), (target > 0) if num_classes == 1 else (target == c)
        denom = int(p.sum()) + int(t.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return float(np.mean(out))


@torch.no_grad()
def validate(module: nn.Module, ds: _Dataset, device: torch.device, amp: torch.dtype | None,
             context: int = 64) -> dict[int, float]:
    """Per-level Dice on the validation pixels, pooled over all items; the network sees each validation region
    with ``context`` pixels around it."""
    was_training = module.training
    module.eval()
    cfg = module.config
    inter = np.zeros((cfg.max_depth, max(cfg.num_classes - 1, 1)))
    sums = np.zeros_like(inter)
    try:
        for it in ds.items:
            if not it.val.any():
                continue
            nz = np.nonzero(it.val)
            sl = tuple(slice(max(0, int(a.min()) - context), int(a.max()) + 1 + context) for a in nz)
            x = torch.from_numpy(np.ascontiguousarray(it.image[(slice(None),) + sl]))[None].to(device)
            if amp is not None:
                with torch.autocast(device_type=device.type, dtype=amp):
                    outs = module(x)
            else:
                outs = module(x)
            m = it.val[sl]
            t = it.target[sl][m]
            for j, o in enumerate(outs):
                o = o.float()[0]
                pred = (o[0] > 0).cpu().numpy() if cfg.num_classes == 1 else o.argmax(0).cpu().numpy()
                p = pred[m]
                for ci, c in enumerate([1] if cfg.num_classes == 1 else range(1, cfg.num_classes)):
                    pc, tc = (p > 0, t > 0) if cfg.num_classes == 1 else (p == c, t == c)
                    inter[j, ci] += (pc & tc).sum()
                    sums[j, ci] += pc.sum() + tc.sum()
    finally:
        module.train(was_training)
    dice = np.where(sums > 0, 2 * inter / np.maximum(sums, 1), 1.0).mean(axis=1)
    return {j + 1: round(float(d), 4) for j, d in enumerate(dice)}


def recommend_depth(scores: dict[int, float], margin: float = 0.01) -> int:
    """The shallowest level whose score is within ``margin`` of the best (the paper picks its pruning depth on
    validation data)."""
    best = max(scores.values())
    return min(lv for lv, s in scores.items() if s >= best - margin)


def shrink_after_oom(batch: int, patch: Sequence[int], multiple: int) -> tuple[int, tuple[int, ...]]:
    """Next smaller (batch, patch) after an out-of-memory error: halve the batch, then the patch (kept a multiple
    of ``multiple``, at least 2 ``multiple``s)."""
    if batch > 1:
        return batch // 2, tuple(patch)
    smaller = tuple(max(2 * multiple, (p // 2) // multiple * multiple) for p in patch)
    if smaller == tuple(patch):
        raise MemoryError("out of memory even with one small patch per step; close other programs or use the CPU.")
    return 1, smaller


def _defaults(ds: _Dataset, module: nn.Module, device: torch.device, cfg: FineTuneConfig
              ) -> tuple[int, tuple[int, ...]]:
    mult = 2 ** module.max_depth
    shape = np.max([it.target.shape for it in ds.items], axis=0)
    if cfg.patch_size:
        base = [int(cfg.patch_size)] * ds.spatial_dims
    elif ds.spatial_dims == 2:
        base = [256, 256]
    else:
        base = [32 if device.type == "cpu" else 64, 96, 96]
    patch = tuple(int(min(p, math.ceil(d / mult) * mult)) for p, d in zip(base, shape))
    patch = tuple(max(mult, p // mult * mult) for p in patch)
    if cfg.batch_size:
        return int(cfg.batch_size), patch
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # measured: about 4 kB per pixel for a 16-filter network in mixed precision; scale with the width
        per_sample = 4e3 * (module.config.features[0] / 16) * float(np.prod(patch))
        return int(np.clip(0.5 * free // per_sample, 2, 32)), patch
    return 4, patch


def _lr_at(step: int, frac: float, cfg: FineTuneConfig) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    return cfg.learning_rate * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _trained_batchnorms(module: nn.Module) -> list[nn.Module]:
    """Batch norms with statistics from earlier training; never-trained ones (a model from scratch) are left out."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.num_batches_tracked is None or int(m.num_batches_tracked) > 0)]


def _freeze_bn(layers: list[nn.Module]) -> None:
    """Keep these batch norms' running statistics fixed (eval mode) while the rest of the network trains."""
    for m in layers:
        m.eval()


# ---------------------------------------------------------------------------------------------------- the loop
def fine_tune(model: Any, data: TrainingPair | Sequence[TrainingPair], *, config: FineTuneConfig | None = None,
              device: str | torch.device = "auto", name: str | None = None, save: bool = True,
              stop: threading.Event | Callable[[], bool] | None = None, classes: Sequence[str] | None = None,
              **options: Any) -> Generator[TrainProgress, None, FineTuneResult]:
    """Fine-tune ``model`` on corrected labels; yield :class:`TrainProgress`, return :class:`FineTuneResult`.

    Args:
        model: Base model (name, ``name@vN``, path, :class:`LoadedModel` or ``UNetPlusPlus``); never modified.
        data: One or more :class:`TrainingPair`.
        config: Hyperparameters; keywords in ``options`` override its fields (e.g. ``minutes=2``).
        device: ``"auto"`` (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        name: Name to save under (default: the base's name for user models, ``<base>-finetuned`` for shipped ones).
        save: Save the best state as a new model version (never overwrites anything).
        stop: An event (or callable) that ends training at the next step; the best state so far is kept and saved.
        classes: Class names for the new version's card (default: the base's), e.g. ``["nucleus"]`` when an EM
            membrane model is fine-tuned on nuclei.

    Raises:
        TrainingDataError, InputError: unusable data (one sentence saying what to do).
        MemoryError: out of memory even at batch 1 with the smallest patch.
    """
    known_fields = {f.name for f in fields(FineTuneConfig)}
    unknown = set(options) - known_fields
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s) {sorted(unknown)}; see FineTuneConfig.")
    cfg = FineTuneConfig(**{**(asdict(config) if config else {}), **options})
    if cfg.minutes is None and cfg.epochs is None:
        cfg.minutes = 2.0
    base = _resolve_model(model)
    class_names = _check_class_names(classes, base)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    should_stop = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds = prepare_data(data, base, ignore_label=cfg.ignore_label, val_fraction=cfg.val_fraction)
    module: nn.Module = copy.deepcopy(base.module).float().to(dev)
    max_depth = module.max_depth
    depth = module.check_depth(cfg.train_depth)
    batch, patch = _defaults(ds, module, dev, cfg)
    for it in ds.items:
        _pad_item(it, patch)
    amp = autocast_dtype(dev, cfg.precision) if dev.type != "mps" else None
    fmt = torch.channels_last if (ds.spatial_dims == 2 and dev.type in ("cpu", "cuda")) else torch.contiguous_format
    module = module.to(memory_format=fmt)
    params = [p for _, m in module.modules_for_depth(depth) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp == torch.float16)
    loss_fn = DeepSupervisionLoss(cfg.deep_supervision_weights, cfg.ce_weight, cfg.dice_weight)
    spe = cfg.steps_per_epoch or max(10, math.ceil(ds.n_train / (batch * float(np.prod(patch)))))
    budget_s = None if cfg.minutes is None else cfg.minutes * 60.0
    budget_steps = None if cfg.epochs is None else cfg.epochs * spe

    def fraction(step: int) -> float:
        fr = []
        if budget_s is not None:
            fr.append((time.perf_counter() - t0) / budget_s)
        if budget_steps is not None:
            fr.append(step / budget_steps)
        return float(min(1.0, max(fr)))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    summary = {**ds.summary, "patch": list(patch), "batch": batch, "steps_per_epoch": spe}
    yield TrainProgress("prepared", seconds=time.perf_counter() - t0,
                        message=f"{ds.n_train} training and {ds.n_val} validation pixels in {len(ds.items)} "
                                f"slice(s); patches {'x'.join(map(str, patch))}, batch {batch}, on "
                                f"{describe_device(dev)}")
    baseline = validate(module, ds, dev, amp)
    best_state, best_scores = snapshot(), baseline
    best = float(np.mean(list(baseline.values())))
    history: list[dict[str, Any]] = [{"step": 0, "seconds": round(time.perf_counter() - t0, 2), "loss": None,
                                      "val": baseline}]
    yield TrainProgress("baseline", seconds=time.perf_counter() - t0, val=baseline, best=best,
                        message="base model: " + _fmt(baseline))
    step, epoch, since_best, stopped, improved, losses = 0, 0, 0, "budget", False, []
    frozen = _trained_batchnorms(module) if cfg.freeze_batchnorm else []  # decided once, before any step
    module.train()
    _freeze_bn(frozen)
    try:
        while True:
            if should_stop():
                stopped = "stopped by user"
                break
            if fraction(step) >= 1.0:
                break
            lr = _lr_at(step, fraction(step), cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            xb, yb, vb = augment_batch(*sample_batch(ds, rng, batch, patch, cfg.focus_fraction,
                                                     cfg.foreground_fraction), rng)
            x = torch.from_numpy(xb).to(dev).contiguous(memory_format=fmt)
            y, v = torch.from_numpy(yb).to(dev), torch.from_numpy(vb).to(dev)
            x, y, v = random_affine(x, y, v, rng, cfg.affine_probability)
            try:
                loss = train_step(module, optimizer, loss_fn, x, y, v, depth, amp, scaler)
            except (RuntimeError, MemoryError) as exc:
                if not _is_oom(exc):
                    raise
                del x, y, v
                _release(dev)
                batch, patch = shrink_after_oom(batch, patch, 2 ** max_depth)
                yield TrainProgress("retry", step, epoch, time.perf_counter() - t0, fraction(step),
                                    message=f"out of memory: retrying with batch {batch}, patches "
                                            f"{'x'.join(map(str, patch))}")
                continue
            step += 1
            losses.append(loss)
            yield TrainProgress("train", step, epoch, time.perf_counter() - t0, fraction(step), loss=loss, best=best,
                                message=f"step {step}: loss {loss:.4f}")
            if step % spe == 0 or fraction(step) >= 1.0 or should_stop():
                epoch += 1
                scores = validate(module, ds, dev, amp)
                _freeze_bn(frozen)
                mean = float(np.mean(list(scores.values())))
                history.append({"step": step, "seconds": round(time.perf_counter() - t0, 2),
                                "loss": round(float(np.mean(losses[-spe:])), 4), "val": scores})
                if mean > best + cfg.min_delta or (mean > best and not improved):
                    best, best_scores, best_state, since_best, improved = mean, scores, snapshot(), 0, True
                else:
                    since_best += 1
                yield TrainProgress("validate", step, epoch, time.perf_counter() - t0, fraction(step),
                                    loss=history[-1]["loss"], val=scores, best=best,
                                    message=f"validation after {step} steps: {_fmt(scores)}")
                if cfg.patience and since_best >= cfg.patience:
                    stopped = "early stopping"
                    break
    except GeneratorExit:  # the caller closed the generator: keep the best state, as with ``stop``
        if save and step:
            _save(base, best_state, best_scores, baseline, cfg, name, history, step, t0, dev, "stopped by user",
                  improved, summary, classes=class_names)
        raise
    finally:
        del optimizer
        module.to("cpu")
        _release(dev)
    yield TrainProgress("saving", step, epoch, time.perf_counter() - t0, 1.0, best=best,
                        message=f"{stopped} after {step} steps; saving" if save else f"{stopped} after {step} steps")
    result = _save(base, best_state, best_scores, baseline, cfg, name, history, step, t0, dev, stopped, improved,
                   summary, write=save, classes=class_names)
    _release(dev)
    return result


def _release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def _fmt(scores: dict[int, float]) -> str:
    return "Dice " + ", ".join(f"L{k} {v:.3f}" for k, v in scores.items())


def _check_class_names(classes: Sequence[str] | str | None, base: LoadedModel) -> list[str] | None:
    """Class names for the fine-tuned card, checked against the model: one name for a 1-class model, one per
    foreground class (or per class, background first) otherwise."""
    if classes is None:
        return None
    names = [c.strip() for c in ([classes] if isinstance(classes, str) else classes)]
    n = base.module.config.num_classes
    allowed = (1,) if n == 1 else (n - 1, n)
    if any(not c for c in names) or len(names) not in allowed:
        want = "one class name" if n == 1 else f"{n - 1} foreground class names (or {n} with background first)"
        raise TrainingDataError(f"this model needs {want}, got {len(names)}: {', '.join(names) or 'none'}.")
    return names


def default_name(base: LoadedModel | Any) -> str:
    """Shipped models are fine-tuned into ``<name>-finetuned``; user models continue their own versions (``base``: a
    :class:`LoadedModel` or a ``list_models`` row)."""
    return f"{base.card.name}-finetuned" if base.shipped else base.card.name


def _save(base: LoadedModel, state: dict[str, torch.Tensor], scores: dict[int, float], baseline: dict[int, float],
          cfg: FineTuneConfig, name: str | None, history: list, steps: int, t0: float, dev: torch.device,
          stopped: str, improved: bool, summary: dict[str, Any], write: bool = True,
          classes: list[str] | None = None) -> FineTuneResult:
    net = copy.deepcopy(base.module).cpu()
    net.load_state_dict(state)
    net.eval()
    rec = recommend_depth(scores, cfg.margin)
    seconds = time.perf_counter() - t0
    card = ModelCard(
        name=name or default_name(base),
        architecture=net.config.to_dict(),
        normalization=dict(base.card.normalization),
        classes=classes or list(base.card.classes),
        description=(base.card.description or base.card.name) + " (fine-tuned on corrections)"
        + (f"; classes renamed from {', '.join(base.card.classes)}" if classes else ""),
        training={
            "data": f"fine-tuned from {base.card.id} on {summary.get('train_pixels', 0)} corrected pixels in "
                    f"{summary.get('n_items', 0)} slice(s) of " +
                    ", ".join(p["name"] for p in summary.get("pairs", [])),
            "data_summary": summary,
            "validation": f"{summary.get('val_pixels', 0)} held-out corrected pixels (hashed blocks, stable "
                          f"across rounds)",
            "recipe": "napari_unetpp.training.fine_tune: patches favouring corrected pixels, flips, rot90, "
                      "intensity jitter, mild affine; AdamW + cosine; frozen batch-norm statistics; deep "
                      "supervision with BCE/CE + soft Dice on known pixels only",
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if v is not None},
            "baseline_scores": {f"L{k}": {"dice": v} for k, v in baseline.items()},
            "history": history[-50:],
            "steps": steps,
            "seconds": round(seconds, 1),
            "stopped": stopped,
            "improved": improved,
            "device": describe_device(dev),
            "citations": base.card.training.get("citations", []),
            "licence": base.card.training.get("licence", ""),
        },
        scores={f"L{k}": {"dice": v} for k, v in scores.items()},
        recommended_depth=rec,
        parent=base.card.id,
        tile=base.card.tile,
    )
    path = save_model(net, card) if write else None
    lm = LoadedModel(net, card, None if path is None else path.with_suffix(".safetensors"), False)
    if path is not None:
        log.info("fine-tuned %s -> %s (%s; recommended L%d)", base.card.id, card.id, _fmt(scores), rec)
    return FineTuneResult(lm, path, scores, baseline, rec, history, steps, seconds, stopped, improved,
                          describe_device(dev), summary)


def run_fine_tune(model: Any, data: TrainingPair | Sequence[TrainingPair], *,
                  on_progress: Callable[[TrainProgress], None] | None = None, **kwargs: Any) -> FineTuneResult:
    """Run :func:`fine_tune` to the end (same arguments) and return its result."""
    gen = fine_tune(model, data, **kwargs)
    while True:
        try:
            p = next(gen)
        except StopIteration as done:
            return done.value
        if on_progress is not None:
            on_progress(p)
