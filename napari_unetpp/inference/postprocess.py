"""From probabilities to what the user edits: threshold, instance split, and where the heads disagree.

The instance split has four methods: ``none`` (the binary mask), ``components`` (connected components), ``watershed``
(seeds from the mask's distance transform) and ``learned`` (seeds from the network's own distance cue, see
:func:`distance_cue`, times the mask's distance transform for large objects; small fragments join a neighbour).
The cue is also built here, from instance labels, as a
training target, so the code that encodes it and the code that reads it sit together.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "INSTANCE_METHODS",
    "SEED_DYNAMIC",
    "instance_method",
    "split_instances",
    "level_disagreement",
    "distance_cue",
    "fill_object_holes",
    "merge_fragments",
    "FRAGMENT_FRACTION",
    "encode_cue_target",
    "decode_cue_target",
    "CUE_UNKNOWN",
    "plane_indices",
]

INSTANCE_METHODS = ("none", "components", "watershed", "learned")
_ALIASES = {"connected components": "components"}

#: The learned split keeps a seed of large objects only where the smoothed cue stands this high above the saddle to
#: a higher peak (its dynamic): the lobes of one large irregular nucleus are shallow bumps of the cue. Small nuclei
#: pressed together, whose dips the smoothing makes shallow, keep every peak. The dynamic asked for grows from 0 at
#: a median object radius of :data:`DYNAMIC_FROM` px to ``SEED_DYNAMIC`` at :data:`DYNAMIC_FULL` px. Chosen on the
#: held-out sets of ``benchmarks/bench_objects.py`` (sparse and crowded) with the cue trained on crowded composites:
#: 0.2 merged large touching nuclei (crowded cells3d object F1 0.84 at L3, 0.90 with 0.05).
SEED_DYNAMIC = 0.05
DYNAMIC_FROM, DYNAMIC_FULL = 6.0, 12.0
#: The learned split's objects smaller than this share of the plane's median object area are fragments: each joins
#: the object it shares the longest border with, or goes if it touches none (``min_fraction`` of
#: :func:`split_instances`). Most false objects of the nuclei models on held-out cells3d were such fragments (dim
#: debris, pieces of mitoses, edge slivers): object F1 at L3 0.80 without, 0.92 with (first crowded retrain).
FRAGMENT_FRACTION = 0.4


def split_instances(
    mask: np.ndarray,
    method: str = "components",
    spatial_dims: int = 2,
    min_distance: int | None = None,
    min_size: int = 8,
    cue: np.ndarray | None = None,
    seed_dynamic: float = SEED_DYNAMIC,
    min_fraction: float | None = None,
) -> np.ndarray:
    """Label objects in a binary mask, per plane for 2D models (the last ``spatial_dims`` axes form a plane).

    Args:
        mask: Binary mask (non-zero = foreground).
        method: ``"none"`` (return the mask as uint8), ``"components"`` (connected components; ``"connected
            components"`` is accepted too), ``"watershed"`` (distance transform watershed that separates touching
            round objects such as nuclei) or ``"learned"`` (the same watershed on the network's distance cue, times
            the mask's distance transform for objects of 6 px radius and more, then fragments folded in: needs
            ``cue``).
        spatial_dims: 2 or 3 (default 2).
        min_distance: Minimum distance between watershed seeds in pixels. Default: set from the objects' size in
            each plane (half the median object radius, and the distance map smoothed by a quarter of it), so
            40-pixel nuclei are not cut into pieces and 12-pixel ones are still separated.
        min_size: Objects smaller than this many pixels are dropped (default 8).
        cue: The distance cue (probabilities in [0, 1], same shape as ``mask``) for ``"learned"``.
        seed_dynamic: For ``"learned"``: how far the cue must fall between two cores of large objects to split them
            (default :data:`SEED_DYNAMIC`; less for smaller objects, none below a radius of 6 px).
        min_fraction: Objects smaller than this share of their plane's median object area join the neighbour they
            share the longest border with, or are dropped if they touch none. Default :data:`FRAGMENT_FRACTION` for
            ``"learned"``, 0 (off) for the others; give 0 to keep small objects such as micronuclei.

    Returns:
        uint32 labels, unique across the whole array.
    """
    method = instance_method(method)
    fg = np.asarray(mask) > 0
    if method == "learned":
        if cue is None:
            raise ValueError("the learned split needs the model's distance cue (cue=...); use 'watershed' instead.")
        if np.shape(cue) != fg.shape:
            raise ValueError(f"the cue has shape {np.shape(cue)} but the mask {fg.shape}.")
    cue_planes: Any = cue  # read plane by plane (a float16 stack is not copied whole)
    if method == "none":
        return fg.astype(np.uint8)
    if min_fraction is None:
        min_fraction = FRAGMENT_FRACTION if method == "learned" else 0.0
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    out = np.zeros(fg.shape, np.uint32)
    offset = 0
    for idx in plane_indices(fg.shape, spatial_dims):
        block = fg[idx]
        if min_size > 1 and block.any():
            block = (
                remove_small_objects(block, max_size=min_size - 1)
                if _new_skimage()
                else remove_small_objects(block, min_size=min_size)
            )
        if method == "components":
            lab = label(block, connectivity=1)
        elif method == "learned":
            lab = _learned(block, np.asarray(cue_planes[idx], np.float32), seed_dynamic)
        else:
            lab = _watershed(block, min_distance)
        if min_fraction > 0:
            lab = merge_fragments(lab, min_fraction)
        lab = lab.astype(np.uint32)
        lab[lab > 0] += offset
        offset = max(offset, int(lab.max()))
        out[idx] = lab
    return out


def plane_indices(shape: Sequence[int], spatial_dims: int = 2) -> Iterator[tuple[int, ...]]:
    """Index of each plane (or volume, ``spatial_dims=3``) of an array of ``shape``: every combination of the
    leading axes; one empty index when there are none."""
    return np.ndindex(*tuple(shape)[: len(shape) - spatial_dims])


def instance_method(name: str) -> str:
    """The canonical name of an instance split (``"connected components"`` -> ``"components"``); ValueError for an
    unknown one."""
    method = _ALIASES.get(name, name)
    if method not in INSTANCE_METHODS:
        raise ValueError(f"the object split must be one of {', '.join(INSTANCE_METHODS)}, got {name!r}.")
    return method


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

    if not block.any():
        return np.zeros(block.shape, np.int32)
    dist = ndi.distance_transform_edt(block)
    comps = label(block)
    if min_distance is None:
        # object scale: the median over objects of their largest inscribed radius
        radius = _median_radius(dist, comps)
        min_distance = max(2, int(round(0.5 * radius)))
        dist = ndi.gaussian_filter(dist, 0.25 * radius)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=comps, exclude_border=False)
    return _flood(-dist, peaks, comps, block)


def _learned(block: np.ndarray, cue: np.ndarray, seed_dynamic: float) -> np.ndarray:
    """The watershed of :func:`_watershed` run on the learned cue (smoothed by a quarter of the objects' median
    radius): seeds are the peaks at least half a radius apart, and flooding from them meets where the cue falls, at
    borders and contacts. Every mask component gets at least one seed.

    Which landscape, and the dynamic, follow the objects' size read from that split (the mask's own components
    would be clumps where nuclei touch); the smoothing and the seed spacing follow the mask's components. For
    small objects (median radius below :data:`DYNAMIC_FROM`) it is the answer: their contacts are a pixel or two of
    low cue. For larger ones the cue is multiplied by the mask's distance transform (per component, 0..1), which adds
    the neck between two evenly bright round nuclei, and a peak is kept only if its dynamic (how far the landscape
    falls before a higher peak) reaches ``seed_dynamic`` (scaled from 0 at :data:`DYNAMIC_FROM` to full at
    :data:`DYNAMIC_FULL`): the lobes of one large nucleus are shallow bumps."""
    from scipy import ndimage as ndi
    from skimage.measure import label

    if not block.any():
        return np.zeros(block.shape, np.int32)
    comps = label(block)
    edt = ndi.distance_transform_edt(block)
    spread = _median_radius(edt, comps)  # of the mask's components: smoothing and seed spacing, as before
    sigma = max(1.0, 0.25 * spread)
    land = ndi.gaussian_filter(np.where(block, cue, 0.0).astype(np.float32), sigma)
    first = _seeded(land, comps, block, spread, 0.0)
    radius = _object_radius(first)
    if radius < DYNAMIC_FROM:
        return first
    # the shape adds the neck between two evenly bright round nuclei, which the cue misses
    dist = ndi.gaussian_filter(edt, sigma)
    top = ndi.maximum(dist, comps, index=np.arange(comps.max() + 1))
    land = land * (dist / np.maximum(top[comps], 1e-6)).astype(np.float32)
    h = seed_dynamic * float(np.clip((radius - DYNAMIC_FROM) / (DYNAMIC_FULL - DYNAMIC_FROM), 0.0, 1.0))
    return _seeded(land, comps, block, spread, h)


def _seeded(land: np.ndarray, comps: np.ndarray, block: np.ndarray, radius: float, h: float) -> np.ndarray:
    """Watershed of ``land`` from its peaks at least half ``radius`` apart, keeping one peak (the highest) per
    region of the h-maxima transform of dynamic ``h`` (none with ``h`` 0)."""
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.morphology import h_maxima

    peaks = peak_local_max(land, min_distance=max(2, int(round(0.5 * radius))), labels=comps, exclude_border=False)
    if len(peaks) and h > 0:  # one peak (the highest) per region of the h-maxima transform; others are bumps
        regions = label(h_maxima(np.rint(np.clip(land, 0, 1) * 255).astype(np.uint8), max(1, int(h * 255))))
        best: dict[int, np.ndarray] = {}
        for p in peaks:
            r = int(regions[tuple(p)])
            if r and (r not in best or land[tuple(p)] > land[tuple(best[r])]):
                best[r] = p
        peaks = np.array(list(best.values()), dtype=np.intp).reshape(-1, block.ndim)
    return _flood(-land, peaks, comps, block)


def _object_radius(lab: np.ndarray) -> float:
    """The median over objects of their largest inscribed radius (each object measured on its own, so touching
    objects do not count as one); 0 without objects."""
    from scipy import ndimage as ndi

    radii = [
        float(ndi.distance_transform_edt(np.pad(lab[box] == i, 1)).max())
        for i, box in enumerate(ndi.find_objects(lab), start=1)
        if box is not None
    ]
    return float(np.median(radii)) if radii else 0.0


def merge_fragments(lab: np.ndarray, min_fraction: float) -> np.ndarray:
    """A copy of the labels of one plane (or volume) with the objects smaller than ``min_fraction`` of the median
    object area joined to the object they share the longest border with, smallest first, or dropped where they
    touch none (a nucleus cut by the image's edge to a sliver goes too: on held-out cells3d most such slivers were
    false objects). An object that grew by a fragment is judged by its new area."""
    from scipy import ndimage as ndi

    lab = np.array(lab, copy=True)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    if len(ids) < 2:
        return lab
    limit = min_fraction * float(np.median(counts))
    area = dict(zip(ids.tolist(), counts.tolist()))
    boxes = {i: b for i, b in enumerate(ndi.find_objects(lab), start=1) if b is not None}
    for i in sorted(area, key=area.__getitem__):
        if area[i] >= limit:
            continue  # grown past the limit by fragments that joined it
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[i])
        sub = lab[box]
        own = sub == i
        ring = sub[ndi.binary_dilation(own) & ~own]
        ring = ring[(ring > 0) & (ring != i)]
        into = int(np.bincount(ring).argmax()) if len(ring) else 0
        sub[own] = into
        if into:  # the object grows by the fragment (it may be a fragment itself, judged later by its new area)
            area[into] += area[i]
            boxes[into] = tuple(
                slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(boxes[into], boxes[i])
            )
        area[i] = 0
    return lab


def _median_radius(dist: np.ndarray, comps: np.ndarray) -> float:
    """The objects' scale: the median over components (labels ``comps``) of their largest inscribed radius, from the
    mask's distance transform ``dist``."""
    from scipy import ndimage as ndi

    return float(np.median(ndi.maximum(dist, comps, index=np.arange(1, comps.max() + 1))))


