"""Prediction on images, stacks and volumes: normalise -> tile -> pruned UNet++ -> blend -> per-level outputs.

Where the depth flows: :func:`predict_iter` takes ``depth=k`` (default: the card's recommended depth); the plan
keeps it, :class:`_Runner` calls ``net(tiles, depth=k)``, which evaluates only the nodes X(i, j) with i + j <= k and
returns heads 1..k; the plane writer blends the kept levels and makes the mask from head k (or the mean of heads
1..k in ``"ensemble"`` mode).

Three parts, in reading order:
- :func:`plan_prediction` checks the inputs and decides everything up front: axes, depth, levels, tile grid, padding,
  normalisation statistics, batch size;
- :class:`PlaneWriter` receives blended rows of a plane and writes probabilities and the mask into the result;
- :func:`predict_iter` is the short loop: read tiles lazily, run batches, blend, yield :class:`Progress`.

:func:`predict_iter` is a generator that yields :class:`Progress` after every batch of tiles and returns a
:class:`Prediction`; :func:`predict` runs it to the end. Closing the generator stops the work before the next batch
and nothing is returned, so no half-written result reaches the caller. Planes announced in ``Progress.planes_done``
are complete in ``Progress.partial`` (that is how the napari widget streams results into its layers).

Axes use the letters T (time), C (channel), Z, Y, X (see :mod:`napari_unetpp.data.axes`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from napari_unetpp.data.axes import Layout, fit_channels, guess_axes, layout
from napari_unetpp.data.normalization import Normalization, check_pixels
from napari_unetpp.errors import InputError
from napari_unetpp.inference.masks import mask_from
from napari_unetpp.inference.postprocess import instance_method, split_instances
from napari_unetpp.inference.tiling import (
    Blender,
    TilePlan,
    default_batch,
    default_tile,
    gaussian_weights,
    padding_for,
    read_tile,
)
from napari_unetpp.jobs import run_to_end
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import LoadedModel, resolve_model
from napari_unetpp.runtimes.backends import (
    Backend,
    RuntimeUnavailable,
    hold_cores,
    make_backend,
    release_later,
    runtime_failed,
    torch_instead,
)
from napari_unetpp.runtimes.device import is_oom, release_memory, resolve_device

__all__ = [
    "Progress",
    "Prediction",
    "PredictionPlan",
    "PlaneWriter",
    "predict",
    "predict_iter",
    "plan_prediction",
    "guess_axes",
    "InputError",
    "normalization_stats",
]

log = logging.getLogger(__name__)
Allocator = Callable[[tuple[int, ...], str, str], Any]


@dataclass
class Prediction:
    """Result of :func:`predict`.

    Attributes:
        mask: Binary mask (0/1, uint8) for 1-class models or class labels for multi-class models, with the image's
            axes minus C (``axes``).
        probabilities: Level -> probability map (``prob_dtype``); binary models: same shape as ``mask``;
            multi-class: ``(classes, *mask.shape)``.
        ensemble: Mean of heads 1..k (the paper's accurate mode), when computed.
        depth: The level k that produced ``mask`` (with ``mode``).
        mode: ``"pruned"`` (head k alone) or ``"ensemble"`` (mean of heads 1..k).
        threshold: Foreground threshold used for 1-class models.
        axes: Axes of ``mask``.
        seconds: Wall-clock time of the run.
        device: Where and how the network ran, and why: e.g. ``"CPU · ONNX Runtime fp32 (1.52x PyTorch on this
            CPU at L4, batches of 4x512x512)"`` (see :mod:`napari_unetpp.runtimes.backends`).
        tiles: Number of tiles evaluated.
        cue: The instance cue (probability in [0, 1]) of the level (or ensemble) that made ``mask``, for a model
            with a cue (see :class:`~napari_unetpp.model.network.UNetPlusPlusConfig`); else None.
        cues: Level -> cue map for the kept levels, for a model with a cue.
        objects: Instance labels (uint32, unique across the whole array) when ``objects`` was asked for.
        objects_method: The split that made ``objects`` (``"learned"`` falls back to ``"watershed"`` for a model
            without a cue), or ``"none"``.
        channels: How the image's channels were fitted to the model: ``"channel N of M"``, ``"RGB as grey
            (luminance)"``, or ``""`` (as they were).
        objects_count: The largest object ID in ``objects`` (the number of objects).
        runtime: What ran the network: ``"torch"``, ``"onnx"`` (ONNX Runtime fp32), ``"openvino"`` (OpenVINO fp32)
            or ``"onnx-int8"``.
    """

    mask: np.ndarray
    probabilities: dict[int, np.ndarray]
    ensemble: np.ndarray | None
    depth: int
    mode: str
    threshold: float
    axes: str
    seconds: float = 0.0
    device: str = "cpu"
    tiles: int = 0
    cue: np.ndarray | None = None
    cues: dict[int, np.ndarray] = field(default_factory=dict)
    objects: np.ndarray | None = None
    objects_method: str = "none"
    channels: str = ""
    objects_count: int = 0
    runtime: str = "torch"


@dataclass
class Progress:
    """Progress of :func:`predict_iter`.

    Attributes:
        done: Tiles evaluated so far.
        total: Tiles in the whole run.
        planes_done: Indices (over the non-spatial, non-channel axes) of the planes completed since the last report.
        partial: The result being filled; the planes reported done are final in it.
    """

    done: int
    total: int
    planes_done: list[tuple[int, ...]] = field(default_factory=list)
    partial: Prediction | None = None

    @property
    def fraction(self) -> float:
        """Completed fraction in [0, 1]."""
        return self.done / max(self.total, 1)


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class PredictionPlan:
    """Everything :func:`predict_iter` decided before the first tile: see :func:`plan_prediction`."""

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
        """An empty :class:`Prediction` of the right shapes: ``allocate(shape, dtype, name)`` makes each array
        (default ``np.zeros``), ``name`` saying which: ``"mask"``, ``"L<k>"`` (level k's probabilities),
        ``"ensemble"``, ``"cue"``, ``"cue_L<k>"``, ``"objects"``."""
        alloc = allocate or (lambda shape, dtype, name: np.zeros(shape, dtype))
        nc, shape = self.num_classes, self.out_shape
        pshape = shape if nc == 1 else (nc, *shape)
        return Prediction(
            mask=alloc(shape, "uint8" if nc <= 255 else "uint16", "mask"),
            probabilities={lv: alloc(pshape, self.prob_dtype, f"L{lv}") for lv in self.keep_levels},
            ensemble=alloc(pshape, self.prob_dtype, "ensemble") if self.mode == "ensemble" else None,
            depth=self.depth,
            mode=self.mode,
            threshold=self.threshold,
            axes=self.lay.out_axes,
            device=str(self.device),
            tiles=self.total_tiles,
            cue=alloc(shape, self.prob_dtype, "cue") if self.cue else None,
            cues={lv: alloc(shape, self.prob_dtype, f"cue_L{lv}") for lv in self.keep_levels} if self.cue else {},
            objects=alloc(shape, "uint32", "objects") if self.objects != "none" else None,
            objects_method=self.objects,
            channels=self.channel_note,
        )


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
    """Check the inputs and decide how to run them (arguments as for :func:`predict_iter`, without ``precision``).

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
    keep_levels = _levels(levels, k)
    objects = _objects_method(objects, cfg)
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
        stats = _stats(lay, norm)
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
    # Each plane is reflect-padded to a multiple of 2**max_depth and tiles are multiples of it, so the network never
    # pads inside a tile: whole-image and tiled runs see the same image borders.
    mult = net.config.multiple  # 2**max_depth per axis, less along an axis pooled less (anisotropic 3D)
    sp_shape = tuple(shape[lay.axes.index(a)] for a in lay.spatial)
    pad = padding_for(sp_shape, mult)
    padded = tuple(n + a + b for n, (a, b) in zip(sp_shape, pad))
    tile_t = tuple(max(m, t // m * m) for t, m in zip(tile_t, mult))
    tiles = TilePlan(padded, tile_t, overlap, align=mult)
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
        batch=batch_size or _default_batch(tiles.tile_shape, dev),
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


# ---------------------------------------------------------------------------------------------------- the writer
class PlaneWriter:
    """Writes the blended rows of each plane into a :class:`Prediction`: the kept levels' probabilities, the
    ensemble, and the mask (threshold or argmax of head k, or of the ensemble)."""

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

    def sink(self, pidx: tuple[int, ...]) -> Callable[[int, int, np.ndarray], None]:
        """The callback a plane's :class:`~napari_unetpp.inference.tiling.Blender` hands its finished rows to."""
        return functools.partial(self.write_rows, pidx)

    def write_rows(self, pidx: tuple[int, ...], a: int, b: int, vals: np.ndarray) -> None:
        """Rows ``a:b`` of the padded plane ``pidx`` (``(channels, rows, ...)`` blended values) -> the outputs,
        with the padding cropped off."""
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
        self._mask[pidx][a:b] = mask_from(chosen[0] if nc == 1 else chosen[:nc], nc, plan.threshold)

    def split_plane(self, pidx: tuple[int, ...]) -> None:
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

    def _store(self, view: Any, pidx: tuple[int, ...], a: int, b: int, vals: np.ndarray) -> None:
        vals = _as_prob(vals, self.plan.prob_dtype)
        if len(vals) == 1:
            view[pidx][a:b] = vals[0]
        else:
            view[(slice(None), *pidx)][:, a:b] = vals


# ---------------------------------------------------------------------------------------------------- the loop
def predict_iter(
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
    precision: str = "auto",
    normalization: Normalization | None = None,
    prob_dtype: str = "float16",
    stats: Sequence[tuple[float, float]] | None = None,
    allocate: Allocator | None = None,
    objects: str = "none",
    channel: int | None = None,
    zoom: Sequence[float] | None = None,
    rows: tuple[int, int] | None = None,
    runtime: str = "auto",
) -> Generator[Progress, None, Prediction]:
    """Segment ``image``, yielding :class:`Progress` after each batch; return the :class:`Prediction`.

    Args:
        image: numpy array, memmap or dask array (read tile by tile; never loaded whole).
        model: A :class:`~napari_unetpp.model.registry.LoadedModel`, a model name or file path, or a ``UNetPlusPlus``.
        axes: Letters from TCZYX describing ``image`` (default: :func:`~napari_unetpp.data.axes.guess_axes`).
        depth: Pruned depth k in 1..max_depth (default: the model card's recommended depth, else the maximum).
            Only the nodes with i + j <= k are computed.
        mode: ``"pruned"`` (default; mask from head k) or ``"ensemble"`` (mask from the mean of heads 1..k).
        levels: Levels whose probability maps to keep: ``None`` (default: k only), ``"all"`` (1..k), a list
            of levels <= k, or ``()`` for the mask alone (least memory). Heads 1..k come from the same depth-k
            pass, so extra levels cost no extra convolution.
        threshold: Foreground threshold for 1-class models (default 0.5).
        tile: Largest tile per spatial axis, int or tuple (default: the card's, else 1024 in 2D, 96 in 3D). Planes
            that fit are processed whole; larger ones get the fewest tiles that cover them, shrunk evenly.
        overlap: Minimum tile overlap as a fraction of ``tile`` (default 0.125: 128 pixels of a 1024 tile).
        batch_size: Tiles per forward pass (default: from a memory budget for the device).
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"mps"``.
        precision: ``"auto"`` (default: bf16 on capable CPUs, fp16 on GPUs, else fp32), ``"fp32"``, ``"bf16"``,
            ``"fp16"``, or ``"int8"`` (CPU: the model's statically quantised copy in ONNX Runtime, see
            :mod:`napari_unetpp.runtimes.int8`; faster, not exact).
        normalization: Override the model card's normalisation.
        prob_dtype: ``"float16"`` (default), ``"float32"`` or ``"uint8"`` (probability x 255).
        stats: Normalisation statistics per channel from :func:`normalization_stats` of a larger image (default:
            computed from ``image``). Pass the stack's statistics when predicting one of its slices, so the slice
            matches the whole-stack result.
        allocate: ``allocate(shape, dtype, name)`` makes each output array (default ``np.zeros``; names in
            :meth:`PredictionPlan.allocate`): e.g. a memory map, or
            :class:`~napari_unetpp.io.zarr.OmeZarrOutputs` to write OME-Zarr chunk by chunk, for outputs larger
            than memory.
        objects: Instance labels in ``Prediction.objects``: ``"none"`` (default), ``"components"``, ``"watershed"``
            or ``"learned"`` (seeds from the model's distance cue; a model without one falls back to
            ``"watershed"``, and ``Prediction.objects_method`` says so). Split per plane for 2D
            models (IDs unique across the stack), per volume for 3D ones. 1-class models only.
        channel: For a 1-channel model and a multi-channel image: segment channel N of its C axis (read lazily).
            Without it, an RGB(A) image is read as its luminance; other multi-channel images need it.
        zoom: Resample factor per spatial axis before the network (> 1 enlarges), the outputs resampled back to the
            image's shape (probabilities linearly, the mask from them, objects by nearest neighbour): brings an
            image to the model's pixel size (see :func:`napari_unetpp.data.scale.zoom_for`). The resampled image is
            held in memory. Planes are announced done only at the end.
        rows: ``(start, stop)``: only these rows along the first spatial axis (Y of a 2D model, Z of a 3D one) are
            computed and returned (the outputs have ``stop - start`` of them). Only the tiles touching them run,
            with the statistics given in ``stats``, so they equal the same rows of a whole-image run exactly: how a
            volume is split over a cluster. Not with objects or zoom.
        runtime: ``"auto"`` (default: in fp32 on the CPU, PyTorch, ONNX Runtime or OpenVINO, whichever measured
            fastest on this machine for this level; see :func:`napari_unetpp.runtimes.backends.choose`), ``"torch"``,
            ``"onnx"`` or ``"openvino"``.

    Raises:
        InputError: wrong dimensions, axes or channel count, or non-finite values (a one-sentence message).
    """
    t_start = time.perf_counter()
    kw: dict[str, Any] = dict(
        axes=axes,
        depth=depth,
        mode=mode,
        levels=levels,
        threshold=threshold,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        normalization=normalization,
        prob_dtype=prob_dtype,
        stats=stats,
        objects=objects,
        channel=channel,
    )
    if zoom is not None and any(abs(float(f) - 1.0) > 1e-6 for f in zoom):
        if rows is not None:
            raise ValueError("rows= and zoom= do not go together; resample first, or predict whole planes.")
        result = yield from _zoomed_iter(
            image, model, zoom, {**kw, "precision": precision, "runtime": runtime}, allocate
        )
        result.seconds = time.perf_counter() - t_start
        return result
    plan = plan_prediction(image, model, rows=rows, **kw)
    result = plan.allocate(allocate)
    writer = PlaneWriter(plan, result)
    backend = make_backend(
        plan.model,
        plan.net,
        plan.depth,
        plan.device,
        precision,
        plan.tiles.tile_shape,
        runtime,
        plan.batch_shape_tiles,
    )
    fallback = None
    if backend.choice.runtime in ("onnx", "openvino", "auto") and runtime == "auto":

        def fallback(exc: BaseException) -> Backend:
            return torch_instead(runner.backend, exc, plan.net, plan.depth, plan.device)

    runner = _Runner(backend, plan.device, plan.batch, fallback)
    weights = gaussian_weights(plan.tiles.tile_shape) if len(plan.tiles) > 1 else None  # shared by every plane
    blenders: dict[tuple[int, ...], Blender] = {}
    remaining: dict[tuple[int, ...], int] = {}
    done = 0
    try:
        for items in _batches(_tiles(plan), runner.batch):
            probs = runner.probs(np.stack([t for _, _, t in items]))  # (B, k, classes, ...)
            finished = []
            for (pidx, sl, _), pr in zip(items, probs):
                if pidx not in blenders:
                    blenders[pidx] = Blender(plan.tiles, plan.channels, writer.sink(pidx), weights, plan.padded_rows)
                    remaining[pidx] = len(plan.tile_list)
                chans = [pr[lv - 1] for lv in plan.blend_levels] + (
                    [pr.mean(axis=0)] if plan.mode == "ensemble" else []
                )
                blenders[pidx].add(sl, np.concatenate(chans, axis=0))
                remaining[pidx] -= 1
                if remaining[pidx] == 0:
                    blenders.pop(pidx).finish()
                    writer.split_plane(pidx)
                    finished.append(pidx)
            done += len(items)
            yield Progress(done, plan.total_tiles, finished, result)
    finally:  # finished, failed or cancelled: give cached accelerator memory back
        runner.close()
        if plan.device.type != "cpu":
            release_memory(plan.device)
        elif min(plan.batch, plan.total_tiles) * int(np.prod(plan.tiles.tile_shape)) > _KEEP_ARENA:
            release_later(runner.backend)  # in RELEASE_AFTER_S, so that back-to-back runs keep it
    result.device, result.runtime = runner.backend.choice.describe(plan.device), runner.backend.choice.runtime
    log.info("L%d ran on %s", plan.depth, result.device)
    result.seconds = time.perf_counter() - t_start
    return result


def _zoomed_iter(
    image: Any, model: Any, zoom: Sequence[float], kw: dict[str, Any], allocate: Allocator | None
) -> Generator[Progress, None, Prediction]:
    """:func:`predict_iter` on ``image`` resampled by ``zoom``, the outputs resampled back (see its ``zoom``)."""
    from napari_unetpp.data.scale import check_zoom_fits, resize_plane, zoomed_shape

    loaded = resolve_model(model)
    cfg = loaded.module.config
    src, axes, _ = fit_channels(image, kw.pop("axes"), cfg.spatial_dims, cfg.in_channels, kw.pop("channel"))
    lay = layout(src, axes, cfg.spatial_dims)
    if len(zoom) != len(lay.spatial):
        raise ValueError(f"zoom needs {len(lay.spatial)} factors (axes {lay.spatial}), got {tuple(zoom)}.")
    norm = kw.get("normalization") or loaded.normalization
    if kw.get("stats") is None:
        kw["stats"] = _stats(lay, norm)  # of the image as it is, so resampling does not move the statistics
    sp = tuple(int(lay.src.shape[len(lay.loop) + lay.has_c + i]) for i in range(len(lay.spatial)))
    zsp = zoomed_shape(sp, zoom)
    loop_shape = tuple(int(n) for n in lay.src.shape[: len(lay.loop)])
    chans = (lay.n_ch,) if lay.has_c else ()
    inner_axes = "".join(lay.loop) + ("C" if lay.has_c else "") + lay.spatial
    depth = kw.pop("depth")
    k = loaded.module.check_depth(depth if depth is not None else loaded.card.recommended_depth)
    wanted = _levels(kw.pop("levels"), k)
    mode = kw["mode"]
    inner_levels = sorted(set(wanted) | ({k} if mode == "pruned" else set()))
    # before allocating: the resampled image (float32 per channel) and what predict computes on it (float32
    # probabilities per class of each level kept and of the ensemble, the mask) must fit in memory
    n_maps = len(inner_levels) + (mode == "ensemble")
    check_zoom_fits((*loop_shape, *sp), zoom, 4 * lay.n_ch + 4 * cfg.num_classes * n_maps + 1)
    small = np.empty((*loop_shape, *chans, *zsp), np.float32)
    for pidx in np.ndindex(*loop_shape) if loop_shape else [()]:
        plane = np.asarray(lay.src[pidx] if pidx else lay.src, dtype=np.float32)
        check_pixels(plane, f" in plane {pidx}" if pidx else "")
        small[pidx] = resize_plane(plane, zsp, order=1)
    prob_dtype = kw.pop("prob_dtype")
    gen = predict_iter(small, loaded, axes=inner_axes, depth=k, levels=inner_levels, prob_dtype="float32", **kw)
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            inner: Prediction = stop.value
            break
        yield Progress(p.done, p.total + 1)  # the resampling back is the last step
    # back to the image's shape, and its axis order (the outputs follow lay.out_axes)
    nc = cfg.num_classes
    out_axes = lay.out_axes
    perm = [inner.axes.index(a) for a in out_axes]
    out_shape = tuple((*loop_shape, *sp)[i] for i in perm)
    alloc = allocate or (lambda shape, dtype, name: np.zeros(shape, dtype))
    pshape = out_shape if nc == 1 else (nc, *out_shape)
    res = Prediction(
        mask=alloc(out_shape, "uint8" if nc <= 255 else "uint16", "mask"),
        probabilities={lv: alloc(pshape, prob_dtype, f"L{lv}") for lv in wanted},
        ensemble=alloc(pshape, prob_dtype, "ensemble") if mode == "ensemble" else None,
        depth=inner.depth,
        mode=inner.mode,
        threshold=inner.threshold,
        axes=out_axes,
        device=inner.device,
        runtime=inner.runtime,
        tiles=inner.tiles,
        cue=alloc(out_shape, prob_dtype, "cue") if inner.cue is not None else None,
        cues={lv: alloc(out_shape, prob_dtype, f"cue_L{lv}") for lv in wanted if lv in inner.cues},
        objects=alloc(out_shape, "uint32", "objects") if inner.objects is not None else None,
        objects_method=inner.objects_method,
        channels=inner.channels,
        objects_count=inner.objects_count,
    )

    def view(arr: Any, classes: bool) -> Any:  # an output in (loop..., spatial...) order, as the inner arrays are
        order = [out_axes.index(a) for a in inner.axes]
        return arr.transpose([0, *[o + 1 for o in order]] if classes else order)

    chosen_src: Any = inner.ensemble if mode == "ensemble" else inner.probabilities[k]
    multi = nc > 1
    for pidx in np.ndindex(*loop_shape) if loop_shape else [()]:
        cix = (slice(None), *pidx)
        for lv in wanted:
            src_p = inner.probabilities[lv][cix] if multi else inner.probabilities[lv][pidx]
            dst = view(res.probabilities[lv], multi)
            dst[cix if multi else pidx] = _as_prob(resize_plane(np.asarray(src_p), sp, 1), prob_dtype)
        if res.ensemble is not None and inner.ensemble is not None:
            e = resize_plane(np.asarray(inner.ensemble[cix] if multi else inner.ensemble[pidx]), sp, 1)
            view(res.ensemble, multi)[cix if multi else pidx] = _as_prob(e, prob_dtype)
        c = resize_plane(np.asarray(chosen_src[cix] if multi else chosen_src[pidx], np.float32), sp, 1)
        view(res.mask, False)[pidx] = mask_from(c, c.shape[0] if multi else 1, inner.threshold)
        if res.cue is not None and inner.cue is not None:
            view(res.cue, False)[pidx] = _as_prob(resize_plane(np.asarray(inner.cue[pidx]), sp, 1), prob_dtype)
        for lv, cu in res.cues.items():
            view(cu, False)[pidx] = _as_prob(resize_plane(np.asarray(inner.cues[lv][pidx]), sp, 1), prob_dtype)
        if res.objects is not None and inner.objects is not None:
            view(res.objects, False)[pidx] = resize_plane(np.asarray(inner.objects[pidx]), sp, 0)
    done = inner.tiles + 1
    planes = list(np.ndindex(*loop_shape)) if loop_shape else [()]
    yield Progress(done, done, [tuple(int(i) for i in p) for p in planes], res)
    return res


def _as_prob(p: np.ndarray, prob_dtype: str) -> np.ndarray:
    """float32 probabilities in an output's dtype (``uint8``: 0-255, rounded half to even), made before they are
    written: assigning float32 into a uint8 or float16 array casts element by element (1.7-1.8 ms for a 512^2 plane
    on an AVX2 CPU). float16 is cast by torch (vectorised, 0.05 ms), uint8 by NumPy's ufuncs (0.2 ms; torch's took
    0.35). With every level kept this was most of predict's time outside the network."""
    p = np.asarray(p, np.float32)
    if prob_dtype == "uint8":
        return np.clip(np.rint(p * 255.0), 0, 255).astype(np.uint8)
    if prob_dtype == "float16":
        return torch.from_numpy(p if p.flags.writeable else p.copy()).to(torch.float16).numpy()
    return p


def predict(image: Any, model: Any, **kwargs: Any) -> Prediction:
    """Run :func:`predict_iter` to the end and return its :class:`Prediction` (same arguments)."""
    return run_to_end(predict_iter(image, model, **kwargs))


def normalization_stats(
    image: Any,
    model: Any,
    axes: str | None = None,
    normalization: Normalization | None = None,
    channel: int | None = None,
) -> list[tuple[float, float]]:
    """Per-channel normalisation statistics of ``image`` under ``model``'s recipe (see ``predict_iter(stats=...)``),
    of the channels the model reads (``channel`` and RGB as in :func:`predict_iter`).

    Raises:
        InputError: bad axes or channels, or non-finite values.
    """
    loaded = resolve_model(model)
    cfg = loaded.module.config
    image, axes, _ = fit_channels(image, axes, cfg.spatial_dims, cfg.in_channels, channel)
    lay = layout(image, axes, cfg.spatial_dims)
    return _stats(lay, normalization or loaded.normalization)


# ---------------------------------------------------------------------------------------------------- helpers
class _Runner:
    """Runs batches of tiles through the model at depth k (with its cue, when it has one) on the backend
    :func:`~napari_unetpp.runtimes.backends.make_backend` chose; halves the batch on out-of-memory (recognised strictly:
    :func:`~napari_unetpp.runtimes.device.is_oom`). Another failure of a runtime other than PyTorch runs the rest on
    ``fallback(exc)`` (PyTorch) in an auto run, and is a one-sentence error where that runtime was asked for. A CPU
    run holds the cores (:func:`~napari_unetpp.runtimes.backends.hold_cores`) until :meth:`close`, so no runtime is
    measured
    meanwhile on another thread."""

    def __init__(
        self,
        backend: Backend,
        device: torch.device,
        batch: int,
        fallback: Callable[[BaseException], Backend] | None = None,
    ) -> None:
        self.backend, self.device, self.batch, self.fallback = backend, device, batch, fallback
        self._cores = hold_cores() if device.type == "cpu" else None

    def close(self) -> None:
        """The run is over: the cores are free."""
        if self._cores is not None:
            self._cores.release()

    def probs(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, *tile)`` float32 input -> ``(B, k, classes [+ cue], *tile)`` float32 probabilities."""
        outs = []
        i = 0
        while i < len(x):
            chunk = x[i : i + self.batch]
            try:
                outs.append(self._forward(chunk))
                i += len(chunk)
                continue
            except (RuntimeError, MemoryError) as exc:
                if not is_oom(exc):
                    if self.backend.choice.runtime == "torch" or isinstance(exc, RuntimeUnavailable):
                        raise
                    if self.fallback is None:
                        raise runtime_failed(self.backend, exc) from exc
                    self.backend, self.fallback = self.fallback(exc), None
                    continue
                if self.batch == 1:
                    raise MemoryError(
                        "out of memory even for a single tile; choose a smaller tile size (--tile) or the CPU."
                    ) from exc
            release_memory(self.device)  # out of memory: once the exception (and the tensors it holds) is gone
            self.batch = max(1, self.batch // 2)
            log.warning("out of memory: retrying with %d tile(s) per batch", self.batch)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        return self.backend(chunk)


def _objects_method(objects: str, cfg: Any) -> str:
    """The instance split to run: checks the name; ``learned`` on a model without a cue becomes ``watershed``."""
    objects = instance_method(objects)
    if objects != "none" and cfg.num_classes != 1:
        raise InputError("instance labels need a 1-class model; this one has classes (use objects='none').")
    if objects == "learned" and not cfg.has_cue:
        log.info("this model has no learned object cue; splitting touching objects with the watershed instead")
        return "watershed"
    return objects


# ONNX Runtime (and OpenVINO) keep their memory between runs when a run's batches are at most one 512 x 512 tile (at
# most ~320 MB at L4): a slider preview then runs 20-50 % faster than after a release. Larger runs give it back a few
# seconds after they end, unless another run comes first (backends.release_later).
_KEEP_ARENA = 512 * 512


def _default_batch(tile_shape: Sequence[int], device: torch.device) -> int:
    return default_batch(tile_shape, device.type)


def _stats(lay: Layout, norm: Normalization) -> list[tuple[float, float]]:
    n_loop = len(lay.loop)
    return [
        norm.compute_stats(lay.src[(slice(None),) * n_loop + (c,)] if lay.has_c else lay.src) for c in range(lay.n_ch)
    ]


def _levels(levels: Iterable[int] | str | None, k: int) -> list[int]:
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


def _tiles(plan: PredictionPlan) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...], np.ndarray]]:
    """(plane index, tile slices, normalised ``(C, *tile)`` float32) in plane then raster order. Tiles index the
    padded plane; each is read from the image on its own (only its pixels, reflected at the borders)."""
    lay, n_ch = plan.lay, plan.lay.n_ch
    edge = min(plan.spatial_shape) <= 1
    for pidx in np.ndindex(*plan.loop_shape) if plan.loop_shape else [()]:
        plane = lay.src[pidx] if pidx else lay.src
        for sl in plan.tile_list:
            block = read_tile(plane, sl, plan.pad, edge)
            if not lay.has_c:
                block = block[None]
            check_pixels(block, f" in plane {pidx}" if pidx else "")
            yield pidx, sl, np.stack([plan.norm.apply(block[c], plan.stats[c]) for c in range(n_ch)])


def _batches(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
