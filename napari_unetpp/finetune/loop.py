"""The fine-tuning loop: a generator that yields progress and returns the saved model version.

    for progress in fine_tune_iter("em-membranes", TrainingPair(image, labels, slices=[3, 7]), minutes=2): ...
    result = fine_tune(...)             # the same, run to the end

Patches centred on known training pixels (see :mod:`.augment`); AdamW with warm-up and cosine decay at a small
learning rate (:func:`learning_rate`); batch norms frozen (their running statistics stay those of the base model);
deep supervision with the hybrid loss over every head up to the trained depth. Mixed precision on CUDA, bf16 on CPUs
that support it. The base model's validation score is measured first and counts as a candidate, so the saved version
is never worse on validation than its parent. Stopping (the ``stop`` event, or closing the generator) saves the best
state seen so far. Where the depth flows: ``train_depth=k`` trains the sub-network of depth k (heads 1..k, nodes
i + j <= k); validation scores every level, and the recommended depth is the shallowest within
:data:`~napari_unetpp.metrics.RECOMMEND_MARGIN` of the best.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..jobs import run_to_end
from ..losses import DeepSupervisionLoss
from ..metrics import RECOMMEND_MARGIN, format_scores, recommend_depth
from ..network import UNetPlusPlus
from ..registry import LoadedModel, ModelCard, resolve_model, save_model
from ..runtime import autocast_dtype, describe_device, is_oom, release_memory, resolve_device
from .augment import augment_batch, random_affine, sample_batch
from .data import TrainingDataError, TrainingPair, pad_item, prepare_data
from .steps import batch_and_patch, freeze_batchnorms, learning_rate, shrink_after_oom, train_step, trained_batchnorms
from .validation import validate

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
        learning_rate: AdamW peak learning rate (default 3e-4: small, so the base model is adapted, not wrecked).
        weight_decay: AdamW weight decay (default 1e-4).
        warmup_steps: Linear warm-up steps (default 5).
        batch_size: Patches per step (default: 4 on CPU; on CUDA sized from free memory).
        patch_size: Patch edge in pixels (default 256 in 2D, 96 in 3D (32 along Z on CPU), capped by the image).
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
        freeze_batchnorm: Keep batch-norm running statistics fixed (default True).
        ignore_label: Label value meaning "unknown" (default None).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (default auto).
        seed: Random seed (default 0).
    """

    minutes: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    batch_size: int | None = None
    patch_size: int | None = None
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
    freeze_batchnorm: bool = True
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
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")


