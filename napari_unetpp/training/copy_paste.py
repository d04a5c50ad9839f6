"""Crowded nuclei from real ones: copy-paste composites (Ghiasi et al. 2021, "Simple copy-paste is a strong data
augmentation method for instance segmentation").

Real labelled planes have few nuclei that touch, so a split tuned on them is not tested where it matters. A
composite starts from a real plane (its background, its nuclei and their labels stay) and pastes more real nuclei,
cut out of donor planes of the same source with their own one-pixel rim, along a nucleus already there, overlapping
it by at most a tenth of their area, until a fixed share of the plane's nuclei touch another and
the nuclei cover a fixed share of the plane. Donors are
flipped and rotated by multiples of 90 degrees; intensities are the donors' own. The result is a plane whose
nuclei press against each other as in a crowded tissue, with exact instance labels.

Build validation composites only from nuclei the models never trained on, and training composites only from
training nuclei: :func:`crowded_planes` takes the donors and the canvases as given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Donor", "cut_donors", "paste_crowded", "crowded_planes", "touching_share", "foreground_share"]


@dataclass(frozen=True)
class Donor:
    """One real nucleus: ``pixels`` (its bounding box grown by the rim, float32), ``mask`` (the nucleus in that box)
    and ``rim`` (the nucleus grown by the rim: the pixels that are pasted)."""

    pixels: np.ndarray
    mask: np.ndarray
    rim: np.ndarray


def cut_donors(image: np.ndarray, labels: np.ndarray, min_area: int = 30, rim: int = 1) -> list[Donor]:
    """Every labelled nucleus of a 2D plane (or a stack of planes) that lies wholly inside its plane and covers at
    least ``min_area`` pixels, cut with ``rim`` pixels of its surround."""
    from scipy import ndimage as ndi

    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape.")
    if image.ndim == 2:
        image, labels = image[None], labels[None]
    out: list[Donor] = []
    for img, lab in zip(image, labels):
        for i, box in enumerate(ndi.find_objects(lab), start=1):
            if box is None:
                continue
            ys, xs = box
            if ys.start < rim or xs.start < rim or ys.stop > lab.shape[0] - rim or xs.stop > lab.shape[1] - rim:
                continue  # cut by the plane's edge: not a whole nucleus
            grown = (slice(ys.start - rim, ys.stop + rim), slice(xs.start - rim, xs.stop + rim))
            mask = lab[grown] == i
            if mask.sum() < min_area:
                continue
            around = ndi.binary_dilation(mask, iterations=rim) if rim else mask
            out.append(Donor(img[grown].astype(np.float32), mask, around))
    return out


def foreground_share(labels: np.ndarray) -> float:
    """The share of pixels that belong to an object."""
    return float((np.asarray(labels) > 0).mean())


def touching_share(labels: np.ndarray) -> float:
    """The share of objects (per plane, summed over planes) that touch another object: some pixel of theirs has a
    4-neighbour with another non-zero label."""
    lab = np.asarray(labels)
    if lab.ndim == 2:
        lab = lab[None]
    touching = total = 0
    for p in lab:
        ids = np.unique(p[p > 0])
        total += len(ids)
        hit: set[int] = set()
        for a, b in ((p[1:], p[:-1]), (p[:, 1:], p[:, :-1])):
            edge = (a > 0) & (b > 0) & (a != b)
            hit.update(np.unique(a[edge]).tolist())
            hit.update(np.unique(b[edge]).tolist())
        touching += len(hit)
    return touching / max(total, 1)


def _correlate(field: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """For each top-left corner (y, x) where ``kernel`` fits inside ``field``: the sum of ``field`` under it."""
    from scipy.signal import fftconvolve

    return np.rint(fftconvolve(field.astype(np.float32), kernel[::-1, ::-1].astype(np.float32), mode="valid"))


def paste_crowded(
    image: np.ndarray,
    labels: np.ndarray,
    donors: list[Donor],
    rng: np.random.Generator,
    touching: float = 0.7,
    density: float = 0.25,
    max_overlap: float = 0.1,
    contact: float = 0.1,
    patience: int = 40,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``donors`` (drawn at random, flipped and rotated) into one 2D plane until ``touching`` of its objects
    touch another (:func:`touching_share`) and objects cover ``density`` of it. Each pasted nucleus lies along a
    nucleus already there (at least ``contact`` of the ring around it, up to 2 pixels wide within the donor's box,
    lies on objects) and covers at most ``max_overlap`` of its own area of other objects (it occludes those pixels,
    whose labels it takes, as a nucleus pressed on another flattens the border). Stops early after ``patience``
    donors in a row found no place; then the plane misses its targets (check them with :func:`touching_share` and
    :func:`foreground_share`; an empty plane gets nothing, as every paste needs contact).
    Returns ``(image float32, labels int32)``; the input is not changed."""
    from scipy import ndimage as ndi

    if not donors:
        raise ValueError("no donor nuclei to paste: the donor planes hold no whole labelled nucleus.")
    canvas = np.asarray(image, np.float32).copy()
    lab = np.asarray(labels).astype(np.int32)
    next_id = int(lab.max()) + 1
    misses = 0
    while (touching_share(lab) < touching or foreground_share(lab) < density) and misses < patience:
        d = donors[int(rng.integers(len(donors)))]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        pix, mask, rim = (np.rot90(a, k) for a in (d.pixels, d.mask, d.rim))
        if flip:
            pix, mask, rim = pix[:, ::-1], mask[:, ::-1], rim[:, ::-1]
        if mask.shape[0] >= lab.shape[0] or mask.shape[1] >= lab.shape[1]:
            misses += 1
            continue
        fg = lab > 0
        ring = ndi.binary_dilation(mask, iterations=2) & ~mask
        overlap = _correlate(fg, mask)
        ok = (overlap <= max_overlap * mask.sum()) & (_correlate(fg, ring) >= max(3.0, contact * ring.sum()))
        where = np.argwhere(ok)
        if not len(where):
            misses += 1
            continue
        y, x = where[int(rng.integers(len(where)))]
        box = (slice(y, y + mask.shape[0]), slice(x, x + mask.shape[1]))
        # the rim carries the donor's own edge blur, but never paints over another nucleus
        paint = rim & ~(fg[box] & ~mask)
        canvas[box][paint] = pix[paint]
        lab[box][mask] = next_id
        next_id += 1
        misses = 0
    return canvas, _drop_slivers(lab)


