"""The optimisation of a run: AdamW over the parameters of the trained depth, the gradient scaler (fp16) and the
deep-supervision loss, and one step of them on a batch (moved to the device, randomly warped, trained)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from napari_unetpp.runtimes import is_oom, release_memory
from napari_unetpp.training.augment import intensity_on_device, random_affine
from napari_unetpp.training.config import FineTuneConfig
from napari_unetpp.training.losses import DeepSupervisionLoss
from napari_unetpp.training.recipe import Recipe
from napari_unetpp.training.setup import Setup
from napari_unetpp.training.steps import train_step

__all__ = ["Optimiser"]


class Optimiser:
    """AdamW (the recipe's learning rate, ``cfg.weight_decay``) over the modules of the trained depth, a gradient
    scaler (enabled for fp16 on CUDA) and :class:`~napari_unetpp.training.losses.DeepSupervisionLoss`.

    Attributes:
        optimizer: The AdamW optimiser.
        seconds: Time spent in optimiser steps so far.
    """

    def __init__(self, net: Setup, recipe: Recipe, cfg: FineTuneConfig, device: torch.device) -> None:
        self.net, self.device, self.cfg = net, device, cfg
        params = [p for _, m in net.module.modules_for_depth(net.depth) for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and net.amp == torch.float16)
        self.loss_fn = DeepSupervisionLoss(cfg.deep_supervision_weights, cfg.ce_weight, cfg.dice_weight)
        self.seconds = 0.0

    def step(
        self,
        batch: tuple[Any, ...],
        lr: float,
        rng: np.random.Generator,
        clock: Callable[[], float],
    ) -> tuple[float, float] | None:
        """One optimiser step at learning rate ``lr`` on ``batch`` (image, target, known pixels: arrays or pinned
        tensors; then, where the batch maker left it to the device, the intensity jitter and its noise seed) after a
        mild random affine (``cfg.affine_probability``): the loss and the step's seconds, or None after an
        out-of-memory error (gradients dropped and memory released: the caller shrinks the batch)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        net, dev = self.net, self.device
        x, y, v = (torch.as_tensor(a).to(dev, non_blocking=True) for a in batch[:3])
        cue = net.module.config.has_cue
        t_step = clock()  # set again below, once the batch is ready
        oom = False
        try:
            if len(batch) == 5:
                x = intensity_on_device(x, torch.as_tensor(batch[3]), int(batch[4]))
            x = x.contiguous(memory_format=net.fmt)
            x, y, v = random_affine(x, y, v, rng, self.cfg.affine_probability)
            opt, fn, scaler = self.optimizer, self.loss_fn, self.scaler
            t_step = clock()
            loss = train_step(net.module, opt, fn, x, y, v, net.depth, net.amp, scaler, cue=cue)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            oom = True  # handled below, once the exception (and the activations its frames hold) is gone
        if oom:
            del x, y, v
            self.optimizer.zero_grad(set_to_none=True)
            release_memory(dev)
            return None
        seconds = clock() - t_step
        self.seconds += seconds
        return loss, seconds
