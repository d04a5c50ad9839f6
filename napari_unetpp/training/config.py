"""What a fine-tuning run is asked to do (:class:`FineTuneConfig`, its hyperparameters) and what it reports while it
runs (:class:`TrainProgress`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from napari_unetpp.training.metrics import RECOMMEND_MARGIN
from napari_unetpp.training.recipe import RECIPES

__all__ = ["FineTuneConfig", "TrainProgress", "make_config"]


@dataclass
class FineTuneConfig:
    """Fine-tuning hyperparameters (every field can also be passed to :func:`fine_tune` as a keyword).

    Attributes:
        minutes: Wall-clock budget (default: 2 when ``epochs`` is not given either).
        epochs: Epoch budget; an epoch is ``steps_per_epoch`` steps.
        steps_per_epoch: Steps between validations (default: enough patches to cover the training pixels once,
            at least 10).
        recipe: ``"auto"`` (decided from the base model's baseline, see :mod:`.recipe`), ``"gentle"``, ``"adapt"``
            or ``"scratch"``.
        learning_rate: AdamW peak learning rate (default: the recipe's; 3e-4 gentle, 1e-3..2e-3 adapt, 2e-3
            scratch).
        weight_decay: AdamW weight decay (default 1e-4).
        warmup_steps: Linear warm-up steps (default 5).
        batch_size: Patches per step (default: 4 on CPU; on CUDA sized from free memory).
        patch_size: Patch edge in pixels (default 256 in 2D, 96 in 3D (32 along Z on CPU), capped by the image).
        small_patch_size: Patch edge for the first half of ``adapt``/``scratch`` runs (default half the patch).
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
        mirror: Flips and 90-degree rotations (default: on, except for CT models (an HU window), whose anatomy
            has one orientation in the canonical array: mirrored left and right, the liver sits where the spleen
            does and the two look alike; measured on the CT sample, a liver + spleen model never found the spleen
            with mirroring).
        freeze_batchnorm: Keep batch-norm running statistics fixed (default: the recipe's; True for gentle).
        reestimate_statistics: Re-estimate batch-norm statistics on the images before training (default: the
            recipe's; True for adapt).
        refit_from: Share of the budget after which the validation pixels train too, if validation is still
            improving there (default: the recipe's; 0.5 for adapt and scratch, never for gentle; 0 = never).
        race: When the base does not fit (``recipe="auto"`` chose ``adapt``), race it against a fresh network on
            the first quarter of the budget and continue the better (default False: measured on five shifts, the
            race chose worse than adapting on three and lost up to 0.33 Dice; see :mod:`.race`).
        ignore_label: Label value meaning "unknown" (default None).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (default auto).
        seed: Random seed (default 0).
    """

    minutes: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    recipe: str = "auto"
    learning_rate: float | None = None
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    batch_size: int | None = None
    patch_size: int | None = None
    small_patch_size: int | None = None
    train_depth: int | None = None
    deep_supervision_weights: tuple[float, ...] | None = None
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    val_fraction: float = 0.2
    patience: int = 6
    min_delta: float = 0.002
    margin: float = RECOMMEND_MARGIN
    focus_fraction: float = 0.5
    foreground_fraction: float = 0.33
    affine_probability: float = 0.3
    mirror: bool | None = None
    freeze_batchnorm: bool | None = None
    reestimate_statistics: bool | None = None
    refit_from: float | None = None
    race: bool = False
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
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}.")


@dataclass
class TrainProgress:
    """What a fine-tuning run is doing.

    Attributes:
        phase: ``"prepared"``, ``"baseline"`` (with the recipe chosen), ``"statistics"`` (batch-norm statistics
            re-estimated), ``"train"``, ``"validate"``, ``"refit"`` (whether the validation pixels train for the
            rest of the run, and the last score on them once they did; ``val`` stays None: they no longer measure
            anything), ``"retry"`` (out of memory, smaller batch), ``"race"`` (``race=True``: the race's start and
            the fresh lane's steps; its end is a ``"validate"``), ``"saving"``.
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


def make_config(config: FineTuneConfig | None, options: dict[str, Any]) -> FineTuneConfig:
    """``config`` with the fields in ``options`` overriding it; 2 minutes when neither gives a budget.

    Raises:
        TypeError: an option that is not a field of :class:`FineTuneConfig`.
        ValueError: a value out of range (one sentence each).
    """
    unknown = set(options) - {f.name for f in fields(FineTuneConfig)}
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s) {sorted(unknown)}; see FineTuneConfig.")
    cfg = FineTuneConfig(**{**(asdict(config) if config else {}), **options})
    if cfg.minutes is None and cfg.epochs is None:
        cfg.minutes = 2.0
    return cfg
