"""The pieces of a fine-tuning step, each a small function with its own test: one optimiser step, the learning-rate
schedule, batch and patch sizes, the out-of-memory fallback, which batch norms stay frozen, and the wall-clock
:class:`Budget`."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from napari_unetpp.inference.postprocess import decode_cue_target
from napari_unetpp.inference.tiling import per_axis
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.training.data import TrainingSet
from napari_unetpp.training.losses import DeepSupervisionLoss

__all__ = [
    "Budget",
    "batch_and_patch",
    "freeze_batchnorms",
    "learning_rate",
    "shrink_after_oom",
    "small_patch_for",
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


class Budget:
    """The budget: wall-clock minutes (validation and saving included) and/or epochs.

    Training ends when the time left no longer holds another step plus the final validation and the save, so the
    whole run, from preparing the data to the saved card, ends within the budget.
    """

    SAVE_SECONDS = 1.0  # writing weights and card (measured: 0.1-0.3 s for the shipped size), with room

    def __init__(self, minutes: float | None, epochs: int | None) -> None:
        self.t0 = time.perf_counter()
        self.budget_s = None if minutes is None else minutes * 60.0
        self.epochs = epochs
        self.steps_per_epoch = 10
        self.val_seconds = 0.0
        self.step_seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _train_budget(self) -> float:
        assert self.budget_s is not None
        return max(1e-6, self.budget_s - 1.2 * self.val_seconds - self.SAVE_SECONDS)

    def fraction(self, step: int) -> float:
        """Share of the training budget used (0..1), for schedules and progress bars."""
        fr = []
        if self.budget_s is not None:
            fr.append(self.elapsed() / self._train_budget())
        if self.epochs is not None:
            fr.append(step / (self.epochs * self.steps_per_epoch))
        return float(min(1.0, max(fr)))

    def done(self, step: int) -> bool:
        """No time (or epoch) left for another step."""
        if self.epochs is not None and step >= self.epochs * self.steps_per_epoch:
            return True
        return self.budget_s is not None and self.elapsed() + 0.5 * self.step_seconds >= self._train_budget()
