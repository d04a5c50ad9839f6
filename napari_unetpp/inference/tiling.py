"""Sliding-window tiling with Gaussian blending, for 2D planes and 3D volumes (numpy; the device pipeline's
:class:`~napari_unetpp.inference.on_device.TorchBlender` is the same blender over torch tensors).

A :class:`TilePlan` covers an N-D spatial extent with overlapping tiles whose starts are spread evenly, the last
one flush with the border. Tiles are visited in raster order; the :class:`Blender` accumulates weighted tile
outputs in a window that spans one tile along axis 0 and streams finished rows out through a callback, so its
memory is bounded by ``tile[0] x (other extents)``, never by the whole image or volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "TilePlan",
    "Blender",
    "gaussian_weights",
    "axis_starts",
    "default_tile",
    "default_batch",
    "read_tile",
    "tile_grid",
]


def axis_starts(size: int, tile: int, overlap: float, align: int = 1) -> list[int]:
    """Tile start positions along one axis: evenly spread, first at 0, last at ``size - tile``.

    Args:
        size: Extent of the axis.
        tile: Tile extent (clipped to ``size``).
        overlap: Minimum overlap as a fraction of the tile, in [0, 1).
        align: Starts are multiples of this (default 1). A network that pools k times is only shift-equivariant
            for shifts that are multiples of 2**k, so aligned tiles reproduce the whole-image result.
            ``size - tile`` must be a multiple of ``align``.
    """
    if size <= tile:
        return [0]
    if (size - tile) % align:
        raise ValueError(f"size - tile ({size} - {tile}) must be a multiple of align={align}.")
    step = max(align, int(tile * (1.0 - overlap)) // align * align)
    n = int(np.ceil((size - tile) / step)) + 1
    return sorted({int(round(s / align)) * align for s in np.linspace(0, size - tile, n)})


def fit_tile(size: int, tile: int, overlap: float, align: int = 1) -> int:
    """The smallest tile (a multiple of ``align``, at most ``tile``) that covers ``size`` with as few tiles as
    ``tile`` allows and at least ``overlap * tile`` pixels of overlap: a 2048 axis with a 1024 budget and 1/8 overlap
    gets three 768 tiles rather than three 1024 tiles, so less is computed twice."""
    if size <= tile:
        return size
    o = _overlap_px(tile, overlap, align)
    n = -(-(size - o) // (tile - o))
    t = -(-(size + (n - 1) * o) // n)
    return min(tile, -(-t // align) * align)


def _overlap_px(tile: int, overlap: float, align: int) -> int:
    """Overlap in pixels: ``overlap * tile`` rounded up to ``align``, and (when aligned to a network's coarsest grid)
    at least four cells of it (64 pixels at depth 4): on real EM, L4 masks kept Dice >= 0.998 against the untiled
    result with 64 pixels of overlap and fell to 0.994 with 32."""
    if overlap <= 0:
        return 0
    px = -(-int(np.ceil(tile * overlap)) // align) * align
    if align > 1:
        px = max(px, 4 * align)
    return min(tile - align, px)


def gaussian_weights(shape: Sequence[int], sigma_scale: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Separable Gaussian importance map (nnU-Net style): 1 at the centre, ``floor`` at least at the corners.

    Args:
        shape: Tile shape.
        sigma_scale: Sigma as a fraction of each tile extent (default 1/8).
        floor: Smallest weight, so borders of the image (covered by one tile only) stay defined (default 1e-3).
    """
    w = np.ones((), dtype=np.float32)
    for n in shape:
        c = (n - 1) / 2.0
        g = np.exp(-0.5 * ((np.arange(n) - c) / max(n * sigma_scale, 1e-6)) ** 2).astype(np.float32)
        w = np.multiply.outer(w, g)
    w /= w.max()
    return np.maximum(w, floor).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering ``shape`` with tiles of ``tile`` (clipped per axis) overlapping by ``overlap``.

    Attributes:
        shape: Spatial extent, e.g. ``(H, W)`` or ``(D, H, W)``.
        tile: Requested tile extent per axis.
        overlap: Minimum overlap fraction (default 0.25).
        align: Tile starts are multiples of this, one for every axis or one per axis (default 1; see
            :func:`axis_starts`).
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    overlap: float = 0.25
    align: int | tuple[int, ...] = 1

    @property
    def aligns(self) -> tuple[int, ...]:
        """The alignment per axis."""
        return per_axis(self.align, len(self.shape))

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.tile):
            raise ValueError(f"tile {self.tile} and shape {self.shape} have different dimensionality.")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}.")
        if any(t < 1 for t in self.tile):
            raise ValueError(f"tile sizes must be positive, got {self.tile}.")

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """The actual tile extent: the image where it fits in one tile, else :func:`fit_tile`."""
        return tuple(fit_tile(s, t, self.overlap, a) for t, s, a in zip(self.tile, self.shape, self.aligns))

    @property
    def starts(self) -> list[list[int]]:
        """Start positions per axis."""
        out = []
        for s, req, t, a in zip(self.shape, self.tile, self.tile_shape, self.aligns):
            o = _overlap_px(req, self.overlap, a) if s > req else 0
            out.append(axis_starts(s, t, o / t, a))
        return out

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def rows_touching(self, lo: int, hi: int) -> list[tuple[slice, ...]]:
        """The tiles (raster order) whose extent along axis 0 overlaps rows ``lo:hi``."""
        return [t for t in self if t[0].start < hi and t[0].stop > lo]

    def __iter__(self) -> Iterator[tuple[slice, ...]]:
        """Tile slices in raster order (axis 0 slowest)."""
        ts = self.tile_shape
        for start in itertools.product(*self.starts):
            yield tuple(slice(s, s + t) for s, t in zip(start, ts))


