"""Shared by the training scripts: the learning-rate schedule, the checkpoint folder (best state, best entry,
history), and packaging: the recommended depth, the card's run record, and an fp16 save that proves the stored file
keeps its scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import load_model, save_model
from napari_unetpp.training import learning_rate as _schedule
from napari_unetpp.training.metrics import recommend_depth

log = logging.getLogger("shipping")


def save_fp16_checked(
    model: Any,
    card: ModelCard,
    dest: Path,
    evaluate: Callable[[Any], dict[str, dict]],
    metric: str,
    tolerance: float = 0.002,
) -> Path:
    """Save ``model`` with ``card`` into ``dest`` as fp16, re-load it, re-run ``evaluate`` and stop when ``metric``
    moved by more than ``tolerance`` at any level (then fp32 storage is needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = save_model(model, card, directory=dest, storage_dtype="float16")
    again = evaluate(load_model(path))
    worst = max(abs(again[k][metric] - card.scores[k][metric]) for k in again)
    log.info(
        "saved %s; per-level %s %s; recommended L%d; fp16 round trip changes it by <= %.4f",
        path,
        metric,
        {k: v[metric] for k, v in card.scores.items()},
        card.recommended_depth,
        worst,
    )
    if worst > tolerance:
        raise SystemExit(f"fp16 storage changed the scores by {worst:.4f}; save as float32 instead.")
    return path


def learning_rate(peak: float, frac: float, step: int) -> float:
    """Fine-tuning's schedule (:func:`napari_unetpp.training.learning_rate`) with the shipped models' constants:
    cosine decay from ``peak`` to 2 % of it over the budget fraction ``frac``, after a 50-step linear warm-up."""
    return _schedule(step, frac, peak, warmup_steps=50, floor=0.02)


def write_checkpoint(out: Path, model: torch.nn.Module, entry: dict, run: dict, improved: bool) -> None:
    """Update a checkpoint folder after a validation: when ``improved``, the state (``best.safetensors``) and its
    validation ``entry`` (``best.json``); always ``history.json`` (``run``: args, device, config, history...)."""
    from safetensors.torch import save_file

    if improved:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "best.safetensors")
        )
        (out / "best.json").write_text(json.dumps(entry, indent=1))
    (out / "history.json").write_text(json.dumps(run, indent=1))


def load_best(ckpt: Path) -> tuple[UNetPlusPlus, dict, dict]:
    """The best UNet++ state of a checkpoint folder, with the run's history and the best validation entry."""
    from safetensors.torch import load_file

    hist = json.loads((ckpt / "history.json").read_text())
    best = json.loads((ckpt / "best.json").read_text())
    model = UNetPlusPlus.from_config(hist["config"])
    model.load_state_dict(load_file(str(ckpt / "best.safetensors")))
    return model, hist, best


def recommended(scores: dict[str, dict[str, float]], metric: str, margin: float) -> int:
    """:func:`napari_unetpp.training.metrics.recommend_depth` over a card's ``{"L1": {metric: ...}, ...}`` scores."""
    return recommend_depth({int(k[1:]): s[metric] for k, s in scores.items()}, margin)


def run_record(hist: dict, best: dict, script: str) -> dict[str, Any]:
    """The card's training fields every shipped model shares: hyperparameters, steps and seconds to the best
    state, device and script."""
    args = hist["args"]
    return {
        "hyperparameters": {k: args[k] for k in ("batch", "patch", "lr", "minutes", "steps", "seed") if k in args},
        "steps": best["step"],
        "seconds": best["seconds"],
        "device": hist.get("device", "cpu"),
        "script": script,
    }
