"""Losses: the UNet++ hybrid loss (cross-entropy + soft Dice) and a deep-supervision wrapper with explicit weights.

Every loss takes an optional ``valid`` mask: pixels where it is 0 are unknown (not annotated) and are ignored,
never treated as background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_unetpp.model.network import probabilities

__all__ = ["hybrid_loss", "soft_dice_loss", "cue_loss", "DeepSupervisionLoss"]


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(N, *S)`` integer labels -> ``(N, C, *S)`` float one-hot (C = 1 for the binary case)."""
    if num_classes == 1:
        return (target > 0).unsqueeze(1).float()
    oh = F.one_hot(target.long().clamp(0, num_classes - 1), num_classes)
    return oh.movedim(-1, 1).float()


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, smooth: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice over the batch, averaged over classes (foreground only in the binary case).

    Args:
        logits: ``(N, C, *S)`` raw outputs.
        target: ``(N, *S)`` integer labels (binary: > 0 is foreground).
        valid: ``(N, *S)`` mask of known pixels (default: all known).
        smooth: Additive smoothing (default 1.0).
    """
    p = probabilities(logits.float(), logits.shape[1])
    t = _one_hot(target, logits.shape[1])
    if valid is not None:
        v = valid.unsqueeze(1).bool()
        p, t = torch.where(v, p, 0.0), torch.where(v, t, 0.0)
    dims = (0, *range(2, p.ndim))
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (denom + smooth)).mean()


def hybrid_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """The UNet++ paper's loss: (binary) cross-entropy plus soft Dice, ignoring pixels outside ``valid``.

    Args:
        logits: ``(N, C, *S)`` raw outputs (C = 1: sigmoid, C > 1: softmax).
        target: ``(N, *S)`` integer labels.
        valid: ``(N, *S)`` mask of known pixels (default: all known).
        ce_weight: Weight of the cross-entropy term (default 1.0).
        dice_weight: Weight of the Dice term (default 1.0).
    """
    logits32 = logits.float()
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits32[:, 0], (target > 0).float(), reduction="none")
    else:
        ce = F.cross_entropy(logits32, target.long().clamp(0, logits.shape[1] - 1), reduction="none")
    if valid is not None:
        v = valid.bool()
        # where(), not a product: an infinite loss on an unknown pixel must not turn into NaN (inf * 0)
        ce = torch.where(v, ce, torch.zeros((), dtype=ce.dtype, device=ce.device)).sum() / v.sum().clamp_min(1)
    else:
        ce = ce.mean()
    return ce_weight * ce + dice_weight * soft_dice_loss(logits, target, valid)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a per-head loss over the heads a forward returned (nnU-Net's wrapper, explicit weights).

    Args:
        weights: One weight per head, head 1 first; normalised to sum to 1 over the heads actually given
            (default: equal weights, as in the UNet++ paper).
        ce_weight: Cross-entropy weight inside each head's hybrid loss (default 1.0).
        dice_weight: Dice weight inside each head's hybrid loss (default 1.0).
        cue_weight: Weight of the instance cue's loss in each head (default 1.0; used when ``forward`` gets a
            ``cue_target``).
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        cue_weight: float = 1.0,
    ):
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]
        self.ce_weight, self.dice_weight, self.cue_weight = ce_weight, dice_weight, cue_weight

    def head_weights(self, n_heads: int) -> list[float]:
        """The normalised weights used for ``n_heads`` outputs."""
        w = [1.0] * n_heads if self.weights is None else self.weights[:n_heads]
        if len(w) != n_heads:
            raise ValueError(f"{n_heads} heads but only {len(w)} deep-supervision weights.")
        s = sum(w)
        if s <= 0:
            raise ValueError("deep-supervision weights must sum to a positive number.")
        return [x / s for x in w]

    def forward(
        self,
        outputs: Sequence[torch.Tensor],
        target: torch.Tensor,
        valid: torch.Tensor | None = None,
        cue_target: torch.Tensor | None = None,
        cue_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted loss over ``outputs`` (the list returned by ``UNetPlusPlus.forward``).

        With ``cue_target`` (``(N, *S)`` floats in [0, 1]), the last channel of each output is the instance cue
        (``forward(x, cue=True)``): it adds ``cue_weight`` x binary cross-entropy against the soft target on the
        pixels of ``cue_valid`` (default ``valid``), where the object split is known."""
        total = torch.zeros((), device=target.device)
        for w, o in zip(self.head_weights(len(outputs)), outputs):
            classes = o if cue_target is None else o[:, :-1]
            total = total + w * hybrid_loss(classes, target, valid, self.ce_weight, self.dice_weight)
            if cue_target is not None:
                cue_mask = valid if cue_valid is None else cue_valid
                total = total + w * self.cue_weight * cue_loss(o[:, -1], cue_target, cue_mask)
        return total


def cue_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of the distance cue's ``(N, *S)`` logits against its soft ``(N, *S)`` target in [0, 1]
    on the ``valid`` pixels (0 when none is valid)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if valid is None:
        return bce.mean()
    v = valid.bool()
    return torch.where(v, bce, torch.zeros((), dtype=bce.dtype, device=bce.device)).sum() / v.sum().clamp_min(1)