@dataclass
class TrainProgress:
    """What a fine-tuning run is doing.

    Attributes:
        phase: ``"prepared"``, ``"baseline"``, ``"train"``, ``"validate"``, ``"retry"`` (out of memory, smaller
            batch), ``"saving"``.
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


@dataclass
class FineTuneResult:
    """The outcome of :func:`fine_tune`.

    Attributes:
        model: The fine-tuned model (best validation state), with its card.
        path: Card path of the saved version (None with ``save=False``).
        scores: Per-level validation Dice of the saved state.
        baseline: Per-level validation Dice of the base model on the same pixels.
        recommended_depth: Shallowest level within ``margin`` of the best.
        history: One dict per validation (step, seconds, loss, per-level Dice).
        steps: Optimiser steps done.
        seconds: Wall-clock time.
        stopped: ``"budget"``, ``"early stopping"`` or ``"stopped by user"``.
        improved: Whether any trained state beat the base model on validation.
        device: Where it ran.
        data: Summary of the training data (for the card).
    """

    model: LoadedModel
    path: Path | None
    scores: dict[int, float]
    baseline: dict[int, float]
    recommended_depth: int
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    stopped: str
    improved: bool
    device: str
    data: dict[str, Any] = field(default_factory=dict)


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
        model: Base model (name, ``name@vN``, path, :class:`LoadedModel` or ``UNetPlusPlus``); never modified.
        data: One or more :class:`TrainingPair`.
        config: Hyperparameters; keywords in ``options`` override its fields (e.g. ``minutes=2``).
        device: ``"auto"`` (CUDA, MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        name: Name to save under (default: the base's name for user models, ``<base>-finetuned`` for shipped ones).
        save: Save the best state as a new model version (never overwrites anything).
        stop: An event (or callable) that ends training at the next step; the best state so far is kept and saved.
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
    if cfg.minutes is None and cfg.epochs is None:
        cfg.minutes = 2.0
    base = resolve_model(model)
    class_names = _check_class_names(classes, base)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    should_stop = stop.is_set if isinstance(stop, threading.Event) else (stop or (lambda: False))
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds = prepare_data(data, base, ignore_label=cfg.ignore_label, val_fraction=cfg.val_fraction)
    module: UNetPlusPlus = copy.deepcopy(base.module).float().to(dev)
    max_depth = module.max_depth
    depth = module.check_depth(cfg.train_depth)
    batch, patch = batch_and_patch(ds, module, dev, cfg.patch_size, cfg.batch_size)
    for it in ds.items:
        pad_item(it, patch)
    amp = autocast_dtype(dev, cfg.precision) if dev.type != "mps" else None
    fmt = torch.channels_last if (ds.spatial_dims == 2 and dev.type in ("cpu", "cuda")) else torch.contiguous_format
    module = module.to(memory_format=fmt)  # type: ignore[call-overload]
    params = [p for _, m in module.modules_for_depth(depth) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and amp == torch.float16)
    loss_fn = DeepSupervisionLoss(cfg.deep_supervision_weights, cfg.ce_weight, cfg.dice_weight)
    spe = cfg.steps_per_epoch or max(10, math.ceil(ds.n_train / (batch * float(np.prod(patch)))))
    budget_s = None if cfg.minutes is None else cfg.minutes * 60.0
    budget_steps = None if cfg.epochs is None else cfg.epochs * spe

    def fraction(step: int) -> float:
        fr = []
        if budget_s is not None:
            fr.append((time.perf_counter() - t0) / budget_s)
        if budget_steps is not None:
            fr.append(step / budget_steps)
        return float(min(1.0, max(fr)))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    summary = {**ds.summary, "patch": list(patch), "batch": batch, "steps_per_epoch": spe}
    yield TrainProgress(
        "prepared",
        seconds=time.perf_counter() - t0,
        message=f"{ds.n_train} training and {ds.n_val} validation pixels in {len(ds.items)} "
        f"slice(s); patches {'x'.join(map(str, patch))}, batch {batch}, on "
        f"{describe_device(dev)}",
    )
    baseline = validate(module, ds, dev, amp)
    best_state, best_scores = snapshot(), baseline
    best = float(np.mean(list(baseline.values())))
    history: list[dict[str, Any]] = [
        {"step": 0, "seconds": round(time.perf_counter() - t0, 2), "loss": None, "val": baseline}
    ]
    yield TrainProgress(
        "baseline",
        seconds=time.perf_counter() - t0,
        val=baseline,
        best=best,
        message="base model: " + format_scores(baseline),
    )
    step, epoch, since_best, stopped, improved, losses = 0, 0, 0, "budget", False, []
    frozen = trained_batchnorms(module) if cfg.freeze_batchnorm else []  # decided once, before any step
    module.train()
    freeze_batchnorms(frozen)
    try:
        while True:
            if should_stop():
                stopped = "stopped by user"
                break
            if fraction(step) >= 1.0:
                break
            lr = learning_rate(step, fraction(step), cfg.learning_rate, cfg.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            xb, yb, vb = augment_batch(
                *sample_batch(ds, rng, batch, patch, cfg.focus_fraction, cfg.foreground_fraction), rng
            )
            x = torch.from_numpy(xb).to(dev).contiguous(memory_format=fmt)
            y, v = torch.from_numpy(yb).to(dev), torch.from_numpy(vb).to(dev)
            x, y, v = random_affine(x, y, v, rng, cfg.affine_probability)
            try:
                loss = train_step(module, optimizer, loss_fn, x, y, v, depth, amp, scaler)
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    raise
                del x, y, v
                release_memory(dev)
                batch, patch = shrink_after_oom(batch, patch, 2**max_depth)
                yield TrainProgress(
                    "retry",
                    step,
                    epoch,
                    time.perf_counter() - t0,
                    fraction(step),
                    message=f"out of memory: retrying with batch {batch}, patches {'x'.join(map(str, patch))}",
                )
                continue
            step += 1
            losses.append(loss)
            yield TrainProgress(
                "train",
                step,
                epoch,
                time.perf_counter() - t0,
                fraction(step),
                loss=loss,
                best=best,
                message=f"step {step}: loss {loss:.4f}",
            )
            if step % spe == 0 or fraction(step) >= 1.0 or should_stop():
                epoch += 1
                scores = validate(module, ds, dev, amp)
                freeze_batchnorms(frozen)
                mean = float(np.mean(list(scores.values())))
                history.append(
                    {
                        "step": step,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "loss": round(float(np.mean(losses[-spe:])), 4),
                        "val": scores,
                    }
                )
                if mean > best + cfg.min_delta or (mean > best and not improved):
                    best, best_scores, best_state, since_best, improved = mean, scores, snapshot(), 0, True
                else:
                    since_best += 1
                yield TrainProgress(
                    "validate",
                    step,
                    epoch,
                    time.perf_counter() - t0,
                    fraction(step),
                    loss=history[-1]["loss"],
                    val=scores,
                    best=best,
                    message=f"validation after {step} steps: {format_scores(scores)}",
                )
                if cfg.patience and since_best >= cfg.patience:
                    stopped = "early stopping"
                    break
    except GeneratorExit:  # the caller closed the generator: keep the best state, as with ``stop``
        if save and step:
            _save(
                base,
                best_state,
                best_scores,
                baseline,
                cfg,
                name,
                history,
                step,
                t0,
                dev,
                "stopped by user",
                improved,
                summary,
                classes=class_names,
            )
        raise
    finally:
        del optimizer
        module.to("cpu")
        release_memory(dev)
    yield TrainProgress(
        "saving",
        step,
        epoch,
        time.perf_counter() - t0,
        1.0,
        best=best,
        message=f"{stopped} after {step} steps; saving" if save else f"{stopped} after {step} steps",
    )
    result = _save(
        base,
        best_state,
        best_scores,
        baseline,
        cfg,
        name,
        history,
        step,
        t0,
        dev,
        stopped,
        improved,
        summary,
        write=save,
        classes=class_names,
    )
    release_memory(dev)
    return result


def _check_class_names(classes: Sequence[str] | str | None, base: LoadedModel) -> list[str] | None:
    """Class names for the fine-tuned card, checked against the model: one name for a 1-class model, one per
    foreground class (or per class, background first) otherwise."""
    if classes is None:
        return None
    names = [c.strip() for c in ([classes] if isinstance(classes, str) else classes)]
    n = base.module.config.num_classes
    allowed = (1,) if n == 1 else (n - 1, n)
    if any(not c for c in names) or len(names) not in allowed:
        want = "one class name" if n == 1 else f"{n - 1} foreground class names (or {n} with background first)"
        raise TrainingDataError(f"this model needs {want}, got {len(names)}: {', '.join(names) or 'none'}.")
    return names


def default_name(base: LoadedModel | Any) -> str:
    """Shipped models are fine-tuned into ``<name>-finetuned``; user models continue their own versions (``base``: a
    :class:`LoadedModel` or a ``list_models`` row)."""
    return f"{base.card.name}-finetuned" if base.shipped else base.card.name


def _save(
    base: LoadedModel,
    state: dict[str, torch.Tensor],
    scores: dict[int, float],
    baseline: dict[int, float],
    cfg: FineTuneConfig,
    name: str | None,
    history: list,
    steps: int,
    t0: float,
    dev: torch.device,
    stopped: str,
    improved: bool,
    summary: dict[str, Any],
    write: bool = True,
    classes: list[str] | None = None,
) -> FineTuneResult:
    net = copy.deepcopy(base.module).cpu()
    net.load_state_dict(state)
    net.eval()
    rec = recommend_depth(scores, cfg.margin)
    seconds = time.perf_counter() - t0
    card = ModelCard(
        name=name or default_name(base),
        architecture=net.config.to_dict(),
        normalization=dict(base.card.normalization),
        classes=classes or list(base.card.classes),
        description=(base.card.description or base.card.name)
        + " (fine-tuned on corrections)"
        + (f"; classes renamed from {', '.join(base.card.classes)}" if classes else ""),
        training={
            "data": f"fine-tuned from {base.card.id} on {summary.get('train_pixels', 0)} corrected pixels in "
            f"{summary.get('n_items', 0)} slice(s) of " + ", ".join(p["name"] for p in summary.get("pairs", [])),
            "data_summary": summary,
            "validation": f"{summary.get('val_pixels', 0)} held-out corrected pixels (hashed blocks, stable "
            f"across rounds)",
            "recipe": "napari_unetpp.training.fine_tune: patches favouring corrected pixels, flips, rot90, "
            "intensity jitter, mild affine; AdamW + cosine; frozen batch-norm statistics; deep "
            "supervision with BCE/CE + soft Dice on known pixels only",
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if v is not None},
            "baseline_scores": {f"L{k}": {"dice": v} for k, v in baseline.items()},
            "history": history[-50:],
            "steps": steps,
            "seconds": round(seconds, 1),
            "stopped": stopped,
            "improved": improved,
            "device": describe_device(dev),
            "citations": base.card.training.get("citations", []),
            "licence": base.card.training.get("licence", ""),
        },
        scores={f"L{k}": {"dice": v} for k, v in scores.items()},
        recommended_depth=rec,
        parent=base.card.id,
        tile=base.card.tile,
    )
    path = save_model(net, card) if write else None
    lm = LoadedModel(net, card, None if path is None else path.with_suffix(".safetensors"), False)
    if path is not None:
        log.info("fine-tuned %s -> %s (%s; recommended L%d)", base.card.id, card.id, format_scores(scores), rec)
    return FineTuneResult(
        lm, path, scores, baseline, rec, history, steps, seconds, stopped, improved, describe_device(dev), summary
    )


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
