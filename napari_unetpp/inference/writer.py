"""The sink prediction's sliding window writes into: :class:`PlaneWriter`.

For each plane it receives the blended rows (the kept levels, plus head k for a pruned mask, plus the ensemble) and
writes them into a :class:`~napari_unetpp.inference.result.Prediction`: the kept levels' probabilities and cues, the
ensemble, the cue of what made the mask, and the mask (:func:`~napari_unetpp.inference.masks.mask_from`: threshold or
argmax of head k, or of the ensemble). When a plane is done it splits its objects
(:func:`~napari_unetpp.inference.postprocess.split_instances`), numbered on from the planes before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.plan import PredictionPlan
from napari_unetpp.inference.postprocess import split_instances
from napari_unetpp.inference.result import Prediction

__all__ = ["PlaneWriter", "as_prob", "on_host"]


class PlaneWriter:
    """Writes the blended rows of each plane into a :class:`~napari_unetpp.inference.result.Prediction`: the kept
    levels' probabilities, the ensemble, and the mask (threshold or argmax of head k, or of the ensemble). A
    :class:`~napari_unetpp.inference.sliding_window.Sink`: planes are keyed by their index over the loop axes."""

    def __init__(self, plan: PredictionPlan, result: Prediction) -> None:
        self.plan, self.result = plan, result
        lay = plan.lay
        # views of the outputs in (loop..., spatial...) order, so a plane index and rows address them directly
        self._order = [lay.out_axes.index(a) for a in lay.loop + list(lay.spatial)]
        self._mask = result.mask.transpose(self._order)
        self._probs = {lv: self._view(p) for lv, p in result.probabilities.items()}
        self._ens = self._view(result.ensemble) if result.ensemble is not None else None
        self._cue = result.cue.transpose(self._order) if result.cue is not None else None
        self._cues = {lv: c.transpose(self._order) for lv, c in result.cues.items()}
        self._objects = result.objects.transpose(self._order) if result.objects is not None else None
        self._next_id = 0
        pad, sp = plan.pad, plan.spatial_shape
        self._crop_rest = tuple(slice(a, a + n) for (a, _), n in zip(pad[1:], sp[1:]))

    def _view(self, arr: Any) -> Any:
        return arr.transpose(self._order if self.plan.num_classes == 1 else [0, *[o + 1 for o in self._order]])

    @property
    def channels(self) -> int:
        """Blended channels per tile (:attr:`PredictionPlan.channels`)."""
        return self.plan.channels

    def select(self, probs: np.ndarray) -> np.ndarray:
        """One tile's ``(k, classes [+ cue], *tile)`` output -> the blended levels' channels, then the ensemble's
        (the mean of heads 1..k)."""
        plan = self.plan
        chans = [probs[lv - 1] for lv in plan.blend_levels] + ([probs.mean(0)] if plan.mode == "ensemble" else [])
        return torch.cat(chans, 0) if isinstance(probs, torch.Tensor) else np.concatenate(chans, axis=0)

    def write_rows(self, pidx: Any, a: int, b: int, vals: np.ndarray | torch.Tensor) -> None:
        """Rows ``a:b`` of the padded plane ``pidx`` (``(channels, rows, ...)`` blended values) -> the outputs,
        with the padding cropped off. Values on a device (the device pipeline's tensors) are cropped, cast and
        thresholded there; only the outputs, in their dtypes, come back."""
        plan, nc = self.plan, self.plan.num_classes
        first, stop = plan.padded_rows  # (all the image's rows unless rows= asked for fewer)
        lo, hi = max(a, first), min(b, stop)
        if lo >= hi:
            return
        vals = vals[(slice(None), slice(lo - a, hi - a), *self._crop_rest)]
        a, b = lo - first, hi - first
        vals = vals.reshape(-1, plan.per_level, *vals.shape[1:])  # (channels, classes [+ cue], rows, ...)
        chosen = None
        for ci, lv in enumerate(plan.blend_levels):
            if lv in self._probs:
                self._store(self._probs[lv], pidx, a, b, vals[ci, :nc])
            if lv in self._cues:
                self._store(self._cues[lv], pidx, a, b, vals[ci, nc:])
            if lv == plan.depth and plan.mode == "pruned":
                chosen = vals[ci]
        if self._ens is not None:
            self._store(self._ens, pidx, a, b, vals[-1, :nc])
            chosen = vals[-1]
        assert chosen is not None
        if self._cue is not None:
            self._store(self._cue, pidx, a, b, chosen[nc:])
        mask = mask_from(chosen[0] if nc == 1 else chosen[:nc], nc, plan.threshold)
        if isinstance(mask, torch.Tensor) and nc > 1:  # a class index: back as the mask's dtype, not int64
            mask = mask.to(torch.uint8 if nc <= 255 else torch.int32)
        self._mask[pidx][a:b] = on_host(mask)

    def plane_done(self, pidx: Any) -> None:
        """Instance labels of a finished plane (its mask and cue are complete), numbered on from the planes before,
        so IDs are unique across the whole result."""
        if self._objects is None:
            return
        cue = np.asarray(self._cue[pidx], np.float32) if self._cue is not None else None
        if cue is not None and self.plan.prob_dtype == "uint8":
            cue = cue / 255.0
        lab = split_instances(
            np.asarray(self._mask[pidx]), self.plan.objects, self.plan.net.config.spatial_dims, cue=cue
        )
        lab[lab > 0] += self._next_id
        self._next_id = max(self._next_id, int(lab.max()))
        self._objects[pidx] = lab
        self.result.objects_count = self._next_id

    def _store(self, view: Any, pidx: tuple[int, ...], a: int, b: int, vals: np.ndarray | torch.Tensor) -> None:
        vals = as_prob(vals, self.plan.prob_dtype)
        if len(vals) == 1:
            view[pidx][a:b] = vals[0]
        else:
            view[(slice(None), *pidx)][:, a:b] = vals


def as_prob(p: np.ndarray | torch.Tensor, prob_dtype: str) -> np.ndarray:
    """float32 probabilities in an output's dtype (``uint8``: 0-255, rounded half to even), made before they are
    written: assigning float32 into a uint8 or float16 array casts element by element (1.7-1.8 ms for a 512^2 plane
    on an AVX2 CPU). float16 is cast by torch (vectorised, 0.05 ms), uint8 by NumPy's ufuncs (0.2 ms; torch's took
    0.35). With every level kept this was most of predict's time outside the network. A tensor (the device
    pipeline's) is cast where it is, by the same rules, and comes back as a NumPy array of the output's dtype."""
    if isinstance(p, torch.Tensor):
        p = p.float()
        if prob_dtype == "uint8":
            p = torch.clamp(torch.round(p * 255.0), 0, 255).to(torch.uint8)
        elif prob_dtype == "float16":
            p = p.to(torch.float16)
        return on_host(p)
    p = np.asarray(p, np.float32)
    if prob_dtype == "uint8":
        return np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)
    if prob_dtype == "float16":
        return torch.from_numpy(p if p.flags.writeable else p.copy()).to(torch.float16).numpy()
    return p


def on_host(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``x`` as a NumPy array: a tensor is copied back from its device; an array is returned as it is."""
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x