def _flood(landscape: np.ndarray, peaks: np.ndarray, comps: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Watershed of ``landscape`` from ``peaks`` inside ``block``; a component without a peak gets one seed."""
    from skimage.segmentation import watershed

    markers = np.zeros(block.shape, np.int32)
    if len(peaks):
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    missing = np.setdiff1d(np.unique(comps[block]), np.unique(comps[tuple(peaks.T)]) if len(peaks) else [])
    for i, c in enumerate(missing, start=len(peaks) + 1):
        markers[tuple(np.argwhere(comps == c)[0])] = i
    return watershed(landscape, markers, mask=block)


def fill_object_holes(instances: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """Instance labels (int32 copy) with each object's holes filled, per plane for ``spatial_dims=2``: a nucleus seen
    in a plane has no holes, though labels often leave nucleoli or chromocentres out."""
    from scipy import ndimage as ndi

    out = np.asarray(instances).astype(np.int32)  # a copy
    for idx in plane_indices(out.shape, spatial_dims):
        plane = out[idx]
        for i, box in enumerate(ndi.find_objects(plane), start=1):
            if box is not None:
                region = plane[box]
                region[ndi.binary_fill_holes(region == i) & (region == 0)] = i
    return out


def distance_cue(instances: np.ndarray, spatial_dims: int = 2) -> np.ndarray:
    """The distance-cue target of instance labels (float32 in [0, 1], per plane for ``spatial_dims=2``): in each
    object, the distance to the nearest pixel outside it (background or another object), divided by the object's
    largest such distance. 1 at each object's centre, small at its border and where it touches a neighbour; 0 on
    the background. Objects cut by the array's edge are measured as if they went on beyond it."""
    from scipy import ndimage as ndi

    lab = np.asarray(instances)
    out = np.zeros(lab.shape, np.float32)
    for idx in plane_indices(lab.shape, spatial_dims):
        plane = lab[idx]
        res = out[idx]
        for i, box in enumerate(ndi.find_objects(plane), start=1):
            if box is None:
                continue
            grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, plane.shape))
            obj = plane[grown] == i
            d = ndi.distance_transform_edt(obj)
            top = float(d.max())
            if top > 0:
                res[grown][obj] = (d[obj] / top).astype(np.float32)
    return out