class Blender:
    """Accumulates weighted tile outputs and streams finished rows (along axis 0) to ``sink``.

    Args:
        plan: The tile plan; tiles must be added in its raster order.
        channels: Leading channel count of every tile output (e.g. levels x classes).
        sink: Called as ``sink(start, stop, values)`` with ``values`` of shape ``(channels, stop - start, ...)``
            holding the blended result for rows ``start:stop`` of axis 0; each row is sent exactly once.
        weights: Per-tile weights (default: :func:`gaussian_weights` of the tile shape).
        rows: Only rows ``rows[0]:rows[1]`` of axis 0 are sent (default all). Then only the tiles that touch those
            rows need adding (:meth:`TilePlan.rows_touching`): each of those rows gets every tile that covers it, in
            the same order, so it equals the whole plan's result exactly.
    """

    def __init__(
        self,
        plan: TilePlan,
        channels: int,
        sink: Callable[[int, int, np.ndarray], None],
        weights: np.ndarray | None = None,
        rows: tuple[int, int] | None = None,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.rows = rows if rows is not None else (0, plan.shape[0])
        self._single = len(plan) == 1  # one tile covers everything: nothing to blend
        if self._single:
            self.weights = None
        else:
            self.weights = self._as_weights(gaussian_weights(plan.tile_shape) if weights is None else weights)
        self.row_starts = plan.starts[0]
        t0 = plan.tile_shape[0] if len(plan) > 1 else 0
        self._acc = self._zeros((channels, t0, *plan.shape[1:]))
        self._wsum = self._zeros((t0, *plan.shape[1:]))
        self._origin = 0  # axis-0 index of the window's first row
        self._row = 0  # index into row_starts of the tiles being added
        self._flushed = 0  # rows already sent

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        return np.zeros(shape, dtype=np.float32)

    def _as_weights(self, weights: np.ndarray) -> Any:
        return np.asarray(weights, dtype=np.float32)

    def _roll(self, a: Any, shift: int, axis: int) -> Any:
        return np.roll(a, shift, axis=axis)

    def add(self, tile: tuple[slice, ...], values: np.ndarray) -> None:
        """Add the output of one tile, ``values`` of shape ``(channels, *tile_shape)``."""
        if self._single:
            lo, hi = self.rows
            self.sink(lo, hi, values[:, lo:hi])
            self._flushed = self.plan.shape[0]
            return
        start0 = tile[0].start
        while self.row_starts[self._row] != start0:
            self._advance()
        local = (slice(start0 - self._origin, tile[0].stop - self._origin), *tile[1:])
        weights = self.weights
        assert weights is not None  # several tiles: the plan made Gaussian weights
        self._acc[(slice(None), *local)] += values * weights
        self._wsum[local] += weights

    def _advance(self) -> None:
        """All tiles of the current row are in: rows before the next row's start are final."""
        nxt = self.row_starts[self._row + 1]
        self._emit(nxt)
        shift = nxt - self._origin
        self._acc = self._roll(self._acc, -shift, 1)
        self._wsum = self._roll(self._wsum, -shift, 0)
        self._acc[:, -shift:] = 0
        self._wsum[-shift:] = 0
        self._origin = nxt
        self._row += 1

    def _emit(self, stop: int) -> None:
        if stop <= self._flushed:
            return
        lo, hi = max(self._flushed, self.rows[0]), min(stop, self.rows[1])
        if lo < hi:
            a, b = lo - self._origin, hi - self._origin
            self.sink(lo, hi, self._acc[:, a:b] / self._wsum[a:b])
        self._flushed = stop

    def finish(self) -> None:
        """Flush the remaining rows; call once after the last tile."""
        self._emit(self.plan.shape[0])


def per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """``value`` for each of ``n`` axes: one number repeated, or a sequence given per axis (a network's size multiple,
    a tile alignment)."""
    return (int(value),) * n if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)


