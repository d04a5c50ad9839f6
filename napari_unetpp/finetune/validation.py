"""Per-level validation Dice on the held-out known pixels of a :class:`~napari_unetpp.finetune.data.TrainingSet`."""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import dice_from_counts
from ..network import UNetPlusPlus
from .data import TrainingSet

__all__ = ["validate"]


@torch.no_grad()
def validate(
    module: UNetPlusPlus, ds: TrainingSet, device: torch.device, amp: torch.dtype | None, context: int = 64
) -> dict[int, float]:
    """Per-level Dice on the validation pixels, pooled over all items; the network sees each validation region
    with ``context`` pixels around it. Multi-class: the mean over the classes the validation pixels hold (a class
    absent from them would count 1.0 for never being predicted there, and reward a model that never predicts it)."""
    was_training = module.training
    module.eval()
    cfg = module.config
    inter = np.zeros((cfg.max_depth, max(cfg.num_classes - 1, 1)))
    sums = np.zeros_like(inter)
    present = np.zeros(inter.shape[1], bool)
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
                    present[ci] |= bool(tc.any())
                    sums[j, ci] += pc.sum() + tc.sum()
    finally:
        module.train(was_training)
    cols = present if present.any() else np.ones_like(present)
    dice = dice_from_counts(inter, sums)[:, cols].mean(axis=1)
    return {j + 1: round(float(d), 4) for j, d in enumerate(dice)}
