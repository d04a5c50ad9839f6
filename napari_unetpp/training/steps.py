"""The pieces of a fine-tuning step, each a small function with its own test: one optimiser step, the learning-rate
curve, batch and patch sizes, the out-of-memory fallback, which batch norms stay frozen, and the rules that keep the
best validated state (:func:`is_improvement`, :func:`refit_pays`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from napari_unetpp.inference.postprocess import decode_cue_target
from napari_unetpp.inference.tiling import per_axis
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.training.data import TrainingSet
from napari_unetpp.training.losses import DeepSupervisionLoss

__all__ = [
    "BestState",
    "batch_and_patch",
    "freeze_batchnorms",
    "is_improvement",
    "learning_rate",
    "mean_dice",
    "refit_pays",
    "shrink_after_oom",
    "small_patch_for",
    "state_snapshot",
    "steps_per_epoch",
    "train_step",
    "trained_batchnorms",
]


def train_step(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: DeepSupervisionLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    depth: int,
    amp: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    cue: bool = False,
) -> float:
    """One optimiser step of deep supervision over heads 1..``depth`` on known pixels; returns the loss.

    ``cue=True`` (a model with an instance cue): ``y`` is the encoded target of
    :func:`~napari_unetpp.inference.postprocess.encode_cue_target`, and the cue heads train beside the class heads on
    the
    objects whose split is known (inside objects only: the split never reads the cue elsewhere)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        outs = module(x, depth=depth, cue=True) if cue else module(x, depth=depth)
    if cue:  # the split reads the cue only inside the mask: it trains on the objects' pixels alone
        fg, cue_t, known = decode_cue_target(y)
        loss = loss_fn(outs, fg, v, cue_t, v & known & (fg > 0))
    else:
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


