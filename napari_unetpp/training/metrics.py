"""Scores: Dice, the recommended depth, and how a card's per-level scores are read.

One copy of each, used by fine-tuning, the CLI, the widgets, the training scripts and the benchmarks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "RECOMMEND_MARGIN",
    "SCORE_KEYS",
    "dice_from_counts",
    "dice_score",
    "format_scores",
    "headline_score",
    "level_object_scores",
    "match_objects",
    "object_f1",
    "recommend_depth",
]

#: The recommended depth is the shallowest level within this much of the best level's score (fine-tuning, the
#: training scripts and the cards all use it).
RECOMMEND_MARGIN = 0.01

#: The score a card's level is summarised by, in order of preference.
SCORE_KEYS = ("dice", "mean_iou", "iou")


def dice_from_counts(intersection: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Dice ``2|P & T| / (|P| + |T|)`` from counts (element-wise); 1.0 where both are empty."""
    intersection, sums = np.asarray(intersection, float), np.asarray(sums, float)
    return np.where(sums > 0, 2 * intersection / np.maximum(sums, 1), 1.0)


def dice_score(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, num_classes: int = 1) -> float:
    """Dice of foreground (1-class) or mean Dice over classes 1..C-1, on ``mask`` pixels; 1.0 when both are empty."""
    if mask is not None:
        pred, target = pred[mask], target[mask]
    classes = [1] if num_classes == 1 else range(1, num_classes)
    inter, sums = [], []
    for c in classes:
        p, t = (pred > 0, target > 0) if num_classes == 1 else (pred == c, target == c)
        inter.append(int((p & t).sum()))
        sums.append(int(p.sum()) + int(t.sum()))
    return float(np.mean(dice_from_counts(np.array(inter), np.array(sums))))


def match_objects(pred: np.ndarray, target: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """One-to-one matching of predicted and true objects (label images, 0 = background) at IoU >= ``iou``: the
    assignment that maximises the summed IoU of matched pairs (as StarDist's ``matching``). Returns
    ``(true positives, false positives, false negatives)``."""
    from scipy.optimize import linear_sum_assignment

    p, t = np.asarray(pred).ravel(), np.asarray(target).ravel()
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    n_p, n_t = int((p_ids > 0).sum()), int((t_ids > 0).sum())
    if n_p == 0 or n_t == 0:
        return 0, n_p, n_t
    both = np.zeros((len(p_ids), len(t_ids)), np.int64)
    np.add.at(both, (p_inv, t_inv), 1)
    pa, ta = both.sum(1), both.sum(0)
    inter = both[p_ids > 0][:, t_ids > 0].astype(float)
    union = pa[p_ids > 0][:, None] + ta[t_ids > 0][None] - inter
    ious = inter / np.maximum(union, 1)
    ok = ious >= iou
    if not ok.any():
        return 0, n_p, n_t
    rows, cols = linear_sum_assignment(-np.where(ok, ious, 0.0))
    tp = int(ok[rows, cols].sum())
    return tp, n_p - tp, n_t - tp


def object_f1(pred: np.ndarray, target: np.ndarray, iou: float = 0.5, spatial_dims: int = 2) -> dict[str, float]:
    """Object precision, recall and F1 at IoU >= ``iou`` (one-to-one, :func:`match_objects`), matched per plane for
    ``spatial_dims=2`` (the last two axes) and summed over planes."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape.")
    from napari_unetpp.inference.postprocess import plane_indices

    tp = fp = fn = 0
    for idx in plane_indices(pred.shape, spatial_dims):
        a, b, c = match_objects(pred[idx], target[idx], iou)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "precision": precision,
        "recall": recall,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def level_object_scores(
    prediction: Any,
    target: np.ndarray,
    splits: tuple[str | tuple[str, str, dict[str, Any]], ...] = ("components", "watershed", "learned"),
    ious: tuple[float, ...] = (0.5,),
    crop: Any = None,
) -> dict[int, dict[str, float]]:
    """Per kept level of a :class:`~napari_unetpp.inference.predict.Prediction` (1-class, 2D planes; anything with
    ``probabilities`` and ``cues`` dicts will do): Dice of its mask (probability >= 0.5) and, for each object split,
    object F1 against the instance labels ``target`` at each IoU of ``ious`` (``f1_<split>`` at 0.5,
    ``f1_<split>_iou70`` at 0.7) with the seconds the split took (``seconds_<split>``). A split is a method of
    :func:`~napari_unetpp.inference.postprocess.split_instances` or ``(name, method, keyword arguments)``. Splits
    that read the cue are skipped for a model without one. ``crop`` (a function of an array) cuts the masks, the
    objects and the target to where they are scored, after the split ran on the whole planes."""
    import time

    from napari_unetpp.inference.masks import mask_from
    from napari_unetpp.inference.postprocess import split_instances

    def cut(a: np.ndarray) -> np.ndarray:
        return a if crop is None else crop(a)

    target = np.asarray(target)
    scored = cut(target)
    out: dict[int, dict[str, float]] = {}
    for lv, prob in prediction.probabilities.items():
        mask = mask_from(np.asarray(prob, np.float32), 1)
        row: dict[str, float] = {"dice": round(dice_score(cut(mask), scored > 0), 4)}
        for entry in splits:
            split, method, options = (entry, entry, {}) if isinstance(entry, str) else entry
            if method == "learned" and lv not in prediction.cues:
                continue
            t0 = time.perf_counter()
            cue = np.asarray(prediction.cues[lv], np.float32) if method == "learned" else None
            objects = split_instances(mask, method, cue=cue, **options)
            row[f"seconds_{split}"] = time.perf_counter() - t0
            for iou in ious:
                key = f"f1_{split}" if iou == 0.5 else f"f1_{split}_iou{round(100 * iou)}"
                row[key] = round(object_f1(cut(objects), scored, iou)["f1"], 4)
        out[lv] = row
    return out


def recommend_depth(scores: dict[int, float], margin: float = RECOMMEND_MARGIN) -> int:
    """The shallowest level whose score is within ``margin`` of the best (the paper picks its pruning depth on
    validation data)."""
    best = max(scores.values())
    return min(lv for lv, s in scores.items() if s >= best - margin)


def headline_score(level_scores: Any) -> tuple[str, float] | None:
    """``(key, value)`` that summarises one level of a card's scores (the first of :data:`SCORE_KEYS` present), or
    None. A bare number counts as ``("score", value)``."""
    if isinstance(level_scores, dict):
        key = next((k for k in SCORE_KEYS if k in level_scores), None)
        return (key, float(level_scores[key])) if key else None
    if isinstance(level_scores, (int, float)):
        return "score", float(level_scores)
    return None


def format_scores(scores: dict[int, float]) -> str:
    """``"Dice L1 0.812, L2 0.900"`` (``"no validation pixels yet"`` without scores)."""
    if not scores:
        return "no validation pixels yet"
    return "Dice " + ", ".join(f"L{k} {v:.3f}" for k, v in scores.items())
