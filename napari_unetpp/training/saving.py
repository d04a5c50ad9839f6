"""Saving a fine-tuned state as a new model version: its card (parent, data, recipe and why, scores, history) and
the :class:`FineTuneResult` the loop returns."""

from __future__ import annotations

import copy
import errno
import logging
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.registry import save_model
from napari_unetpp.paths import user_models_dir
from napari_unetpp.runtimes import describe_device
from napari_unetpp.training.data import TrainingDataError
from napari_unetpp.training.metrics import format_scores, recommend_depth

__all__ = ["FineTuneResult", "check_class_names", "default_name", "save_result"]

log = logging.getLogger(__name__)


@dataclass
class FineTuneResult:
    """The outcome of :func:`fine_tune`.

    Attributes:
        model: The fine-tuned model (best validation state), with its card; kept also when saving failed.
        path: Card path of the saved version (None with ``save=False``, or when saving failed: see ``save_error``).
        scores: Per-level validation Dice of the saved state.
        baseline: Per-level validation Dice of the base model on the same pixels.
        recommended_depth: Shallowest level within ``margin`` of the best.
        history: One dict per validation (step, seconds, loss, per-level Dice).
        steps: Optimiser steps done.
        seconds: Wall-clock time.
        stopped: ``"budget"``, ``"early stopping"``, ``"stopped by user"`` or ``"live"`` (a live session).
        improved: Whether any trained state beat the base model on validation.
        ran_on: Where it ran, in words (e.g. ``"CPU (2 threads)"``); ``device`` is a deprecated alias.
        data: Summary of the training data (for the card).
        save_error: Why the model could not be saved, and where (one sentence), else None. The trained model is
            in ``model`` all the same: :meth:`save` it elsewhere.
        calibration: The int8 calibration tiles saved with the model (None when there are none).
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
    ran_on: str
    data: dict[str, Any] = field(default_factory=dict)
    save_error: str | None = None
    calibration: Any = field(default=None, repr=False)

    @property
    def device(self) -> str:
        """Deprecated alias of :attr:`ran_on` (it always held a sentence, not a device)."""
        warnings.warn("FineTuneResult.device is deprecated; read FineTuneResult.ran_on instead.", DeprecationWarning, 2)
        return self.ran_on

    @property
    def saved(self) -> bool:
        """Whether the model was saved (``path`` is where)."""
        return self.path is not None

    def save(self, directory: str | Path | None = None) -> Path:
        """Save the model now, e.g. elsewhere after ``save_error``; saving again makes another copy.

        Args:
            directory: Folder to save ``<name>.safetensors`` and ``<name>.json`` in (load it with its card path);
                default: the next version in the user models folder.

        Returns:
            The card's path (also in ``path``).

        Raises:
            OSError: the folder cannot be written (the model stays in ``model``; ``filename`` says where,
                ``strerror`` why), or the files exist there.
        """
        try:
            path = save_model(self.model.module, self.model.card, directory, calibration=self.calibration)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk in its own error type
            folder = Path(directory) if directory is not None else user_models_dir() / self.model.card.name
            raise _save_failure(exc, folder) from exc
        self.path, self.save_error = path, None
        self.model = LoadedModel(self.model.module, self.model.card, path.with_suffix(".safetensors"), False)
        self.model.calibration = self.calibration
        return path


def _save_failure(exc: BaseException, folder: Path) -> OSError:
    """The failed save as an ``OSError`` naming where (``folder`` when the error names no file, or only a file in
    the save's temporary folder, which is gone) and why. ``safetensors`` reports a full disk as a
    ``SafetensorError`` whose text holds the OS error."""
    named = getattr(exc, "filename", None)
    where = folder if not named or ".saving-" in str(named) else named
    why = getattr(exc, "strerror", None)
    code = getattr(exc, "errno", None)
    if not why:
        text = str(exc).strip()
        found = re.search(r"I/O error: (.+?) \(os error (\d+)\)", text)
        why = found.group(1) if found else (text.splitlines()[0] if text else type(exc).__name__)
        code = int(found.group(2)) if found else errno.EIO
    return OSError(code or errno.EIO, str(why), str(where))


def check_class_names(classes: Sequence[str] | str | None, base: LoadedModel) -> list[str] | None:
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


def _spacing(summary: dict[str, Any], base: LoadedModel) -> dict[str, Any]:
    """The training data's pixel size and its unit (the first pair that records one), else the base's; the base's
    object diameter stays (the scale the network works at does not move in a fine-tuning). A pixel size without a
    unit never replaces a base's that has one: its numbers would be read in the base's unit (a layer scaled in nm
    but with no unit, recorded as ``4`` for a base in um, would zoom every later image x1000)."""
    keep = {k: base.card.training[k] for k in ("object_diameter",) if k in base.card.training}
    base_unit = base.card.training.get("spacing_unit") if base.card.training.get("spacing") else None
    for pair in summary.get("pairs", []):
        if pair.get("spacing") and (pair.get("spacing_unit") or not base_unit):
            unit = {"spacing_unit": pair["spacing_unit"]} if pair.get("spacing_unit") else {}
            return {"spacing": pair["spacing"], **unit, **keep}
    inherited: dict[str, Any] = {
        k: base.card.training[k] for k in ("spacing", "spacing_unit") if k in base.card.training
    }
    return {**inherited, **keep}


def save_result(
    base: LoadedModel,
    state: dict[str, torch.Tensor],
    scores: dict[int, float],
    baseline: dict[int, float],
    cfg: Any,
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
    levels: Sequence[int] | None = None,
    calibration: Any = None,
) -> FineTuneResult:
    """Build the best state's card (parent, data, recipe and why, scores, recommended depth on the trained
    ``levels``), save it as a new version unless ``write`` is False, and return the :class:`FineTuneResult`.
    ``calibration``: tiles of the training images for int8 inference, saved with the model."""
    untrained = bool(base.card.training.get("untrained"))  # a new_model: trained from scratch, no parent
    net = copy.deepcopy(base.module).cpu()
    net.load_state_dict(state)
    net.eval()
    trained = {k: v for k, v in scores.items() if levels is None or k in levels}
    rec = recommend_depth(trained, cfg.margin) if trained else max(levels or [net.config.max_depth])  # unscored
    seconds = time.perf_counter() - t0
    card = ModelCard(
        name=name or default_name(base),
        architecture=net.config.to_dict(),
        normalization=dict(base.card.normalization),
        classes=classes or list(base.card.classes),
        description=(base.card.description or base.card.name)
        + ("" if untrained else " (fine-tuned on corrections)")
        + (f"; classes renamed from {', '.join(base.card.classes)}" if classes else ""),
        training={
            "data": ("trained from scratch" if untrained else f"fine-tuned from {base.card.id}")
            + f" on {summary.get('train_pixels', 0)} corrected pixels in "
            f"{summary.get('n_items', 0)} slice(s) of " + ", ".join(p["name"] for p in summary.get("pairs", [])),
            "data_summary": summary,
            "validation": f"{summary.get('val_pixels', 0)} held-out corrected pixels (hashed blocks, stable "
            f"across rounds)",
            "recipe": summary.get("recipe_text")
            or f"napari_unetpp.finetune ({summary.get('recipe', {}).get('name', 'gentle')}): patches favouring "
            "corrected pixels, flips, rot90, intensity jitter, mild affine; AdamW + warm-up + cosine; deep "
            "supervision with BCE/CE + soft Dice on known pixels only",
            "decision": {
                **(base.card.training.get("decision", {}) if untrained else {}),
                **summary.get("recipe", {}),
            },
            **({"modality": base.card.training["modality"]} if "modality" in base.card.training else {}),
            **_spacing(summary, base),
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
        parent=None if untrained else base.card.id,
        tile=base.card.tile,
    )
    path, error = None, None
    if write:
        try:
            path = save_model(net, card, calibration=calibration)
        except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder: the model stays in the result
            failure = _save_failure(exc, user_models_dir() / card.name)
            error = (
                f"could not save the model in {failure.filename} ({failure.strerror}); it is kept in memory: save "
                f"it elsewhere with result.save('FOLDER'), or free space and call result.save()."
            )
            log.warning("%s", error)
    lm = LoadedModel(net, card, None if path is None else path.with_suffix(".safetensors"), False)
    lm.calibration = calibration  # in memory too: int8 runs even when saving failed
    if path is not None:
        log.info("fine-tuned %s -> %s (%s; recommended L%d)", base.card.id, card.id, format_scores(scores), rec)
    return FineTuneResult(
        lm,
        path,
        scores,
        baseline,
        rec,
        history,
        steps,
        seconds,
        stopped,
        improved,
        describe_device(dev),
        summary,
        save_error=error,
        calibration=calibration,
    )