def padding_for(shape: Sequence[int], multiple: int | Sequence[int]) -> list[tuple[int, int]]:
    """Padding ``(before, after)`` per axis that brings each size up to a multiple of ``multiple`` (one for every
    axis, or one per axis), split evenly (the extra pixel after). Prediction pads every plane this way, and the
    network pads odd inputs the same way."""
    out = []
    for n, m in zip(shape, per_axis(multiple, len(shape))):
        total = (-int(n)) % m
        out.append((total // 2, total - total // 2))
    return out


def tile_grid(
    shape: Sequence[int], multiple: int | Sequence[int], tile: Sequence[int], overlap: float
) -> tuple[list[tuple[int, int]], TilePlan]:
    """The padding and tile grid of a plane (or volume) of ``shape`` for a network whose sizes must be multiples of
    ``multiple``: the plane is padded to a multiple (:func:`padding_for`), tiles of at most ``tile`` are rounded
    down to multiples (at least one) and start on multiples, so the network never pads inside a tile and tiled and
    whole-plane runs see the same borders. Prediction and validation plan their tiles with it.

    Returns:
        ``(pad, plan)``: padding ``(before, after)`` per axis, and the :class:`TilePlan` over the padded plane.
    """
    mult = per_axis(multiple, len(shape))
    pad = padding_for(shape, mult)
    padded = tuple(int(n) + a + b for n, (a, b) in zip(shape, pad))
    tile_t = tuple(max(m, int(t) // m * m) for t, m in zip(tile, mult))
    return pad, TilePlan(padded, tile_t, overlap, align=mult)


def source_index(tile: slice, before: int, size: int, edge: bool = False) -> np.ndarray:
    """Image indices of the padded positions ``tile`` along one axis: ``numpy.pad``'s ``"reflect"`` (or ``"edge"``)
    rule, so a tile read from the image equals the same tile cut from the padded image.

    Args:
        tile: Positions in the padded axis.
        before: Padding before the image on this axis.
        size: The image's size on this axis.
        edge: Repeat the edge value instead of reflecting (numpy's ``"edge"``).
    """
    i = np.arange(tile.start, tile.stop) - before
    if edge or size == 1:
        return np.clip(i, 0, size - 1)
    period = 2 * (size - 1)
    m = np.mod(i, period)
    return np.where(m < size, m, period - m)


def default_tile(spatial_dims: int) -> tuple[int, ...]:
    """The largest tile when neither the caller nor the model card gives one: 1024 x 1024 in 2D, 96^3 in 3D
    (prediction's default; validation during fine-tuning tiles the same way)."""
    return (1024, 1024) if spatial_dims == 2 else (96, 96, 96)


def default_batch(tile_shape: Sequence[int], device_type: str) -> int:
    """Tiles per batch: about 1 M voxels on a CPU, 4 M on an accelerator (prediction's and validation's budget)."""
    budget = 2**20 if device_type == "cpu" else 2**22
    return max(1, budget // int(np.prod(tile_shape)))


def read_tile(plane: Any, tile: Sequence[slice], pad: Sequence[tuple[int, int]], edge: bool = False) -> np.ndarray:
    """Tile ``tile`` of ``plane`` padded by ``pad`` (its last ``len(tile)`` axes; leading ones, e.g. channels, kept),
    read without padding the plane: only the tile's pixels are read (lazily for memory maps and dask arrays),
    reflected at the borders by :func:`source_index`'s rule, so it equals the same tile cut from
    ``numpy.pad(plane, pad, "reflect")``.

    Args:
        plane: Array whose last axes are the spatial ones.
        tile: Positions in the padded plane, one slice per spatial axis.
        pad: Padding ``(before, after)`` per spatial axis (e.g. :func:`padding_for`).
        edge: Repeat the edge value instead of reflecting (for axes of size 1).
    """
    shape = tuple(int(n) for n in plane.shape[len(plane.shape) - len(tile) :])
    idx = [source_index(s, a, n, edge) for s, (a, _), n in zip(tile, pad, shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    lead = (slice(None),) * (len(plane.shape) - len(tile))  # no Ellipsis: not every lazy array takes one
    block = np.asarray(plane[(*lead, *box)])
    if any(len(i) != b.stop - b.start for i, b in zip(idx, box)):  # reflected at a border
        local: tuple[Any, ...] = (Ellipsis, *np.ix_(*[i - b.start for i, b in zip(idx, box)]))
        block = block[local]
    return block
