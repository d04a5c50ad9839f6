"""What one plane's result looks like on screen, without Qt or napari: the mask at the slider's depth (pruned or the
ensemble of levels 1..k, thresholded, split into objects) and the optional level, ensemble and disagreement maps.
The widget hands :func:`planes_to_show`'s list to the layer writer; a whole-stack run makes its masks with
:func:`plane_mask` in its worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.postprocess import level_disagreement, split_instances
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.napari.cache import PlaneResult

__all__ = [
    "Display",
    "Shown",
    "chosen",
    "chosen_cue",
    "foreground",
    "layer_name",
    "plane_mask",
    "planes_to_show",
    "timing_line",
]


def layer_name(image: str, tag: str) -> str:
    """``"<image> [UNet++ L2]"`` and friends."""
    return f"{image} [UNet++ {tag}]"


@dataclass(frozen=True)
class Display:
    """How results are shown: the slider's depth and the choices applied to the probabilities.

    Attributes:
        depth: The slider's depth k.
        mode: ``"pruned"`` (head k alone) or ``"ensemble"`` (mean of heads 1..k).
        threshold: Foreground threshold of 1-class models.
        objects: The object split (``"none"``, ``"components"``, ``"watershed"``, ``"learned"``).
        all_levels: Every level's probability as a layer.
        disagreement: The levels' disagreement as a layer.
    """

    depth: int
    mode: str = "pruned"
    threshold: float = 0.5
    objects: str = "none"
    all_levels: bool = False
    disagreement: bool = False

    @property
    def ensemble(self) -> bool:
        """Whether the mask is the ensemble of levels 1..k."""
        return self.mode == "ensemble"

    @property
    def mask_choices(self) -> tuple[int, float, str, str]:
        """What the mask depends on: a mask made under other choices does not stand for this display's."""
        return self.depth, self.threshold, self.objects, self.mode

    def levels_kept(self) -> str | list[int]:
        """The levels a whole-stack run keeps: every level when level layers, the ensemble or the disagreement are
        shown, else head k alone."""
        return "all" if (self.all_levels or self.disagreement or self.ensemble) else [self.depth]


@dataclass
class Shown:
    """One plane to write into a result layer.

    Attributes:
        tag: The layer's tag (``"mask"``, ``"L2"``, ``"ensemble"``, ``"disagreement"``).
        values: The plane.
        labels: A Labels layer (the mask) rather than an Image layer.
        visible: Whether a new layer starts visible.
        style: Colormap and contrast limits of a new Image layer.
    """

    tag: str
    values: np.ndarray
    labels: bool = False
    visible: bool = True
    style: dict[str, Any] = field(default_factory=dict)


def plane_mask(
    prob: np.ndarray,
    num_classes: int,
    threshold: float,
    objects: str,
    spatial_dims: int,
    cue: np.ndarray | None = None,
) -> np.ndarray:
    """A plane's mask from its probabilities: threshold (1 class) or argmax, then the object split (1 class):
    ``learned`` uses the model's ``cue`` (without one, the watershed)."""
    mask = mask_from(prob, num_classes, threshold).astype(np.uint8)
    if num_classes == 1:
        if objects == "none":
            return mask
        method = "watershed" if objects == "learned" and cue is None else objects
        return split_instances(mask, method, spatial_dims, cue=None if cue is None else cue.astype(np.float32))
    return mask


def chosen(probs: dict[int, np.ndarray], k: int, ensemble: bool) -> np.ndarray:
    """The probabilities the mask of level ``k`` is made from: head k's, or the mean of levels 1..k (float32)."""
    if ensemble:
        return np.mean([probs[lv].astype(np.float32) for lv in range(1, k + 1)], axis=0)
    return probs[k].astype(np.float32)


def chosen_cue(cues: dict[int, np.ndarray], k: int, ensemble: bool) -> np.ndarray | None:
    """The instance cue that goes with the mask of level ``k`` (the mean of levels 1..k for the ensemble), or None
    when the model has no cue (or those levels' cues are not at hand)."""
    if ensemble:
        have = [cues[lv] for lv in range(1, k + 1) if lv in cues]
        return np.mean([c.astype(np.float32) for c in have], axis=0) if len(have) == k else None
    return cues[k].astype(np.float32) if k in cues else None


def foreground(prob: np.ndarray, lm: LoadedModel) -> np.ndarray:
    """Foreground probability of a 1-class map, or 1 - background for multi-class maps."""
    return prob if lm.module.config.num_classes == 1 else (1 - prob[0].astype(np.float32))


def planes_to_show(res: PlaneResult, lm: LoadedModel, display: Display, mask: np.ndarray | None = None) -> list[Shown]:
    """The planes to write for one cached result at the display's depth, in the order their layers are made: the
    mask (``mask`` when a whole-stack worker made it already), then each level, the ensemble and the disagreement
    when asked for. Empty when the result lacks the depth (e.g. a run at a shallower depth while the slider moved
    deeper)."""
    k = display.depth
    if k not in res.probs:
        return []
    cfg = lm.module.config
    levels = [res.probs[lv] for lv in range(1, k + 1) if lv in res.probs]
    ensemble = display.ensemble and len(levels) == k
    prob = chosen(res.probs, k, ensemble)
    if mask is None:
        cue = chosen_cue(res.cues, k, ensemble)
        mask = plane_mask(prob, cfg.num_classes, display.threshold, display.objects, cfg.spatial_dims, cue)
    out = [Shown("mask", mask, labels=True)]
    if display.all_levels:
        for lv in range(1, k + 1):
            if lv in res.probs:
                out.append(Shown(f"L{lv}", foreground(res.probs[lv], lm), visible=lv == k))
        if ensemble:
            out.append(Shown("ensemble", foreground(prob.astype(np.float16), lm), visible=False))
    if display.disagreement and len(levels) > 1:
        dis = foreground(level_disagreement(levels), lm)
        out.append(Shown("disagreement", dis, style={"colormap": "inferno", "contrast": (0, 0.5)}))
    return out


def timing_line(res: PlaneResult, display: Display) -> str | None:
    """``"L1 0.12 s, L2 0.30 s (showing L2)"``: this plane's own timings, or None (planes from a whole-stack run
    keep the run's summary)."""
    if not res.seconds:
        return None
    times = ", ".join(f"L{lv} {s:.2f} s" for lv, s in sorted(res.seconds.items()))
    return f"{times} (showing L{display.depth}{' ensemble' if display.ensemble else ''})"
