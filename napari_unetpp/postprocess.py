"""From probabilities to what the user edits: threshold, instance split, and where the heads disagree."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["INSTANCE_METHODS", "split_instances", "level_disagreement"]

INSTANCE_METHODS = ("none", "connected components", "watershed")


def split_instances(
    mask: np.ndarray,
    method: str = "connected components",
    spatial_dims: int = 2,
    min_distance: int | None = None,
    min_size: int = 8,
) -> np.ndarray:
    """Label objects in a binary mask, per plane for 2D models (the last ``spatial_dims`` axes form a plane).

    Args:
        mask: Binary mask (non-zero = foreground).
        method: ``"none"`` (return the mask as uint8), ``"connected components"`` or ``"watershed"`` (distance
            transform watershed that separates touching round objects such as nuclei).
        spatial_dims: 2 or 3 (default 2).
        min_distance: Minimum distance between watershed seeds in pixels. Default: set from the objects' size in
            each plane (half the median object radius, and the distance map smoothed by a quarter of it), so
            40-pixel nuclei are not cut into pieces and 12-pixel ones are still separated.
        min_size: Objects smaller than this many pixels are dropped (default 8).

    Returns:
        uint32 labels, unique across the whole array.
    """
    if method not in INSTANCE_METHODS:
        raise ValueError(f"method must be one of {INSTANCE_METHODS}, got {method!r}.")
    fg = np.asarray(mask) > 0
    if method == "none":
        return fg.astype(np.uint8)
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    out = np.zeros(fg.shape, np.uint32)
    lead = fg.shape[: fg.ndim - spatial_dims]
    offset = 0
    for idx in np.ndindex(*lead) if lead else [()]:
        block = fg[idx]
        if min_size > 1 and block.any():
            block = (
                remove_small_objects(block, max_size=min_size - 1)
                if _new_skimage()
                else remove_small_objects(block, min_size=min_size)
            )
        if method == "connected components":
            lab = label(block, connectivity=1)
        else:
            lab = _watershed(block, min_distance)
        lab = lab.astype(np.uint32)
        lab[lab > 0] += offset
        offset = max(offset, int(lab.max()))
        out[idx] = lab
    return out


@functools.lru_cache(maxsize=1)
def _new_skimage() -> bool:
    """scikit-image >= 0.26 renamed remove_small_objects' ``min_size`` to ``max_size`` (exclusive bound)."""
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


def _watershed(block: np.ndarray, min_distance: int | None) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.segmentation import watershed

    if not block.any():
        return np.zeros(block.shape, np.int32)
    dist = ndi.distance_transform_edt(block)
    comps = label(block)
    if min_distance is None:
        # object scale: the median over objects of their largest inscribed radius
        radius = float(np.median(ndi.maximum(dist, comps, index=np.arange(1, comps.max() + 1))))
        min_distance = max(2, int(round(0.5 * radius)))
        dist = ndi.gaussian_filter(dist, 0.25 * radius)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comps, exclude_border=False)
    markers = np.zeros(block.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # every component gets at least one seed
    missing = np.setdiff1d(np.unique(comps[block]), np.unique(comps[tuple(peaks.T)]) if len(peaks) else [])
    for i, c in enumerate(missing, start=len(peaks) + 1):
        markers[tuple(np.argwhere(comps == c)[0])] = i
    return watershed(-dist, markers, mask=block)


def level_disagreement(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Standard deviation of the heads' probabilities (float16): high where the levels disagree."""
    stack = np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])
    return stack.std(axis=0).astype(np.float16)