#: Cue levels kept in an encoded target (see :func:`encode_cue_target`).
_CUE_STEPS = 254
#: Encoded foreground whose object split is unknown (binary labels: touching objects may share a value).
CUE_UNKNOWN = 256


def encode_cue_target(instances: np.ndarray, spatial_dims: int = 2, instance_labels: bool = True) -> np.ndarray:
    """Foreground and distance cue of labels in one int64 array that the patch sampler, flips, rotations and
    nearest-neighbour zoom carry unchanged: 0 = background, ``1 + round(254 * cue)`` on objects (so ``> 0`` is
    still the foreground). With ``instance_labels=False`` (a binary mask, where touching objects share a value) the
    foreground is :data:`CUE_UNKNOWN`: its cue is not trained. :func:`decode_cue_target` splits it again."""
    lab = np.asarray(instances)
    fg = lab > 0
    if not instance_labels:
        return np.where(fg, CUE_UNKNOWN, 0).astype(np.int64)
    cue = distance_cue(lab, spatial_dims)
    return np.where(fg, 1 + np.rint(cue * _CUE_STEPS), 0).astype(np.int64)


def decode_cue_target(target: Any) -> tuple[Any, Any, Any]:
    """Inverse of :func:`encode_cue_target` for numpy arrays or torch tensors: ``(foreground 0/1, cue in [0, 1],
    cue known)``; the cue is known on the background and on objects from instance labels."""
    fg = target > 0
    known = target != CUE_UNKNOWN
    cue = ((target - 1).clip(0, _CUE_STEPS) / _CUE_STEPS) * (fg & known)
    return fg * 1, cue, known


def level_disagreement(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Standard deviation of the heads' probabilities (float16): high where the levels disagree."""
    stack = np.stack([np.asarray(p, dtype=np.float32) for p in probabilities])
    return stack.std(axis=0).astype(np.float16)
