"""Prediction on images, stacks and volumes: normalise -> tile -> pruned UNet++ -> blend -> per-level outputs.

:func:`predict_iter` is a generator that yields :class:`Progress` after every batch of tiles and returns a
:class:`Prediction`; :func:`predict` drains it. Closing the generator stops the work before the next batch and
nothing is returned, so no half-written result reaches the caller. Planes announced in ``Progress.planes_done``
are complete in ``Progress.partial`` (that is how the napari widget streams results into its layers).

Axes use the letters T (time), C (channel), Z, Y, X. A 2D model runs plane by plane over every axis but Y, X and C;
a 3D model runs on 3D patches of Z, Y, X for every T.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .device import autocast_context, resolve_device
from .model import UNetPlusPlus
from .normalization import NonFiniteInputError, Normalization
from .tiling import Blender, TilePlan, gaussian_weights

__all__ = ["Progress", "Prediction", "predict", "predict_iter", "guess_axes", "optimize_for_inference",
           "InputError", "normalization_stats", "memory_format"]

log = logging.getLogger(__name__)
AXES_LETTERS = "TCZYX"


class InputError(ValueError):
    """The image cannot be segmented by this model as given (dimensions, axes, channels, values)."""


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
        device: Device description.
        tiles: Number of tiles evaluated.
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


def guess_axes(shape: Sequence[int], spatial_dims: int = 2) -> str:
    """Axes for an array without an explicit description: YX, ZYX, YXC (RGB) or TZYX.

    Raises:
        InputError: when the guess would be ambiguous (5-D, or 4-D with channels).
    """
    nd = len(shape)
    if nd == 2:
        return "YX"
    if nd == 3:
        return "YXC" if shape[-1] in (3, 4) and spatial_dims == 2 and shape[0] > 4 else "ZYX"
    if nd == 4:
        return "TZYX"
    raise InputError(f"cannot guess the axes of a {nd}-D image of shape {tuple(shape)}; pass axes such as "
                     f"'TCZYX'.")


def _check_axes(axes: str, shape: Sequence[int], spatial_dims: int) -> str:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"axes {axes!r} do not match an image with {len(shape)} dimensions {tuple(shape)}.")
    if len(set(axes)) != len(axes) or any(a not in AXES_LETTERS for a in axes):
        raise InputError(f"axes {axes!r} must use each of the letters T, C, Z, Y, X at most once.")
    need = "ZYX" if spatial_dims == 3 else "YX"
    missing = [a for a in need if a not in axes]
    if missing:
        what = "a 3D model needs a Z axis (a volume)" if spatial_dims == 3 and missing == ["Z"] else \
            f"the image needs axes {need}"
        raise InputError(f"{what}; this image has axes {axes!r}.")
    return axes


@dataclass
class _Layout:
    """How an image's axes map onto the model: loop axes, channel axis, spatial axes, and the transposed view."""

    axes: str
    spatial: str
    loop: list[str]
    n_ch: int
    src: Any

    @property
    def has_c(self) -> bool:
        return "C" in self.axes


def _layout(image: Any, axes: str | None, spatial_dims: int) -> _Layout:
    shape = tuple(int(s) for s in image.shape)
    axes = _check_axes(axes or guess_axes(shape, spatial_dims), shape, spatial_dims)
    spatial = "ZYX" if spatial_dims == 3 else "YX"
    loop = [a for a in axes if a not in spatial and a != "C"]
    n_ch = shape[axes.index("C")] if "C" in axes else 1
    order = [axes.index(a) for a in loop] + ([axes.index("C")] if "C" in axes else []) + \
        [axes.index(a) for a in spatial]
    src = image.transpose(order) if order != list(range(len(axes))) else image
    return _Layout(axes, spatial, loop, n_ch, src)


def optimize_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy on ``device`` with batch norms folded into the preceding convolutions, in channels-last
    memory format on CPU and CUDA.

    Folding removes a memory pass per convolution; the result is numerically the eval-mode model. Channels-last
    halved the forward time on this project's benchmark CPU (bf16 and fp32, 2D and 3D). Inputs must be given in
    the same format: see :func:`memory_format`.
    """
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod._modules.items())
            for (na, a), (nb, b) in zip(items, items[1:]):
                if isinstance(a, (nn.Conv2d, nn.Conv3d)) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    mod._modules[na] = torch.nn.utils.fusion.fuse_conv_bn_eval(a, b)
                    mod._modules[nb] = nn.Identity()
    m = m.to(device)
    fmt = memory_format(m, device)
    if fmt is not torch.contiguous_format:
        m = m.to(memory_format=fmt)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The memory format inference runs in: channels-last (2D or 3D) on CPU and CUDA, contiguous elsewhere."""
    if device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    dims = getattr(getattr(model, "config", None), "spatial_dims", 2)
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def _default_tile(spatial_dims: int) -> tuple[int, ...]:
    return (1024, 1024) if spatial_dims == 2 else (96, 96, 96)