def _drop_slivers(lab: np.ndarray, min_area: int = 8) -> np.ndarray:
    """Objects that pasting occluded down to fewer than ``min_area`` pixels join the object they share the longest
    border with (the occluder): a sliver of a nucleus is not a nucleus of its own."""
    from scipy import ndimage as ndi

    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    for i in ids[counts < min_area]:
        own = lab == i
        border = lab[ndi.binary_dilation(own) & ~own]
        border = border[(border > 0) & (border != i)]
        lab[own] = np.bincount(border).argmax() if len(border) else 0
    return lab


def crowded_planes(
    canvases: tuple[np.ndarray, np.ndarray],
    donors: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
    touching: float = 0.7,
    density: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """A crowded composite of every plane of ``canvases`` (images, instance labels; ZYX or YX) with nuclei cut from
    ``donors`` (images, instance labels), reproducible from ``seed``. Returns ``(images float32, labels int32)`` of
    the canvases' shape."""
    img, lab = (np.asarray(a) for a in canvases)
    squeeze = img.ndim == 2
    if squeeze:
        img, lab = img[None], lab[None]
    pool = cut_donors(*donors)
    rng = np.random.default_rng(seed)
    out = [paste_crowded(i, c, pool, rng, touching, density) for i, c in zip(img, lab)]
    ims, labs = np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
    return (ims[0], labs[0]) if squeeze else (ims, labs)
