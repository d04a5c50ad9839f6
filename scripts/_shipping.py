"""Shared by the training scripts: save a shipped model in fp16 and prove the stored file keeps its scores."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from napari_unetpp.models import ModelCard, load_model, save_model

log = logging.getLogger("shipping")


def save_fp16_checked(model: Any, card: ModelCard, dest: Path, evaluate: Callable[[Any], dict[str, dict]],
                      metric: str, tolerance: float = 0.002) -> Path:
    """Save ``model`` with ``card`` into ``dest`` as fp16, re-load it, re-run ``evaluate`` and stop when ``metric``
    moved by more than ``tolerance`` at any level (then fp32 storage is needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = save_model(model, card, directory=dest, storage_dtype="float16")
    again = evaluate(load_model(path))
    worst = max(abs(again[k][metric] - card.scores[k][metric]) for k in again)
    log.info("saved %s; per-level %s %s; recommended L%d; fp16 round trip changes it by <= %.4f", path, metric,
             {k: v[metric] for k, v in card.scores.items()}, card.recommended_depth, worst)
    if worst > tolerance:
        raise SystemExit(f"fp16 storage changed the scores by {worst:.4f}; save as float32 instead.")
    return path