def shrink_after_oom(batch: int, patch: Sequence[int], multiple: int | Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """Next smaller (batch, patch) after an out-of-memory error: halve the batch, then the patch (kept a multiple
    of ``multiple`` per axis, at least 2 ``multiple``s)."""
    if batch > 1:
        return batch // 2, tuple(patch)
    mults = per_axis(multiple, len(patch))
    smaller = tuple(max(2 * m, (p // 2) // m * m) for p, m in zip(patch, mults))
    if smaller == tuple(patch):
        raise MemoryError("out of memory even with one small patch per step; close other programs or use the CPU.")
    return 1, smaller


def batch_and_patch(
    ds: TrainingSet,
    module: UNetPlusPlus,
    device: torch.device,
    patch_size: int | None = None,
    batch_size: int | None = None,
) -> tuple[int, tuple[int, ...]]:
    """Patches per step and patch shape: the given ones, else 256^2 in 2D (32 x 96^2 in 3D on CPU, 64 x 96^2 on
    GPUs), capped by the data and kept multiples of the network's size multiple (2**max_depth, per axis); 4 patches
    on CPU, on CUDA as many as half the free memory holds (2-32)."""
    mults = module.config.multiple
    shape = np.max([it.target.shape for it in ds.items], axis=0)
    if patch_size:
        base = [int(patch_size)] * ds.spatial_dims
    elif ds.spatial_dims == 2:
        base = [256, 256]
    else:
        base = [32 if device.type == "cpu" else 64, 96, 96]
    patch = tuple(int(min(p, math.ceil(d / m) * m)) for p, d, m in zip(base, shape, mults))
    patch = tuple(max(m, p // m * m) for p, m in zip(patch, mults))
    if batch_size:
        return int(batch_size), patch
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # measured: about 4 kB per pixel for a 16-filter network in mixed precision; scale with the width
        per_sample = 4e3 * (module.config.features[0] / 16) * float(np.prod(patch))
        return int(np.clip(0.5 * free // per_sample, 2, 32)), patch
    return 4, patch


def small_patch_for(full: Sequence[int], multiple: int | Sequence[int], size: int | None = None) -> tuple[int, ...]:
    """The early, cheap patch: ``size`` per axis when given, else half of ``full``; kept a multiple of ``multiple``
    (per axis), at least 4 ``multiple``s in-plane (2 along Z), and never larger than ``full``."""
    nd = len(full)
    out = []
    for ax, (p, m) in enumerate(zip(full, per_axis(multiple, nd))):
        least = (2 if (nd == 3 and ax == 0) else 4) * m
        want = int(size) if size else p // 2
        out.append(min(p, max(least, want // m * m)))
    return tuple(out)


def steps_per_epoch(n_train: int, batch: int, patch: Sequence[int]) -> int:
    """Steps between validations by default: enough patches to cover the training pixels once, at least 10."""
    return max(10, math.ceil(n_train / (batch * float(np.prod(patch)))))


def learning_rate(step: int, fraction: float, peak: float, warmup_steps: int = 5, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``peak`` to ``floor * peak`` as ``fraction`` (of
    the budget) goes from 0 to 1. Fine-tuning uses the defaults; the training scripts their own warm-up and floor."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


def trained_batchnorms(module: nn.Module) -> list[nn.Module]:
    """Batch norms with statistics from earlier training; never-trained ones (a model from scratch) are left out."""
    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.num_batches_tracked is None or int(m.num_batches_tracked) > 0)
    ]


def freeze_batchnorms(layers: list[nn.Module]) -> None:
    """Keep these batch norms' running statistics fixed (eval mode) while the rest of the network trains."""
    for m in layers:
        m.eval()


def mean_dice(scores: dict[int, float], levels: Sequence[int]) -> float:
    """Mean validation Dice over ``levels`` (the trained ones: the best state is chosen on these only); minus
    infinity without scores (no validation pixels yet), so any scored state beats it."""
    if not scores:
        return float("-inf")
    return float(np.mean([scores[k] for k in levels]))


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's weights and buffers on the CPU (training goes on changing the module's own)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def is_improvement(mean: float, best: float, min_delta: float, improved: bool) -> bool:
    """Whether a validation's ``mean`` Dice replaces the ``best`` state: by more than ``min_delta``, or by anything
    while no trained state has yet beaten the base model (``improved`` False)."""
    return mean > best + min_delta or (mean > best and not improved)


def refit_pays(mean: float, best: float, baseline: float) -> bool:
    """Whether the validation pixels should join training at the refit point: the validation there is the best so
    far (still learning, not over-fitting) and better than the base model's ``baseline``."""
    return mean >= best and mean > baseline


@dataclass
class BestState:
    """The state a run keeps: the base model's to begin with (it is a candidate), replaced by better validations.

    Attributes:
        mean: Mean validation Dice over the trained levels.
        scores: Per-level validation Dice.
        state: The weights (on the CPU).
        improved: Whether a trained state has beaten the base model.
        since: Validations since the last improvement (for early stopping).
    """

    mean: float
    scores: dict[int, float]
    state: dict[str, torch.Tensor]
    improved: bool = False
    since: int = 0

    def offer(self, scores: dict[int, float], levels: Sequence[int], module: nn.Module, min_delta: float) -> None:
        """A validation during training: kept when :func:`is_improvement` says so, else counted in ``since``."""
        mean = mean_dice(scores, levels)
        if is_improvement(mean, self.mean, min_delta, self.improved):
            self.mean, self.scores, self.state = mean, scores, state_snapshot(module)
            self.since, self.improved = 0, True
        else:
            self.since += 1

    def rebase(self) -> None:
        """The validation pixels changed (the data grew): the kept state stays, but its score no longer compares,
        so the next validation's state replaces it."""
        self.mean, self.scores, self.since, self.improved = float("-inf"), {}, 0, False

    def offer_statistics(self, scores: dict[int, float], levels: Sequence[int], module: nn.Module) -> None:
        """The validation after re-estimating batch-norm statistics: kept when better at all (no weight trained)."""
        if mean_dice(scores, levels) > self.mean:
            self.mean, self.scores, self.state = mean_dice(scores, levels), scores, state_snapshot(module)
