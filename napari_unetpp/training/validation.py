"""Per-level validation Dice on the held-out known pixels of a :class:`~napari_unetpp.training.data.TrainingSet`.

Validation runs through prediction's own sliding window
(:func:`~napari_unetpp.inference.sliding_window.sliding_window`), so it sees what
:func:`~napari_unetpp.inference.predict.predict` would produce: each plane (or volume) is padded to a multiple of
the network's size and covered by predict's tile grid (:func:`~napari_unetpp.inference.tiling.tile_grid`: the same
tile, overlap and alignment), the tiles are blended with its Gaussian weights, and the mask is predict's
(:func:`~napari_unetpp.inference.masks.mask_from`: probability >= 0.5, or the argmax of the classes). Only the tiles
holding validation pixels run, and the sink keeps only Dice counts of the validation pixels of each finished row, so
memory is bounded by one batch of tiles, never by the box around scattered validation pixels. The predictor is the
module being trained, run by PyTorch (:func:`~napari_unetpp.inference.predictor.network_predictor`), never a cached
inference copy or an exported graph, which would score earlier weights.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.predictor import SafePredictor, network_predictor
from napari_unetpp.inference.sliding_window import Plane, Predictor, sliding_window
from napari_unetpp.inference.tiling import default_batch, default_tile, per_axis, read_tile, tile_grid
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.runtimes import is_oom, release_memory
from napari_unetpp.training.data import TrainingItem, TrainingSet
from napari_unetpp.training.metrics import dice_from_counts

__all__ = ["DiceCounts", "item_counts", "validate"]

log = logging.getLogger(__name__)

_PRECISION = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@torch.no_grad()
def validate(
    module: UNetPlusPlus,
    ds: TrainingSet,
    device: torch.device,
    amp: torch.dtype | None,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.125,
) -> dict[int, float]:
    """Per-level Dice on the validation pixels, pooled over all items, from predict's tiled, blended output.

    Multi-class: the mean over the classes the validation pixels hold (a class absent from them would count 1.0 for
    never being predicted there, and reward a model that never predicts it).

    Out of memory, the tiles run as prediction runs them (:class:`~napari_unetpp.inference.predictor.SafePredictor`:
    the batch is halved down to one tile); out of memory on one tile, the item runs again on tiles of half the size.

    Args:
        module: The network being trained (its current weights are scored; its train/eval mode is restored).
        ds: The prepared data; only items with validation pixels run.
        device: Where the network runs.
        amp: Autocast dtype (None: fp32).
        tile: Largest tile per spatial axis (default: predict's, 1024 in 2D and 96 in 3D; pass the model card's).
        overlap: Minimum tile overlap as a fraction of the tile (default 0.125, predict's).

    Raises:
        MemoryError: out of memory even for one tile of the network's smallest size.
    """
    was_training = module.training
    module.eval()
    cfg = module.config
    counts = np.zeros((3, cfg.max_depth, max(cfg.num_classes - 1, 1)))  # intersections, sums, presence
    precision = _PRECISION.get(amp, "fp32")
    predictor = network_predictor(module, cfg.max_depth, device, precision, "validation")
    mult = per_axis(cfg.multiple, cfg.spatial_dims)
    size = per_axis(tile, cfg.spatial_dims) if tile is not None else default_tile(cfg.spatial_dims)
    # predict's batch budget and its out-of-memory rule: the batch is halved down to one tile on out-of-memory
    safe = SafePredictor(predictor, device, default_batch(size, device.type))
    try:
        for it in ds.items:
            if not it.val.any():
                continue
            while True:
                failed = False
                try:
                    counts += item_counts(it, safe, cfg, size, overlap, safe.batch)
                except (RuntimeError, MemoryError) as exc:
                    if not is_oom(exc):
                        raise
                    failed = True  # handled once the exception (and the activations its frames hold) is gone
                if not failed:
                    break
                # out of memory on one tile (the predictor's MemoryError) or outside the network: the item runs again
                release_memory(device)
                if safe.batch > 1:  # outside the network (the predictor halves its own batch): fewer tiles at once
                    safe.batch //= 2
                else:
                    plan_tile = tile_grid(it.target.shape, mult, size, overlap)[1].tile_shape
                    smaller = tuple(max(m, t // 2 // m * m) for t, m in zip(plan_tile, mult))
                    if smaller == tuple(plan_tile):
                        raise MemoryError(
                            f"out of memory while validating, even on tiles of {'x'.join(map(str, plan_tile))}; "
                            f"fine-tune on the CPU (device='cpu') or close what else uses the memory."
                        ) from None
                    size = smaller
                log.warning("out of memory while validating: retrying with %d tile(s) of %s", safe.batch, size)
    finally:
        safe.close()
        module.train(was_training)
    inter, sums, present = counts[0], counts[1], counts[2].any(axis=0)
    cols = present if present.any() else np.ones_like(present)
    dice = dice_from_counts(inter, sums)[:, cols].mean(axis=1)
    return {j + 1: round(float(d), 4) for j, d in enumerate(dice)}


def item_counts(
    it: TrainingItem, predictor: Predictor, config: Any, size: Sequence[int], overlap: float, batch: int
) -> np.ndarray:
    """``(3, levels, classes)``: intersections, sums and presence of the item's validation pixels, from the blended
    probabilities of the tiles that hold them, run through the sliding window by ``predictor`` (heads
    1..``config.max_depth`` of the network ``config`` describes) on tiles of at most ``size``."""
    shape = it.target.shape
    pad, grid = tile_grid(shape, config.multiple, size, overlap)

    def image_box(sl: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(slice(max(0, s.start - a), min(n, s.stop - a)) for s, (a, _), n in zip(sl, pad, shape))

    tiles = [sl for sl in grid if it.val[image_box(sl)].any()]  # every tile covering a validation pixel holds it
    edge = min(shape) <= 1

    def read(sl: tuple[slice, ...]) -> np.ndarray:
        return read_tile(it.image, sl, pad, edge).astype(np.float32, copy=False)

    sink = DiceCounts(it, pad, config.num_classes, config.max_depth, bool(config.has_cue))
    # tiles without validation pixels are skipped: rows only they cover blend to 0/0 and are never read
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in sliding_window([Plane(0, grid, read, tiles)], predictor, sink, batch):
            pass
    return sink.counts


class DiceCounts:
    """A :class:`~napari_unetpp.inference.sliding_window.Sink` that keeps, of each finished row, only the Dice counts
    of ``it``'s validation pixels: ``counts[0]`` intersections, ``counts[1]`` sums, ``counts[2]`` whether the target
    holds the class, per level and class (the foreground for one class; classes 1.. otherwise).

    Args:
        it: The item (its target and validation pixels, image coordinates).
        pad: The padding of its plane (the rows arrive in padded coordinates).
        num_classes: The network's classes.
        levels: Heads 1..levels arrive, each with the classes (and the cue).
        cue: Whether the network has an instance cue (one channel more per level, unscored).
    """

    def __init__(self, it: TrainingItem, pad: Sequence[tuple[int, int]], num_classes: int, levels: int, cue: bool):
        self.it, self.nc, self.levels, self.per_level = it, num_classes, levels, num_classes + int(cue)
        self.top = pad[0][0]
        self.rest = tuple(slice(a, a + n) for (a, _), n in zip(pad[1:], it.target.shape[1:]))
        self.classes = [1] if num_classes == 1 else list(range(1, num_classes))
        self.counts = np.zeros((3, levels, max(num_classes - 1, 1)))

    @property
    def channels(self) -> int:
        """Every level's classes (and cue) are blended."""
        return self.levels * self.per_level

    def select(self, probs: np.ndarray) -> np.ndarray:
        """``(levels, classes [+ cue], *tile)`` -> ``(levels * (classes [+ cue]), *tile)``."""
        return probs.reshape(self.levels * self.per_level, *probs.shape[2:])

    def write_rows(self, key: Hashable, lo: int, hi: int, vals: np.ndarray) -> None:
        """Count the validation pixels of padded rows ``lo:hi``."""
        it, nc, top, n = self.it, self.nc, self.top, self.it.target.shape[0]
        a, b = max(lo - top, 0), min(hi - top, n)
        if a >= b:
            return
        m = it.val[a:b]
        if not m.any():
            return
        v = vals[(slice(None), slice(a + top - lo, b + top - lo), *self.rest)]
        v = v.reshape(self.levels, self.per_level, *v.shape[1:])[:, :, m]  # (levels, classes [+ cue], pixels)
        t = it.target[a:b][m]
        pred = mask_from(v[:, 0] if nc == 1 else v[:, :nc], nc, class_axis=1)  # predict's mask rule
        out = self.counts
        for ci, c in enumerate(self.classes):
            pc, tc = (pred, t > 0) if nc == 1 else (pred == c, t == c)
            out[0, :, ci] += (pc & tc).sum(axis=-1)
            out[1, :, ci] += pc.sum(axis=-1) + tc.sum()
            out[2, :, ci] = np.maximum(out[2, :, ci], float(tc.any()))

    def plane_done(self, key: Hashable) -> None:
        """Nothing to finish: the counts are complete."""
