"""Per-level validation Dice on the held-out known pixels of a :class:`~napari_unetpp.training.data.TrainingSet`.

Validation sees what :func:`~napari_unetpp.inference.predict.predict` would produce: each plane (or volume) is padded
to a
multiple of the network's size and covered by predict's tile plan (:class:`~napari_unetpp.inference.tiling.TilePlan`,
the same
tile, overlap and alignment), the tiles are blended with its Gaussian weights
(:class:`~napari_unetpp.inference.tiling.Blender`)
and the mask is predict's (probability >= 0.5, or the argmax of the classes). Only the tiles holding validation
pixels run, so memory is bounded by one batch of tiles, never by the box around scattered validation pixels. The
network is the module being trained, run by PyTorch (:class:`~napari_unetpp.runtimes.backends.TorchBackend`), never a
cached
inference copy or an exported graph, which would score earlier weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.tiling import (
    Blender,
    TilePlan,
    default_batch,
    default_tile,
    padding_for,
    per_axis,
    read_tile,
)
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.runtimes.backends import Choice, TorchBackend
from napari_unetpp.runtimes.device import is_oom, release_memory
from napari_unetpp.training.data import TrainingItem, TrainingSet
from napari_unetpp.training.metrics import dice_from_counts

__all__ = ["validate"]

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
    ncols = max(cfg.num_classes - 1, 1)
    counts = np.zeros((3, cfg.max_depth, ncols))  # intersections, sums, presence per level and class
    precision = _PRECISION.get(amp, "fp32")
    predictor = TorchBackend(module, cfg.max_depth, device, precision, Choice("torch", precision, "validation"))
    mult = per_axis(cfg.multiple, cfg.spatial_dims)
    size = per_axis(tile, cfg.spatial_dims) if tile is not None else default_tile(cfg.spatial_dims)
    batch = default_batch(size, device.type)  # predict's budget
    try:
        for it in ds.items:
            if not it.val.any():
                continue
            while True:
                failed = False
                try:
                    counts += _item_counts(it, predictor, mult, size, overlap, batch)
                except (RuntimeError, MemoryError) as exc:
                    if not is_oom(exc):
                        raise
                    failed = True  # handled once the exception (and the activations its frames hold) is gone
                if not failed:
                    break
                release_memory(device)
                if batch > 1:
                    batch //= 2
                else:
                    plan_tile = _plan(it.target.shape, mult, size, overlap)[1].tile_shape
                    smaller = tuple(max(m, t // 2 // m * m) for t, m in zip(plan_tile, mult))
                    if smaller == tuple(plan_tile):
                        raise MemoryError(
                            f"out of memory while validating, even on tiles of {'x'.join(map(str, plan_tile))}; "
                            f"fine-tune on the CPU (device='cpu') or close what else uses the memory."
                        ) from None
                    size = smaller
                log.warning("out of memory while validating: retrying with %d tile(s) of %s", batch, size)
    finally:
        module.train(was_training)
    inter, sums, present = counts[0], counts[1], counts[2].any(axis=0)
    cols = present if present.any() else np.ones_like(present)
    dice = dice_from_counts(inter, sums)[:, cols].mean(axis=1)
    return {j + 1: round(float(d), 4) for j, d in enumerate(dice)}


def _plan(
    shape: Sequence[int], mult: Sequence[int], size: Sequence[int], overlap: float
) -> tuple[list[tuple[int, int]], TilePlan]:
    """Predict's padding and tile plan for a plane of ``shape`` (see ``prediction.plan_prediction``)."""
    pad = padding_for(shape, mult)
    padded = tuple(int(n) + a + b for n, (a, b) in zip(shape, pad))
    tile_t = tuple(max(m, t // m * m) for t, m in zip(size, mult))
    return pad, TilePlan(padded, tile_t, overlap, align=tuple(mult))


def _item_counts(
    it: TrainingItem,
    predictor: TorchBackend,
    mult: Sequence[int],
    size: Sequence[int],
    overlap: float,
    batch: int,
) -> np.ndarray:
    """``(3, levels, classes)``: intersections, sums and presence of the item's validation pixels, from the blended
    probabilities of the tiles that hold them."""
    cfg = predictor.net.config
    nc, levels = cfg.num_classes, cfg.max_depth
    per_level = nc + int(cfg.has_cue)
    shape = it.target.shape
    pad, plan = _plan(shape, mult, size, overlap)

    def image_box(sl: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(slice(max(0, s.start - a), min(n, s.stop - a)) for s, (a, _), n in zip(sl, pad, shape))

    tiles = [sl for sl in plan if it.val[image_box(sl)].any()]  # every tile covering a validation pixel holds it
    out = np.zeros((3, levels, max(nc - 1, 1)))
    classes = [1] if nc == 1 else list(range(1, nc))
    top = pad[0][0]
    rest = tuple(slice(a, a + n) for (a, _), n in zip(pad[1:], shape[1:]))

    def sink(lo: int, hi: int, vals: np.ndarray) -> None:
        a, b = max(lo - top, 0), min(hi - top, shape[0])
        if a >= b:
            return
        m = it.val[a:b]
        if not m.any():
            return
        v = vals[(slice(None), slice(a + top - lo, b + top - lo), *rest)]
        v = v.reshape(levels, per_level, *v.shape[1:])[:, :, m]  # (levels, classes [+ cue], validation pixels)
        t = it.target[a:b][m]
        pred = mask_from(v[:, 0] if nc == 1 else v[:, :nc], nc, class_axis=1)  # predict's mask rule
        for ci, c in enumerate(classes):
            pc, tc = (pred, t > 0) if nc == 1 else (pred == c, t == c)
            out[0, :, ci] += (pc & tc).sum(axis=-1)
            out[1, :, ci] += pc.sum(axis=-1) + tc.sum()
            out[2, :, ci] = np.maximum(out[2, :, ci], float(tc.any()))

    blender = Blender(plan, levels * per_level, sink)
    edge = min(shape) <= 1
    # tiles without validation pixels are skipped: rows only they cover blend to 0/0 and are never read
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(0, len(tiles), batch):
            chunk = tiles[i : i + batch]
            x = np.stack([read_tile(it.image, sl, pad, edge) for sl in chunk]).astype(np.float32, copy=False)
            probs = predictor(x)  # (B, levels, classes [+ cue], *tile)
            for sl, p in zip(chunk, probs):
                blender.add(sl, p.reshape(levels * per_level, *p.shape[2:]))
        blender.finish()
    return out
