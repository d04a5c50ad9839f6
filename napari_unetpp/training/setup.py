"""What a training run trains: the base network copied onto its device, the depth that trains, batch and patch
sizes, precision and memory layout, and which batch norms carry statistics; and the smaller sizes after an
out-of-memory error."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.runtimes import autocast_dtype, calibration_tiles, hold_cores
from napari_unetpp.training.config import FineTuneConfig
from napari_unetpp.training.data import TrainingSet, pad_item
from napari_unetpp.training.recipe import Recipe, choose_recipe
from napari_unetpp.training.steps import batch_and_patch, shrink_after_oom, small_patch_for, trained_batchnorms

__all__ = ["Setup", "calibration", "holding_cores", "set_up"]


@dataclass
class Setup:
    """The network being trained and the shapes it trains on.

    Attributes:
        module: A float32 copy of the base network on the training device (the base is never modified).
        depth: The trained depth (heads 1..depth, nodes i + j <= depth).
        levels: The trained levels, ``1..depth``: the best state is chosen on these only.
        batch: Patches per step.
        full_patch: The patch shape.
        small_patch: The early, cheap patch shape (equal to ``full_patch`` when nothing is smaller).
        amp: Autocast dtype (None: fp32).
        fmt: Memory format of the inputs (channels-last for 2D on CPU and CUDA).
        statistics: Batch norms with statistics from earlier training.
        fresh: The network never trained (``new_model``, or no batch norm with statistics).
    """

    module: UNetPlusPlus
    depth: int
    levels: list[int]
    batch: int
    full_patch: tuple[int, ...]
    small_patch: tuple[int, ...]
    amp: torch.dtype | None
    fmt: torch.memory_format
    statistics: list[nn.Module]
    fresh: bool

    def recipe_for(self, baseline: dict[int, float], cfg: FineTuneConfig) -> Recipe:
        """The recipe from the base's ``baseline`` over the trained levels and the user's choices
        (:func:`~.recipe.choose_recipe`); no small-patch phase when nothing is smaller than the full patch."""
        recipe = choose_recipe(
            baseline,
            self.levels,
            fresh=self.fresh,
            requested=cfg.recipe,
            learning_rate=cfg.learning_rate,
            freeze_batchnorm=cfg.freeze_batchnorm,
            reestimate=cfg.reestimate_statistics,
        )
        return replace(recipe, small_patch_until=0.0) if self.small_patch == self.full_patch else recipe

    def shrink(self, patch: Sequence[int]) -> str:
        """After an out-of-memory error on ``patch``: half the batch, else (one patch per step already) smaller
        patches; returns the message saying so.

        Raises:
            MemoryError: nothing smaller is left (one sentence saying what to do).
        """
        was = self.batch
        self.batch, smaller = shrink_after_oom(self.batch, patch, self.module.config.multiple)
        if self.batch == was:  # already one patch per step: the patches shrink
            self.full_patch = tuple(min(a, b) for a, b in zip(self.full_patch, smaller))
            self.small_patch = tuple(min(a, b) for a, b in zip(self.small_patch, smaller))
        return f"out of memory: retrying with batch {self.batch}, patches {'x'.join(map(str, smaller))}"


def set_up(base: LoadedModel, ds: TrainingSet, cfg: FineTuneConfig, device: torch.device) -> Setup:
    """Copy the base network onto ``device`` and size the run for ``ds``; the items are padded to the patch."""
    module: UNetPlusPlus = copy.deepcopy(base.module).float().to(device)
    depth = module.check_depth(cfg.train_depth)
    batch, full_patch = batch_and_patch(ds, module, device, cfg.patch_size, cfg.batch_size)
    small_patch = small_patch_for(full_patch, module.config.multiple, cfg.small_patch_size)
    for it in ds.items:
        pad_item(it, full_patch)
    amp = autocast_dtype(device, cfg.precision, training=True) if device.type != "mps" else None
    two_d = ds.spatial_dims == 2 and device.type in ("cpu", "cuda")
    fmt = torch.channels_last if two_d else torch.contiguous_format
    module = module.to(memory_format=fmt)  # type: ignore[call-overload]
    statistics = trained_batchnorms(module)  # batch norms that carry statistics from earlier training
    fresh = bool(base.card.training.get("untrained")) or not statistics
    levels = list(range(1, depth + 1))
    return Setup(module, depth, levels, batch, full_patch, small_patch, amp, fmt, statistics, fresh)


def holding_cores(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Training on the CPU holds its cores while it computes (:func:`~napari_unetpp.runtimes.hold_cores`): no
    runtime is measured meanwhile on another thread (a prediction beside it), nor saved, since a measurement then
    times the contention."""
    return hold_cores() if device.type == "cpu" else contextlib.nullcontext()


def calibration(items: list[Any]) -> Any:
    """Calibration tiles for int8 inference from the training images (normalised as the model reads them)."""
    try:
        return calibration_tiles([it.image for it in items], 192 if items[0].image.ndim == 3 else 48)
    except (ValueError, IndexError):
        return None
