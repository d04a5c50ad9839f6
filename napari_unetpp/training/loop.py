"""The fine-tuning loop: a generator that yields progress and returns the saved model version.

    for progress in fine_tune_iter("em-membranes", TrainingPair(image, labels, slices=[3, 7]), minutes=2): ...
    result = fine_tune(...)             # the same, run to the end

Patches centred on known training pixels (see :mod:`.augment`). How to train is decided from the base model's own
baseline on the validation pixels (see :mod:`.recipe`): ``gentle`` (small learning rate, frozen batch-norm
statistics) when the base already does well, ``adapt`` (batch-norm statistics re-estimated on the user's images and
trained, a learning rate that moves, small patches first, fewer validations early) when it does not, ``scratch`` for
a fresh network from :func:`~napari_unetpp.model.modalities.new_model`; adapt and scratch train on the validation pixels
too for the second half of the run when validation is still improving at that point (the final state is kept, the
card reports the last honest validation). AdamW with warm-up and cosine decay; deep supervision with the hybrid loss
over every head up to the trained depth. Mixed precision on CUDA (bf16 where the GPU has it, batches made ahead by a
background thread), bf16 on CPUs that support it. The budget is the user's wall clock: data preparation, validation
and saving count, and training stops early enough for the final validation and the save. The base model's validation
score is measured first and counts as a candidate, so the saved version is never worse on validation than its parent
(after the last phase: at its last honest validation). Stopping (the ``stop`` event) validates and saves the best
state so far; closing the generator cancels and saves nothing. Where the depth flows: ``train_depth=k`` trains the
sub-network of depth k (heads 1..k, nodes i + j <= k); validation scores every level, the best state and the
recommended depth (the shallowest within :data:`~napari_unetpp.training.metrics.RECOMMEND_MARGIN` of the best) are
chosen on
the trained levels only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_unetpp.jobs import run_to_end
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import check_model_name, resolve_model
from napari_unetpp.runtimes.backends import hold_cores, release_pending
from napari_unetpp.runtimes.device import autocast_dtype, describe_device, is_oom, release_memory, resolve_device
from napari_unetpp.training.augment import Prefetcher, augment_batch, random_affine, sample_batch
from napari_unetpp.training.data import TrainingPair, TrainingSet, pad_item, prepare_data
from napari_unetpp.training.losses import DeepSupervisionLoss
from napari_unetpp.training.metrics import RECOMMEND_MARGIN, format_scores
from napari_unetpp.training.recipe import RECIPES, choose_recipe, patch_at, reestimate_batchnorm
from napari_unetpp.training.saving import FineTuneResult, check_class_names, default_name, save_result
from napari_unetpp.training.steps import (
    Budget,
    batch_and_patch,
    freeze_batchnorms,
    learning_rate,
    shrink_after_oom,
    small_patch_for,
    train_step,
    trained_batchnorms,
)
from napari_unetpp.training.validation import validate

__all__ = ["FineTuneConfig", "FineTuneResult", "TrainProgress", "default_name", "fine_tune", "fine_tune_iter"]

log = logging.getLogger(__name__)


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
            anything), ``"retry"`` (out of memory, smaller batch), ``"saving"``.
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


def fine_tune_iter(
    model: Any,
    data: TrainingPair | Sequence[TrainingPair],
    *,
    config: FineTuneConfig | None = None,
    device: str | torch.device = "auto",
    name: str | None = None,
    save: bool = True,
    stop: threading.Event | Callable[[], bool] | None = None,
    classes: Sequence[str] | None = None,
    **options: Any,
) -> Generator[TrainProgress, None, FineTuneResult]:
    """Fine-tune ``model`` on corrected labels; yield :class:`TrainProgress`, return :class:`FineTuneResult`.

    Args:
        model: Base model (name, ``name@vN``, path, :class:`LoadedModel` or ``UNetPlusPlus``), or a fresh network
            from :func:`~napari_unetpp.model.modalities.new_model`; never modified.
        data: One or more :class:`TrainingPair`.
        config: Hyperparameters; keywords in ``options`` override its fields (e.g. ``minutes=2``).
        device: ``"auto"`` (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        name: Name to save under (default: the base's name for user models, ``<base>-finetuned`` for shipped ones).
        save: Save the best state as a new model version (never overwrites anything).
        stop: An event (or callable) that ends training at the next step; the best state so far is validated, kept
            and saved. Closing the generator instead cancels the run: nothing is saved.
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
    if name is not None:
        check_model_name(name)  # before any work: a name the save would refuse must not cost the run
    if cfg.minutes is None and cfg.epochs is None:
        cfg.minutes = 2.0
    base = resolve_model(model)
    class_names = check_class_names(classes, base)
    clock = Budget(cfg.minutes, cfg.epochs)
    dev = resolve_device(device)
    release_pending()  # memory a recent prediction kept for the next one: training needs its own
    should_stop = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds = prepare_data(data, base, ignore_label=cfg.ignore_label, val_fraction=cfg.val_fraction)
    module: UNetPlusPlus = copy.deepcopy(base.module).float().to(dev)
    depth = module.check_depth(cfg.train_depth)
    levels = list(range(1, depth + 1))  # the heads that train: the best state is chosen on these only
    # a model with an instance cue trains it where the labels are instance labels (the targets carry it)
    has_cue = module.config.has_cue
    batch, full_patch = batch_and_patch(ds, module, dev, cfg.patch_size, cfg.batch_size)
    small_patch = small_patch_for(full_patch, module.config.multiple, cfg.small_patch_size)
    for it in ds.items:
        pad_item(it, full_patch)
    amp = autocast_dtype(dev, cfg.precision, training=True) if dev.type != "mps" else None
    fmt = torch.channels_last if (ds.spatial_dims == 2 and dev.type in ("cpu", "cuda")) else torch.contiguous_format
    module = module.to(memory_format=fmt)  # type: ignore[call-overload]
    statistics = trained_batchnorms(module)  # batch norms that carry statistics from earlier training
    fresh = bool(base.card.training.get("untrained")) or not statistics
    summary = {**ds.summary, "patch": list(full_patch), "batch": batch}
    yield TrainProgress(
        "prepared",
        seconds=clock.elapsed(),
        message=f"{ds.n_train} training and {ds.n_val} validation pixels in {len(ds.items)} "
        f"slice(s); patches {'x'.join(map(str, full_patch))}, batch {batch}, on {describe_device(dev)}",
    )

    def validated() -> dict[int, float]:
        """Per-level validation Dice; its duration is what the budget keeps for the last validation."""
        t_val = time.perf_counter()
        with _holding_cores(dev):
            scores = validate(module, ds, dev, amp, tile=base.card.tile)  # predict's tiles, on the module trained
        clock.val_seconds = time.perf_counter() - t_val
        return scores

    baseline = validated()
    recipe = choose_recipe(
        baseline,
        levels,
        fresh=fresh,
        requested=cfg.recipe,
        learning_rate=cfg.learning_rate,
        freeze_batchnorm=cfg.freeze_batchnorm,
        reestimate=cfg.reestimate_statistics,
    )
    if small_patch == full_patch:  # nothing smaller to start with
        recipe = replace(recipe, small_patch_until=0.0)
    summary.update(recipe=recipe.to_dict(), small_patch=list(small_patch) if recipe.small_patch_until else None)
    best_state, best_scores = _snapshot(module), baseline
    best = _mean(baseline, levels)
    history: list[dict[str, Any]] = [{"step": 0, "seconds": round(clock.elapsed(), 2), "loss": None, "val": baseline}]
    yield TrainProgress(
        "baseline",
        seconds=clock.elapsed(),
        val=baseline,
        best=best,
        message=f"base model: {format_scores(baseline)}; {recipe.describe()}"
        + (f"; patches {'x'.join(map(str, small_patch))} first" if recipe.small_patch_until else ""),
    )
    if recipe.reestimate_batchnorm:
        with _holding_cores(dev):
            n = reestimate_batchnorm(module, _statistics_batches(ds, rng, batch, full_patch, dev, fmt))
        scores = validated()
        history.append({"step": 0, "seconds": round(clock.elapsed(), 2), "loss": None, "val": scores, "note": "AdaBN"})
        if _mean(scores, levels) > best:
            best, best_scores, best_state = _mean(scores, levels), scores, _snapshot(module)
        yield TrainProgress(
            "statistics",
            seconds=clock.elapsed(),
            fraction=clock.fraction(0),
            val=scores,
            best=best,
            message=f"batch-norm statistics re-estimated on {n} batches of your images: {format_scores(scores)}",
        )
    params = [p for _, m in module.modules_for_depth(depth) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp == torch.float16)
    loss_fn = DeepSupervisionLoss(cfg.deep_supervision_weights, cfg.ce_weight, cfg.dice_weight)
    spe = cfg.steps_per_epoch or max(10, math.ceil(ds.n_train / (batch * float(np.prod(full_patch)))))
    clock.steps_per_epoch = spe
    summary["steps_per_epoch"] = spe
    mirror = cfg.mirror if cfg.mirror is not None else base.normalization.mode != "window"
    summary["mirror"] = mirror  # flips and quarter turns: off for CT anatomy unless asked for
    step, epoch, since_best, stopped, improved, losses = 0, 0, 0, "budget", False, []
    last_val_step, last_val_time = 0, clock.elapsed()
    frozen = statistics if recipe.freeze_batchnorm else []  # decided once, before any step
    module.train()
    freeze_batchnorms(frozen)
    batches = _batch_maker(ds, rng, cfg, mirror, dev)
    x = y = v = None
    step_seconds = waited = 0.0
    refit_at = recipe.refit_from if cfg.refit_from is None else float(cfg.refit_from)
    refit: dict[str, Any] = {"from": refit_at, "used": False, "why": "not reached" if refit_at else "off"}
    summary["refit"] = refit
    cores = hold_cores() if dev.type == "cpu" else None  # the training phase: released in the finally below
    try:
        while True:
            if should_stop():
                stopped = "stopped by user"
                break
            if clock.done(step):
                break
            frac = clock.fraction(step)
            if refit["why"] == "not reached" and step and frac >= refit_at:
                # the last phase on every known pixel, if validation says the network is still learning
                validated_now = last_val_step != step  # else the validation just made decides
                if validated_now:
                    epoch += 1
                    scores = validated()
                    freeze_batchnorms(frozen)
                    last_val_step, last_val_time = step, clock.elapsed()
                    history.append({"step": step, "seconds": round(clock.elapsed(), 2), "loss": None, "val": scores})
                scores = history[-1]["val"]
                mean = _mean(scores, levels)
                if mean >= best and mean > _mean(baseline, levels):  # the best so far, and better than the base
                    best, best_scores, improved = mean, scores, True
                    refit.update(
                        used=True, step=step, why=f"validation still improving at {refit_at:.0%} of the budget"
                    )
                    batches.close()  # its thread reads the items that change now
                    waited += batches.wait_seconds
                    for it in ds.items:
                        it.train = it.train | it.val
                        it.index()
                    batches = _batch_maker(ds, rng, cfg, mirror, dev)
                    message = (
                        "still improving: the validation pixels train too from now on, and the final state is kept"
                    )
                else:
                    refit["why"] = f"validation not improving (best {best:.3f}, now {mean:.3f})"
                    message = "no longer improving: the best validated state is kept"
                yield TrainProgress(
                    "validate" if validated_now else "refit",
                    step,
                    epoch,
                    clock.elapsed(),
                    frac,
                    val=scores if validated_now else None,
                    best=best,
                    message=f"validation after {step} steps: {format_scores(scores)}; {message}",
                )
            lr = learning_rate(step, frac, recipe.learning_rate, cfg.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            patch = patch_at(frac, full_patch, small_patch, recipe.small_patch_until)
            xb, yb, vb = batches.get(batch, patch)
            x = torch.from_numpy(xb).to(dev, non_blocking=True).contiguous(memory_format=fmt)
            y, v = torch.from_numpy(yb).to(dev, non_blocking=True), torch.from_numpy(vb).to(dev, non_blocking=True)
            x, y, v = random_affine(x, y, v, rng, cfg.affine_probability)
            t_step = time.perf_counter()
            oom = False
            try:
                loss = train_step(module, optimizer, loss_fn, x, y, v, depth, amp, scaler, cue=has_cue)
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    raise
                oom = True  # handled below, once the exception (and the activations its frames hold) is gone
            if oom:
                x = y = v = None
                optimizer.zero_grad(set_to_none=True)
                release_memory(dev)
                was = batch
                batch, smaller = shrink_after_oom(batch, patch, module.config.multiple)
                if batch == was:  # already one patch per step: the patches shrink
                    full_patch = tuple(min(a, b) for a, b in zip(full_patch, smaller))
                    small_patch = tuple(min(a, b) for a, b in zip(small_patch, smaller))
                yield TrainProgress(
                    "retry",
                    step,
                    epoch,
                    clock.elapsed(),
                    clock.fraction(step),
                    message=f"out of memory: retrying with batch {batch}, patches {'x'.join(map(str, smaller))}",
                )
                continue
            clock.step_seconds = time.perf_counter() - t_step
            step_seconds += clock.step_seconds
            step += 1
            losses.append(loss)
            yield TrainProgress(
                "train",
                step,
                epoch,
                clock.elapsed(),
                clock.fraction(step),
                loss=loss,
                best=best,
                message=f"step {step}: loss {loss:.4f}",
            )
            last = clock.done(step) or should_stop()
            due = step - last_val_step >= spe
            if not cfg.steps_per_epoch and recipe.name != "gentle":  # fewer validations while the network moves fast
                due = due and clock.fraction(step) >= recipe.first_validation
                if clock.budget_s is not None:
                    due = due and clock.elapsed() - last_val_time >= 0.1 * clock.budget_s
            if refit["used"] and not last:
                continue  # the validation pixels train now: scoring them would select nothing
            if last or due:
                epoch += 1
                scores = validated()
                freeze_batchnorms(frozen)
                last_val_step, last_val_time = step, clock.elapsed()
                mean = _mean(scores, levels)
                history.append(
                    {
                        "step": step,
                        "seconds": round(clock.elapsed(), 2),
                        "loss": round(float(np.mean(losses[-spe:])), 4),
                        "val": scores,
                        "patch": list(patch),
                    }
                )
                trained_on = refit["used"]  # scored on pixels it trained on: shown, never used to choose
                if trained_on:
                    history[-1]["note"] = "validation pixels trained on"
                elif mean > best + cfg.min_delta or (mean > best and not improved):
                    best, best_scores, best_state, since_best, improved = mean, scores, _snapshot(module), 0, True
                else:
                    since_best += 1
                yield TrainProgress(
                    "refit" if trained_on else "validate",
                    step,
                    epoch,
                    clock.elapsed(),
                    clock.fraction(step),
                    loss=history[-1]["loss"],
                    val=None if trained_on else scores,
                    best=best,
                    message=f"{'after' if trained_on else 'validation after'} {step} steps"
                    + (", scored on pixels it trained on" if trained_on else "")
                    + f": {format_scores(scores)}",
                )
                if trained_on:
                    stopped = "stopped by user" if should_stop() else stopped
                    break
                if cfg.patience and since_best >= cfg.patience:
                    stopped = "early stopping"
                    break
        if refit["used"]:
            best_state = _snapshot(module)  # the final state, trained on every known pixel
    finally:  # also when the caller closes the generator: that cancels the run, and nothing is saved
        if cores is not None:
            cores.release()
        batches.close()
        if batches.threaded:
            summary["waited_for_batches_s"] = round(waited + batches.wait_seconds, 2)
        summary["train_steps_s"] = round(step_seconds, 2)
        x = y = v = None  # the last batch, on the device
        del optimizer
        module.to("cpu")
        if dev.type != "cpu":  # the accelerator's cached memory; on the CPU the freed tensors are back already, and
            release_memory(dev)  # a full garbage collection of napari's heap took ~1 s out of the budget's end
    yield TrainProgress(
        "saving",
        step,
        epoch,
        clock.elapsed(),
        1.0,
        best=best,
        message=f"{stopped} after {step} steps; saving" if save else f"{stopped} after {step} steps",
    )
    result = save_result(
        base,
        best_state,
        best_scores,
        baseline,
        cfg,
        name,
        history,
        step,
        clock.t0,
        dev,
        stopped,
        improved,
        summary,
        write=save,
        classes=class_names,
        levels=levels,
        calibration=_calibration(ds.items),
    )
    release_memory(dev)
    return result


def _holding_cores(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Fine-tuning on the CPU holds its cores while it computes (:func:`~napari_unetpp.runtimes.backends.hold_cores`):
    no
    runtime is measured meanwhile on another thread (a prediction beside it), nor saved, since a measurement then
    times the contention."""
    return hold_cores() if dev.type == "cpu" else contextlib.nullcontext()


def _mean(scores: dict[int, float], levels: Sequence[int]) -> float:
    return float(np.mean([scores[k] for k in levels]))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _batch_maker(
    ds: TrainingSet, rng: np.random.Generator, cfg: FineTuneConfig, mirror: bool, dev: torch.device
) -> Prefetcher:
    """What makes each training batch (sampled and augmented on the CPU): in line on the CPU; on CUDA in a
    :class:`~.augment.Prefetcher` thread with its own generator, so the GPU does not wait for the CPU between steps."""

    def make(gen: np.random.Generator) -> Callable[[int, tuple[int, ...]], tuple]:
        def one(batch: int, patch: tuple[int, ...]) -> tuple:
            picked = sample_batch(ds, gen, batch, patch, cfg.focus_fraction, cfg.foreground_fraction)
            return augment_batch(*picked, gen, mirror)

        return one

    if dev.type == "cuda":
        return Prefetcher(make(np.random.default_rng(rng.integers(2**63))))
    return Prefetcher(make(rng), threaded=False)


def _statistics_batches(
    ds: TrainingSet, rng: np.random.Generator, batch: int, patch: Sequence[int], dev: torch.device, fmt: Any
) -> Iterator[torch.Tensor]:
    """Un-augmented patches of the user's images (labels unused) for re-estimating batch-norm statistics: enough
    to see every training pixel about once, 4-16 batches."""
    n = int(np.clip(math.ceil(ds.n_train / (batch * float(np.prod(patch)))), 4, 16))
    for _ in range(n):
        xb, _, _ = sample_batch(ds, rng, batch, patch, 0.0, 0.0)
        yield torch.from_numpy(xb).to(dev).contiguous(memory_format=fmt)


def fine_tune(
    model: Any,
    data: TrainingPair | Sequence[TrainingPair],
    *,
    on_progress: Callable[[TrainProgress], None] | None = None,
    **kwargs: Any,
) -> FineTuneResult:
    """Run :func:`fine_tune_iter` to the end (same arguments) and return its result; ``on_progress`` gets each
    :class:`TrainProgress`."""
    return run_to_end(fine_tune_iter(model, data, **kwargs), on_progress)


def _calibration(items: list[Any]) -> Any:
    """Calibration tiles for int8 inference from the training images (normalised as the model reads them)."""
    from napari_unetpp.runtimes.int8 import calibration_tiles

    try:
        return calibration_tiles([it.image for it in items], 192 if items[0].image.ndim == 3 else 48)
    except (ValueError, IndexError):
        return None