def _default_batch(tile_shape: Sequence[int], device: torch.device) -> int:
    budget = (2 ** 20 if device.type == "cpu" else 2 ** 22) if len(tile_shape) == 2 else \
        (2 ** 20 if device.type == "cpu" else 2 ** 22)
    return max(1, budget // int(np.prod(tile_shape)))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


class _Runner:
    """Runs batches of tiles through the model at depth k; halves the batch on out-of-memory."""

    def __init__(self, model: nn.Module, depth: int, device: torch.device, precision: str, batch: int) -> None:
        self.model, self.depth, self.device, self.precision, self.batch = model, depth, device, precision, batch
        self.sigmoid = model.config.num_classes == 1
        self.fmt = memory_format(model, device)

    def probs(self, x: np.ndarray) -> np.ndarray:
        """``(B, C, *tile)`` float32 input -> ``(B, k, classes, *tile)`` float32 probabilities."""
        outs = []
        i = 0
        while i < len(x):
            chunk = x[i:i + self.batch]
            try:
                outs.append(self._forward(chunk))
                i += len(chunk)
            except (RuntimeError, MemoryError) as exc:
                if not _is_oom(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch == 1:
                    raise MemoryError("out of memory even for a single tile; choose a smaller tile size "
                                      "(--tile) or the CPU.") from exc
                self.batch = max(1, self.batch // 2)
                log.warning("out of memory: retrying with %d tile(s) per batch", self.batch)
        return np.concatenate(outs)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            t = torch.from_numpy(chunk).to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
            logits = torch.stack(self.model(t, depth=self.depth), dim=1).float()  # (B, k, classes, ...)
            p = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=2)
            return p.cpu().numpy()


def _resolve_model(model: Any) -> Any:
    """Accept a LoadedModel, a model name or path, or a bare UNetPlusPlus; return a LoadedModel."""
    from .models import LoadedModel, load_model  # local import: models imports optimize_for_inference from here

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(model)
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, UNetPlusPlus):
        return LoadedModel.from_module(model)
    raise TypeError(f"expected a model name, path, LoadedModel or UNetPlusPlus, got {type(model).__name__}.")


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
) -> Generator[Progress, None, Prediction]:
    """Segment ``image``, yielding :class:`Progress` after each batch; return the :class:`Prediction`.

    Args:
        image: numpy array, memmap or dask array (read plane by plane; never loaded whole).
        model: A :class:`~napari_unetpp.models.LoadedModel`, a model name or file path, or a ``UNetPlusPlus``.
        axes: Letters from TCZYX describing ``image`` (default: :func:`guess_axes`).
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
        precision: ``"auto"`` (default: bf16 on capable CPUs, fp16/bf16 on GPUs), ``"fp32"``, ``"bf16"``, ``"fp16"``.
        normalization: Override the model card's normalisation.
        prob_dtype: ``"float16"`` (default), ``"float32"`` or ``"uint8"`` (probability x 255).
        stats: Normalisation statistics per channel from :func:`normalization_stats` of a larger image (default:
            computed from ``image``). Pass the stack's statistics when predicting one of its slices, so the slice
            matches the whole-stack result.

    Raises:
        InputError: wrong dimensions, axes or channel count, or non-finite values (a one-sentence message).
    """
    t_start = time.perf_counter()
    loaded = _resolve_model(model)
    dev = resolve_device(device)
    net = loaded.inference_module(dev)
    cfg = net.config
    norm = normalization or loaded.normalization
    k = net.check_depth(depth if depth is not None else loaded.card.recommended_depth)
    if mode not in ("pruned", "ensemble"):
        raise ValueError(f"mode must be 'pruned' or 'ensemble', got {mode!r}.")
    keep_levels = _levels(levels, k)
    if prob_dtype not in ("float16", "float32", "uint8"):
        raise ValueError(f"prob_dtype must be float16, float32 or uint8, got {prob_dtype!r}.")

    shape = tuple(int(s) for s in image.shape)
    if any(s == 0 for s in shape):
        raise InputError(f"the image is empty (shape {shape}).")
    lay = _layout(image, axes, cfg.spatial_dims)
    axes, spatial, loop, n_ch, src = lay.axes, lay.spatial, lay.loop, lay.n_ch, lay.src
    if n_ch != cfg.in_channels:
        raise InputError(f"the model expects {cfg.in_channels} channel(s) but the image has {n_ch}"
                         f"{' (axis C)' if 'C' in axes else ' (no C axis)'}; pick another model or image.")
    out_axes = "".join(a for a in axes if a != "C")
    out_shape = tuple(shape[axes.index(a)] for a in out_axes)
    out_order = [out_axes.index(a) for a in loop + list(spatial)]
    loop_shape = tuple(shape[axes.index(a)] for a in loop)
    sp_shape = tuple(shape[axes.index(a)] for a in spatial)

    if stats is None:
        stats = _stats(src, norm, n_ch, len(loop), lay.has_c)
    elif len(stats) != n_ch:
        raise ValueError(f"stats has {len(stats)} entries for an image with {n_ch} channel(s).")

    tile = tile if tile is not None else loaded.card.tile
    tile_t = _default_tile(cfg.spatial_dims) if tile is None else \
        ((int(tile),) * cfg.spatial_dims if np.isscalar(tile) else tuple(int(t) for t in tile))
    if len(tile_t) != cfg.spatial_dims:
        raise ValueError(f"tile needs {cfg.spatial_dims} sizes for a {cfg.spatial_dims}D model, got {tile_t}.")
    # Each plane is reflect-padded once to a multiple of 2**max_depth and tiles are multiples of it, so the network
    # never pads inside a tile: whole-image and tiled runs see the same image borders.
    mult = 2 ** net.max_depth
    pad = [((-n) % mult // 2, (-n) % mult - (-n) % mult // 2) for n in sp_shape]
    padded = tuple(n + a + b for n, (a, b) in zip(sp_shape, pad))
    tile_t = tuple(max(mult, t // mult * mult) for t in tile_t)
    plan = TilePlan(padded, tile_t, overlap, align=mult)
    batch = batch_size or _default_batch(plan.tile_shape, dev)
    runner = _Runner(net, k, dev, precision, batch)
    nc = cfg.num_classes
    want_ens = mode == "ensemble"
    # blended channels: kept levels (+ k for the mask) then the ensemble
    blend_levels = sorted(set(keep_levels) | ({k} if mode == "pruned" else set()))

    pshape = out_shape if nc == 1 else (nc, *out_shape)
    result = Prediction(
        mask=np.zeros(out_shape, "uint8" if nc <= 255 else "uint16"),
        probabilities={lv: np.zeros(pshape, prob_dtype) for lv in keep_levels},
        ensemble=np.zeros(pshape, prob_dtype) if want_ens else None,
        depth=k, mode=mode, threshold=threshold, axes=out_axes, device=str(dev), tiles=len(plan) * int(
            np.prod(loop_shape, dtype=np.int64)),
    )
    mask_view = result.mask.transpose(out_order)
    prob_views = {lv: _pview(p, out_order, nc) for lv, p in result.probabilities.items()}
    ens_view = _pview(result.ensemble, out_order, nc) if want_ens else None

    crop_rest = tuple(slice(a, a + n) for (a, _), n in zip(pad[1:], sp_shape[1:]))

    def make_sink(pidx: tuple[int, ...]):
        def sink(a: int, b: int, vals: np.ndarray) -> None:
            # rows a:b of the padded plane -> rows of the image, with the padding cropped off
            lo, hi = max(a, pad[0][0]), min(b, pad[0][0] + sp_shape[0])
            if lo >= hi:
                return
            vals = vals[(slice(None), slice(lo - a, hi - a), *crop_rest)]
            a, b = lo - pad[0][0], hi - pad[0][0]
            vals = vals.reshape(-1, nc, *vals.shape[1:])  # (channels, classes, rows, ...)
            chosen = None
            for ci, lv in enumerate(blend_levels):
                if lv in prob_views:
                    _store(prob_views[lv], pidx, a, b, vals[ci], nc, prob_dtype)
                if lv == k and mode == "pruned":
                    chosen = vals[ci]
            if want_ens:
                _store(ens_view, pidx, a, b, vals[-1], nc, prob_dtype)
                chosen = vals[-1]
            lab = (chosen[0] >= threshold) if nc == 1 else np.argmax(chosen, axis=0)
            mask_view[pidx][a:b] = lab
        return sink

    weights = gaussian_weights(plan.tile_shape) if len(plan) > 1 else None  # shared by every plane's blender
    total = result.tiles
    done = 0
    blenders: dict[tuple[int, ...], Blender] = {}
    remaining: dict[tuple[int, ...], int] = {}
    for items in _batches(_tiles(src, loop_shape, plan, pad, norm, stats, n_ch, lay.has_c), runner.batch):
        probs = runner.probs(np.stack([t for _, _, t in items]))  # (B, k, nc, ...)
        finished = []
        for (pidx, sl, _), pr in zip(items, probs):
            if pidx not in blenders:
                blenders[pidx] = Blender(plan, len(blend_levels) * nc + (nc if want_ens else 0), make_sink(pidx),
                                         weights)
                remaining[pidx] = len(plan)
            chans = [pr[lv - 1] for lv in blend_levels]
            if want_ens:
                chans.append(pr.mean(axis=0))
            blenders[pidx].add(sl, np.concatenate(chans, axis=0))
            remaining[pidx] -= 1
            if remaining[pidx] == 0:
                blenders.pop(pidx).finish()
                finished.append(pidx)
        done += len(items)
        yield Progress(done, total, finished, result)
    result.seconds = time.perf_counter() - t_start
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def normalization_stats(image: Any, model: Any, axes: str | None = None,
                        normalization: Normalization | None = None) -> list[tuple[float, float]]:
    """Per-channel normalisation statistics of ``image`` under ``model``'s recipe (see ``predict_iter(stats=...)``).

    Raises:
        InputError: bad axes or channels, or non-finite values.
    """
    loaded = _resolve_model(model)
    lay = _layout(image, axes, loaded.module.config.spatial_dims)
    return _stats(lay.src, normalization or loaded.normalization, lay.n_ch, len(lay.loop), lay.has_c)


def _stats(src: Any, norm: Normalization, n_ch: int, n_loop: int, has_c: bool) -> list[tuple[float, float]]:
    try:
        return [norm.compute_stats(_channel(src, c, n_loop, has_c)) for c in range(n_ch)]
    except NonFiniteInputError as exc:
        raise InputError(str(exc)) from None


def predict(image: Any, model: Any, **kwargs: Any) -> Prediction:
    """Run :func:`predict_iter` to the end and return its :class:`Prediction` (same arguments)."""
    gen = predict_iter(image, model, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


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


def _pview(arr: np.ndarray, out_order: list[int], nc: int) -> np.ndarray:
    return arr.transpose(out_order) if nc == 1 else arr.transpose([0, *[o + 1 for o in out_order]])


def _store(view: np.ndarray, pidx: tuple[int, ...], a: int, b: int, vals: np.ndarray, nc: int, dtype: str) -> None:
    if dtype == "uint8":
        vals = np.clip(np.rint(vals * 255.0), 0, 255)
    if nc == 1:
        view[pidx][a:b] = vals[0]
    else:
        view[(slice(None), *pidx)][:, a:b] = vals


def _channel(src: Any, c: int, n_loop: int, has_c: bool) -> Any:
    return src[(slice(None),) * n_loop + (c,)] if has_c else src


def _tiles(src: Any, loop_shape: tuple[int, ...], plan: TilePlan, pad: list[tuple[int, int]], norm: Normalization,
           stats: list[tuple[float, float]], n_ch: int, has_c: bool
           ) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...], np.ndarray]]:
    """(plane index, tile slices, normalised ``(C, *tile)`` float32) in plane then raster order; tiles index the
    plane after ``pad``."""
    for pidx in np.ndindex(*loop_shape) if loop_shape else [()]:
        block = np.asarray(src[pidx])
        if not has_c:
            block = block[None]
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            where = f" in plane {pidx}" if pidx else ""
            raise InputError(f"the image contains NaN or infinite values{where}; replace them before segmenting.")
        if block.dtype.kind not in "biuf":
            raise InputError(f"cannot segment an image of dtype {block.dtype}; convert it to numbers first.")
        planes = np.stack([norm.apply(block[c], stats[c]) for c in range(n_ch)])
        if any(a or b for a, b in pad):
            planes = np.pad(planes, [(0, 0), *pad], mode="reflect" if min(planes.shape[1:]) > 1 else "edge")
        for sl in plan:
            yield pidx, sl, np.ascontiguousarray(planes[(slice(None), *sl)])


def _batches(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
