"""What a live session starts from and hands out: the start rule (base or fresh), the fresh network, the snapshots'
cards and the saved version (:func:`save_live`). Used by :mod:`.live`."""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import numpy as np
import torch

from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.modalities import new_model
from napari_unetpp.training.engine import Trainer
from napari_unetpp.training.saving import FineTuneResult, save_result
from napari_unetpp.training.validation import validate

__all__ = [
    "FITS",
    "LIVE_DEFAULTS",
    "LIVE_HALF_LIFE_S",
    "LIVE_RECIPE",
    "card_start",
    "fresh_for",
    "save_live",
    "scored_on_all",
    "snapshot_card",
    "start_from",
    "validation_key",
    "without_pixel_size",
]

FITS = 0.5  # the base's best-level Dice on the first strokes from which live training adapts it (else: fresh)
LIVE_DEFAULTS = {"patch_size": 128, "batch_size": 4, "patience": 0, "min_delta": 0.0, "val_fraction": 0.2}
LIVE_HALF_LIFE_S: float | None = None  # the learning rate's half-life in a live session (None: constant)
LIVE_RECIPE = (
    "napari_unetpp live ({name}): patches centred on the latest strokes half of the time and on every stroke "
    "otherwise, flips, rot90, intensity jitter, mild affine; AdamW, warm-up then {rate}; deep "
    "supervision with BCE/CE + soft Dice on painted pixels only"
)


def start_from(base_scores: dict[int, float]) -> tuple[str, str]:
    """("base" or "fresh", why) from the base's per-level Dice on the strokes it never saw."""
    best = max(base_scores.values(), default=0.0)
    if best >= FITS:
        return "base", f"the base scores {best:.2f} Dice on your first strokes (>= {FITS}): adapted"
    return "fresh", f"the base scores {best:.2f} Dice on your first strokes (< {FITS}): a fresh network instead"


def save_live(
    tr: Trainer,
    snap: LoadedModel,
    start: dict[str, Any],
    kept: str,
    kept_step: int,
    seconds: float,
    shape: tuple[int, ...],
    spacing: dict[str, float] | None,
    calibration: Any,
    name: str | None,
) -> FineTuneResult:
    """Save the snapshot ``snap`` a live session kept as a new model version: the card records the strokes, the live
    recipe, the held-out scores, the image's pixel size (or none, as the snapshots), and ``live`` (steps, the step
    kept, where it started and why)."""
    state = {k: v.clone() for k, v in snap.module.state_dict().items()}
    live = {"steps": tr.steps, "kept_step": kept_step, "kept": kept, "start": card_start(start)}
    pair = {
        "name": "live scribbles",
        "shape": list(shape),
        "known_pixels": tr.summary.get("train_pixels"),
    }
    if spacing:
        pair["spacing"] = dict(spacing)
    summary = {**tr.summary, "pairs": [pair], "live": {**live, "seconds": round(seconds, 1)}}
    half_life = getattr(tr.schedule, "half_life_s", None)
    rate = (
        f"a learning rate halving every {half_life:g} s (to a tenth at the least)"
        if half_life
        else "a constant learning rate"
    )
    summary["recipe_text"] = LIVE_RECIPE.format(name=tr.recipe.name, rate=rate)
    baseline = dict(start.get("base_scores", {})) if start.get("from") == "base" else {}
    return save_result(
        without_pixel_size(tr.base),
        state,
        dict(tr.best.scores),
        baseline,
        tr.cfg,
        name,
        tr.history,
        tr.steps,
        time.perf_counter() - seconds,
        tr.device,
        "live",
        bool(tr.best.scores),
        summary,
        levels=tr.setup.levels,
        calibration=calibration,
    )


def fresh_for(base: LoadedModel | None, modality: str, base_normalisation: bool) -> LoadedModel:
    """A fresh network for the data: the base's channels and classes and (``base_normalisation``) its intensity
    recipe, else the modality's."""
    if base is None:
        return new_model(modality, name=f"{modality}-live")
    cfg = base.module.config
    names = list(base.card.classes)
    classes = names[-(cfg.num_classes - 1) :] if cfg.num_classes > 1 else names[:1]
    modality = base.card.training.get("modality", modality) if base_normalisation else modality
    fresh = new_model(
        modality if modality in ("fluorescence", "brightfield", "em", "ct") else "fluorescence",
        classes=classes,
        in_channels=cfg.in_channels,
        spatial_dims=cfg.spatial_dims,
        name=f"{base.card.name}-live",
    )
    if base_normalisation:
        fresh.card.normalization = dict(base.card.normalization)
    return fresh


def scored_on_all(base: LoadedModel, ds: Any, device: torch.device) -> dict[int, float]:
    """The base's per-level Dice on every known pixel (training and held-out): it never saw any of them."""
    items = [copy.copy(it) for it in ds.items]
    for it in items:
        it.val = it.train | it.val
    probe = type(ds)(items, ds.spatial_dims, ds.summary)
    net = base.module if device.type == "cpu" else copy.deepcopy(base.module).to(device)  # the base stays put
    return validate(net, probe, device, None, tile=base.card.tile)


def validation_key(ds: Any) -> str:
    """Which pixels are held out (a digest of every item's validation mask): equal for the same validation."""
    h = hashlib.blake2b(digest_size=12)
    for it in ds.items:
        h.update(it.source.encode())
        h.update(np.packbits(it.val).tobytes())
    return h.hexdigest()


def snapshot_card(base: LoadedModel, spacing: dict[str, float] | None, steps: int, start: dict) -> ModelCard:
    """The base's card for a snapshot: its normalisation and classes, the image's own pixel size (or none)."""
    card = without_pixel_size(base).card
    card.training.update(live={"steps": steps, **card_start(start)})
    if spacing:
        card.training["spacing"] = dict(spacing)
    card.name, card.parent = f"{base.card.name}-live", base.card.id
    card.weights_sha256 = ""  # not the base's weights: the fingerprint hashes the snapshot's own
    return card


def without_pixel_size(base: LoadedModel) -> LoadedModel:
    """The base with a card copy that records no pixel size: live training works at the image's own."""
    card = copy.deepcopy(base.card)
    card.training = {k: v for k, v in card.training.items() if k not in ("spacing", "spacing_unit", "object_diameter")}
    return LoadedModel(base.module, card, base.path, base.shipped)


def card_start(start: dict[str, Any]) -> dict[str, Any]:
    """The start decision for a card: the base's scores as ``L<k>`` keys."""
    out = {k: v for k, v in start.items() if k != "base_scores"}
    if "base_scores" in start:
        out["base_scores"] = {f"L{k}": round(float(v), 4) for k, v in start["base_scores"].items()}
    return out
