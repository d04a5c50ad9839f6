"""What a prediction will do, decided before the first tile: :func:`plan_prediction` -> :class:`PredictionPlan`.

The plan checks the inputs and fixes the axes (:mod:`napari_unetpp.data.axes`), the depth k and the levels kept, the
mode, the instance split, the normalisation statistics, the padding and tile grid
(:func:`~napari_unetpp.inference.tiling.tile_grid`), the batch size and the rows asked for. Its :meth:`planes
<PredictionPlan.planes>` are what :func:`~napari_unetpp.inference.sliding_window.sliding_window` runs, and its
:meth:`~PredictionPlan.allocate` makes the empty result the
:class:`~napari_unetpp.inference.writer.PlaneWriter` fills. Zoom is planned on the resampled image
(:mod:`napari_unetpp.inference.zoom`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_unetpp.data.axes import Layout, fit_channels, layout
from napari_unetpp.data.normalization import Normalization, check_pixels
from napari_unetpp.errors import InputError
from napari_unetpp.inference.postprocess import instance_method
from napari_unetpp.inference.result import Allocator, Prediction, empty_prediction
from napari_unetpp.inference.sliding_window import Plane
from napari_unetpp.inference.tiling import TilePlan, default_batch, default_tile, read_tile, tile_grid
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.runtimes import resolve_device

__all__ = ["PredictionPlan", "plan_prediction", "kept_levels", "image_stats", "objects_split"]

log = logging.getLogger(__name__)


@dataclass
class PredictionPlan:
    """Everything :func:`~napari_unetpp.inference.predict.predict_iter` decided before the first tile: see
    :func:`plan_prediction`."""

    model: LoadedModel
    net: UNetPlusPlus
    device: torch.device
    depth: int
    mode: str
    keep_levels: list[int]  # probability maps the caller gets
    blend_levels: list[int]  # levels blended (kept ones, plus k for a pruned mask)
    threshold: float
    prob_dtype: str
    lay: Layout
    shape: tuple[int, ...]  # the image's
    loop_shape: tuple[int, ...]  # planes to run (over the loop axes)
    spatial_shape: tuple[int, ...]
    pad: list[tuple[int, int]]  # per spatial axis, to a multiple of 2**max_depth
    tiles: TilePlan  # over the padded plane
    norm: Normalization
    stats: list[tuple[float, float]]
    batch: int
    objects: str = "none"  # the instance split done per finished plane (after any fallback)
    channel_note: str = ""  # what was done to fit the image's channels to the model ("channel 1 of 2", ...)
    rows: tuple[int, int] | None = None  # output rows along the first spatial axis (image coordinates); None: all

    @property
    def row_range(self) -> tuple[int, int]:
        """The output rows (image coordinates along the first spatial axis)."""
        return self.rows if self.rows is not None else (0, self.spatial_shape[0])

    @property
    def padded_rows(self) -> tuple[int, int]:
        """:attr:`row_range` in the padded plane's coordinates (those of the tiles and the blender)."""
        top = self.pad[0][0]
        return self.row_range[0] + top, self.row_range[1] + top

    @functools.cached_property
    def tile_list(self) -> list[tuple[slice, ...]]:
        """The tiles to run (raster order): all, or those touching ``rows``."""
        return self.tiles.rows_touching(*self.padded_rows) if self.rows is not None else list(self.tiles)

    @property
    def cue(self) -> bool:
        """Whether the network's instance cue is computed (a model with a cue computes it always)."""
        return self.net.config.has_cue

    @property
    def per_level(self) -> int:
        """Blended channels per level: the classes, plus the cue."""
        return self.num_classes + self.cue

    @property
    def num_classes(self) -> int:
        """Output classes of the network (1: sigmoid foreground)."""
        return int(self.net.config.num_classes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the mask: the image's shape without C, in the image's axis order."""
        first = self.lay.spatial[0]
        lo, hi = self.row_range
        return tuple(hi - lo if a == first else self.shape[self.lay.axes.index(a)] for a in self.lay.out_axes)

    @property
    def channels(self) -> int:
        """Blended channels per tile: classes (and cue) for each blended level, plus the ensemble's."""
        return (len(self.blend_levels) + (self.mode == "ensemble")) * self.per_level

    @property
    def total_tiles(self) -> int:
        """Tiles in the whole run."""
        return len(self.tile_list) * int(np.prod(self.loop_shape, dtype=np.int64))

    @property
    def batch_shape_tiles(self) -> int:
        """Tiles per batch of the whole image's run (a run of some rows counts as the whole run, so its runtime
        choice, and so its numbers, are the whole run's)."""
        whole = len(self.tiles) * int(np.prod(self.loop_shape, dtype=np.int64))
        return min(self.batch, whole)

    def allocate(self, allocate: Allocator | None = None) -> Prediction:
        """An empty :class:`~napari_unetpp.inference.result.Prediction` of the right shapes: ``allocate(shape,
        dtype, name)`` makes each array (default ``np.zeros``), ``name`` saying which: ``"mask"``, ``"L<k>"`` (level
        k's probabilities), ``"ensemble"``, ``"cue"``, ``"cue_L<k>"``, ``"objects"``."""
        return empty_prediction(
            self.out_shape,
            self.num_classes,
            self.keep_levels,
            self.mode,
            self.prob_dtype,
            cue=self.cue,
            objects=self.objects != "none",
            allocate=allocate,
            depth=self.depth,
            threshold=self.threshold,
            axes=self.lay.out_axes,
            ran_on=str(self.device),
            tiles=self.total_tiles,
            objects_method=self.objects,
            channels=self.channel_note,
        )

    def plane_indices(self) -> list[tuple[int, ...]]:
        """The planes' indices over the loop axes, in the order they run (``[()]`` for a single plane)."""
        return list(np.ndindex(*self.loop_shape)) if self.loop_shape else [()]

    def planes(self, reader: Callable[[tuple[int, ...]], Callable[[Any], Any]] | None = None) -> Iterator[Plane]:
        """The planes (or volumes) to run, keyed by their index over the loop axes, each reading its tiles from the
        image on its own (only the tile's pixels, reflected at the borders), checked and normalised; or, given
        ``reader(pidx)``, with the reader it makes (the device pipeline's views of its bands)."""
        lay = self.lay
        for pidx in self.plane_indices():
            if reader is not None:
                read = reader(pidx)
            else:
                read = self._reader(lay.src[pidx] if pidx else lay.src, f" in plane {pidx}" if pidx else "")
            yield Plane(pidx, self.tiles, read, self.tile_list, self.padded_rows)

    def _reader(self, plane: Any, where: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
        """``read(tile)``: the tile of ``plane`` (padded like the grid), ``(C, *tile)`` float32, normalised."""
        has_c, n_ch, edge = self.lay.has_c, self.lay.n_ch, min(self.spatial_shape) <= 1

        def read(sl: tuple[slice, ...]) -> np.ndarray:
            block = read_tile(plane, sl, self.pad, edge)
            if not has_c:
                block = block[None]
            check_pixels(block, where)
            return np.stack([self.norm.apply(block[c], self.stats[c]) for c in range(n_ch)])

        return read


def plan_prediction(
    image: Any,
    model: Any,
    *,
    axes: str | None = None,
    depth: int | None = None,
    mode: str = "pruned",
    levels: Iterable[int] | str | None = None,
    threshold: float = 0.5,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.125,
    batch_size: int | None = None,
    device: str | torch.device | None = "auto",
    normalization: Normalization | None = None,
    prob_dtype: str = "float16",
    stats: Sequence[tuple[float, float]] | None = None,
    objects: str = "none",
    channel: int | None = None,
    rows: tuple[int, int] | None = None,
) -> PredictionPlan:
    """Check the inputs and decide how to run them (arguments as for
    :func:`~napari_unetpp.inference.predict.predict_iter`, without ``precision``, ``runtime``, ``zoom``).

    Raises:
        InputError: wrong dimensions, axes, channel count or dtype, or non-finite values (one sentence).
    """
    loaded = resolve_model(model)
    dev = resolve_device(device)
    net = loaded.inference_module(dev)
    cfg = net.config
    norm = normalization or loaded.normalization
    k = net.check_depth(depth if depth is not None else loaded.card.recommended_depth)
    if mode not in ("pruned", "ensemble"):
        raise ValueError(f"mode must be 'pruned' or 'ensemble', got {mode!r}.")
    keep_levels = kept_levels(levels, k)
    objects = objects_split(objects, cfg)
    if prob_dtype not in ("float16", "float32", "uint8"):
        raise ValueError(f"prob_dtype must be float16, float32 or uint8, got {prob_dtype!r}.")
    if any(int(s) == 0 for s in image.shape):
        raise InputError(f"the image is empty (shape {tuple(image.shape)}).")
    if np.dtype(image.dtype).kind not in "biuf":
        raise InputError(f"cannot segment an image of dtype {image.dtype}; convert it to numbers first.")
    image, axes, channel_note = fit_channels(image, axes, cfg.spatial_dims, cfg.in_channels, channel)
    shape = tuple(int(s) for s in image.shape)  # the image the model reads (one channel chosen, RGB as grey)
    lay = layout(image, axes, cfg.spatial_dims)
    if lay.n_ch != cfg.in_channels:
        hint = "pick one channel (channel=N, --channel N)" if cfg.in_channels == 1 else "pick another model or image"
        if lay.has_c and "Z" not in axes and cfg.in_channels == 1:  # e.g. a few slices a TIFF calls samples
            zyx = axes.replace("C", "Z")
            hint += f", or if that axis is slices, give the axes (axes='{zyx}', --axes {zyx})"
        raise InputError(
            f"the model expects {cfg.in_channels} channel(s) but the image has {lay.n_ch}"
            f"{' (axis C)' if lay.has_c else ' (no C axis)'}; {hint}."
        )
    if stats is None:
        stats = image_stats(lay, norm)
    elif len(stats) != lay.n_ch:
        raise ValueError(f"stats has {len(stats)} entries for an image with {lay.n_ch} channel(s).")
    tile = tile if tile is not None else loaded.card.tile
    if tile is None:
        tile_t = default_tile(cfg.spatial_dims)
    elif isinstance(tile, (int, np.integer)):
        tile_t = (int(tile),) * cfg.spatial_dims
    else:
        tile_t = tuple(int(t) for t in tile)
    if len(tile_t) != cfg.spatial_dims:
        raise ValueError(f"tile needs {cfg.spatial_dims} sizes for a {cfg.spatial_dims}D model, got {tile_t}.")
    # Each plane is reflect-padded to a multiple of 2**max_depth (less along an axis pooled less: anisotropic 3D) and
    # tiles are multiples of it, so the network never pads inside a tile: whole-image and tiled runs see the same
    # image borders.
    sp_shape = tuple(shape[lay.axes.index(a)] for a in lay.spatial)
    pad, tiles = tile_grid(sp_shape, cfg.multiple, tile_t, overlap)
    return PredictionPlan(
        model=loaded,
        net=net,
        device=dev,
        depth=k,
        mode=mode,
        keep_levels=keep_levels,
        blend_levels=sorted(set(keep_levels) | ({k} if mode == "pruned" else set())),
        threshold=threshold,
        prob_dtype=prob_dtype,
        lay=lay,
        shape=shape,
        loop_shape=tuple(shape[lay.axes.index(a)] for a in lay.loop),
        spatial_shape=sp_shape,
        pad=pad,
        tiles=tiles,
        norm=norm,
        stats=list(stats),
        batch=batch_size or default_batch(tiles.tile_shape, dev.type),
        objects=objects,
        channel_note=channel_note,
        rows=_check_rows(rows, sp_shape[0], objects),
    )


def _check_rows(rows: tuple[int, int] | None, n: int, objects: str) -> tuple[int, int] | None:
    if rows is None:
        return None
    lo, hi = int(rows[0]), int(rows[1])
    if not 0 <= lo < hi <= n:
        raise ValueError(f"rows must satisfy 0 <= start < stop <= {n}, got {rows}.")
    if objects != "none":
        raise InputError("objects need whole planes or volumes; predict them without rows=.")
    return None if (lo, hi) == (0, n) else (lo, hi)


def objects_split(objects: str, cfg: Any) -> str:
    """The instance split to run: checks the name; ``learned`` on a model without a cue becomes ``watershed``."""
    objects = instance_method(objects)
    if objects != "none" and cfg.num_classes != 1:
        raise InputError("instance labels need a 1-class model; this one has classes (use objects='none').")
    if objects == "learned" and not cfg.has_cue:
        log.info("this model has no learned object cue; splitting touching objects with the watershed instead")
        return "watershed"
    return objects


def image_stats(lay: Layout, norm: Normalization) -> list[tuple[float, float]]:
    """Normalisation statistics of each channel of the laid-out image (over the whole stack)."""
    n_loop = len(lay.loop)
    return [norm.bounds(lay.src[(slice(None),) * n_loop + (c,)] if lay.has_c else lay.src) for c in range(lay.n_ch)]


def kept_levels(levels: Iterable[int] | str | None, k: int) -> list[int]:
    """The levels whose probabilities a run keeps: ``None`` -> ``[k]``, ``"all"`` -> 1..k, else the given ones
    (checked to lie in 1..k)."""
    if levels is None:
        return [k]
    if isinstance(levels, str):
        if levels != "all":
            raise ValueError(f"levels must be None, 'all' or a list of levels, got {levels!r}.")
        return list(range(1, k + 1))
    out = sorted({int(lv) for lv in levels})
    if not out:
        return []
    if out[0] < 1 or out[-1] > k:
        raise ValueError(f"levels must lie in 1..{k} (the depth computed), got {out}.")
    return out
