"""Prediction on images, stacks and volumes: normalise -> tile -> pruned UNet++ -> blend -> per-level outputs.

Where the depth flows: :func:`predict_iter` takes ``depth=k`` (default: the card's recommended depth); the plan
keeps it, the runtime backend calls ``net(tiles, depth=k)``, which evaluates only the nodes X(i, j) with i + j <= k
and returns heads 1..k; the plane writer blends the kept levels and makes the mask from head k (or the mean of heads
1..k in ``"ensemble"`` mode).

The parts, in reading order:
- :func:`~napari_unetpp.inference.plan.plan_prediction` checks the inputs and decides everything up front: axes,
  depth, levels, tile grid, padding, normalisation statistics, batch size (:mod:`napari_unetpp.inference.plan`);
- the predictor runs a batch of tiles: the runtime backend :func:`napari_unetpp.runtimes.make_backend` chooses (or
  the caller's), wrapped by :class:`~napari_unetpp.inference.predictor.SafePredictor` (out-of-memory, fallback);
- :func:`~napari_unetpp.inference.sliding_window.sliding_window` is the one loop: read tiles lazily, run batches,
  blend, hand finished rows to the sink;
- :class:`~napari_unetpp.inference.writer.PlaneWriter` is the sink: probabilities, the mask and objects;
- zoom is an adapter around the same run (:mod:`napari_unetpp.inference.zoom`).

:func:`predict_iter` is a generator that yields :class:`Progress` after every batch of tiles and returns a
:class:`Prediction`; :func:`predict` runs it to the end. Closing the generator stops the work before the next batch
and nothing is returned, so no half-written result reaches the caller. Planes announced in ``Progress.planes_done``
are complete in ``Progress.partial`` (that is how the napari widget streams results into its layers).

Axes use the letters T (time), C (channel), Z, Y, X (see :mod:`napari_unetpp.data.axes`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Generator, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from napari_unetpp.data.axes import fit_channels, guess_axes, layout
from napari_unetpp.data.normalization import Normalization
from napari_unetpp.errors import InputError
from napari_unetpp.inference.on_device import DeviceBands, device_window, resolve_pipeline
from napari_unetpp.inference.plan import PredictionPlan, image_stats, plan_prediction
from napari_unetpp.inference.predictor import SafePredictor, describe_predictor
from napari_unetpp.inference.result import Allocator, Prediction, Progress
from napari_unetpp.inference.sliding_window import Predictor, sliding_window
from napari_unetpp.inference.writer import PlaneWriter
from napari_unetpp.inference.zoom import Zoomed, zooms
from napari_unetpp.jobs import run_to_end
from napari_unetpp.model.registry import resolve_model
from napari_unetpp.runtimes import (
    Backend,
    TorchBackend,
    device_memory,
    make_backend,
    release_later,
    release_memory,
    torch_instead,
)

__all__ = [
    "Progress",
    "Prediction",
    "PredictionPlan",
    "PlaneWriter",
    "predict",
    "predict_iter",
    "plan_prediction",
    "run_plan",
    "guess_axes",
    "InputError",
    "normalization_stats",
]

log = logging.getLogger(__name__)

# ONNX Runtime (and OpenVINO) keep their memory between runs when a run's batches are at most one 512 x 512 tile (at
# most ~320 MB at L4): a slider preview then runs 20-50 % faster than after a release. Larger runs give it back a few
# seconds after they end, unless another run comes first (runtimes.release_later).
KEEP_ARENA = 512 * 512


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
    predictor: Predictor | None = None,
    pipeline: str = "auto",
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
            ``"fp16"``, or ``"int8"`` (CPU: the model's statically quantised copy in ONNX Runtime or OpenVINO, see
            :mod:`napari_unetpp.runtimes.int8`; faster, not exact).
        normalization: Override the model card's normalisation.
        prob_dtype: ``"float16"`` (default), ``"float32"`` or ``"uint8"`` (probability x 255).
        stats: Normalisation statistics per channel from :func:`normalization_stats` of a larger image (default:
            computed from ``image``). Pass the stack's statistics when predicting one of its slices, so the slice
            matches the whole-stack result.
        allocate: ``allocate(shape, dtype, name)`` makes each output array (default ``np.zeros``; names in
            :meth:`~napari_unetpp.inference.plan.PredictionPlan.allocate`): e.g. a memory map, or
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
        runtime: ``"auto"`` (default: on the CPU, PyTorch, ONNX Runtime or OpenVINO, in fp32, or in bf16 too on a
            CPU with native bf16, whichever measured fastest on this machine for this level; see
            :func:`napari_unetpp.runtimes.choose`), ``"torch"``,
            ``"onnx"`` or ``"openvino"``.
        predictor: What runs the tiles instead of the runtime ``runtime`` and ``precision`` choose: any
            :class:`~napari_unetpp.inference.sliding_window.Predictor` returning heads 1..k of ``depth``, e.g. the
            network being trained (:func:`~napari_unetpp.inference.predictor.network_predictor`, its weights as
            they are now). ``model`` still gives the recipe (normalisation, tile, depth); ``Prediction.ran_on``
            names the predictor.
        pipeline: Where the work around the network runs: ``"auto"`` (default: ``"device"`` on CUDA and MPS,
            ``"host"`` on the CPU), ``"host"`` (tiles read, normalised and blended by NumPy on the CPU; every runtime)
            or ``"device"`` (all of it in PyTorch on the network's device, only the pixels and the outputs copied:
            :mod:`napari_unetpp.inference.on_device`; PyTorch only, so not with ``runtime`` ONNX / OpenVINO or int8).

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
    if zooms(zoom):
        if rows is not None:
            raise ValueError("rows= and zoom= do not go together; resample first, or predict whole planes.")
        assert zoom is not None
        zoomed = Zoomed(image, model, zoom, kw)
        inner = plan_prediction(zoomed.image, zoomed.model, **zoomed.plan_kwargs)
        run = run_plan(inner, precision, runtime, None, predictor, pipeline)
        result = yield from zoomed.around(run, allocate)
    else:
        plan = plan_prediction(image, model, rows=rows, **kw)
        result = yield from run_plan(plan, precision, runtime, allocate, predictor, pipeline)
    result.seconds = time.perf_counter() - t_start
    return result


def run_plan(
    plan: PredictionPlan,
    precision: str = "auto",
    runtime: str = "auto",
    allocate: Allocator | None = None,
    predictor: Predictor | None = None,
    pipeline: str = "auto",
) -> Generator[Progress, None, Prediction]:
    """Run ``plan`` through the sliding window into a new result (``allocate`` as in :func:`predict_iter`), on the
    runtime ``runtime`` and ``precision`` choose (:func:`napari_unetpp.runtimes.make_backend`) or on ``predictor``,
    with the work around the network where ``pipeline`` says (:func:`predict_iter`); yield :class:`Progress` after
    every batch, return the :class:`Prediction`. Memory kept between runs is given back a while after the run ends,
    fails or is cancelled (:func:`~napari_unetpp.runtimes.release_later`), unless another run comes first."""
    result = plan.allocate(allocate)
    writer = PlaneWriter(plan, result)
    on_device = resolve_pipeline(pipeline, plan.device) == "device"
    backend = _device_backend(plan, precision, runtime, predictor, pipeline) if on_device else None
    on_device = backend is not None
    fallback = None
    if backend is not None:
        predictor = backend
    elif predictor is None:
        predictor = make_backend(
            plan.model,
            plan.net,
            plan.depth,
            plan.device,
            precision,
            plan.tiles.tile_shape,
            runtime,
            plan.batch_shape_tiles,
        )
        if predictor.choice.runtime in ("onnx", "openvino", "openvino-bf16", "auto") and runtime == "auto":

            def fallback(exc: BaseException) -> Backend:
                assert isinstance(safe.predictor, Backend)
                return torch_instead(safe.predictor, exc, plan.net, plan.depth, plan.device, precision)

    safe = SafePredictor(predictor, plan.device, plan.batch, fallback)
    bands: DeviceBands | None = None
    held = contextlib.ExitStack()  # a run on an accelerator: its cached memory is not given back meanwhile
    if plan.device.type != "cpu":
        held.enter_context(device_memory(plan.device).use())
    try:
        bands = DeviceBands(plan, plan.device) if backend is not None else None
        if bands is not None and backend is not None:
            steps = device_window(plan, safe, backend, writer, bands)
        else:
            steps = sliding_window(plan.planes(), safe, writer, plan.batch)
        for step in steps:
            yield Progress(step.done, plan.total_tiles, list(step.finished), result)  # type: ignore[arg-type]
    finally:  # finished, failed or cancelled
        if bands is not None:
            bands.close()
        safe.close()
        held.close()
        _keep_or_release(plan, safe.predictor)
    result.ran_on, result.runtime = describe_predictor(safe.predictor, plan.device)
    if on_device:
        result.ran_on += ", the pipeline on the device"
    log.info("L%d ran on %s", plan.depth, result.ran_on)
    return result


def _device_backend(
    plan: PredictionPlan, precision: str, runtime: str, predictor: Predictor | None, pipeline: str
) -> TorchBackend | None:
    """The PyTorch backend the device pipeline runs, or None where it cannot (a predictor that is no PyTorch
    backend, another runtime, int8: the host pipeline then runs, or, where ``pipeline="device"`` was asked for,
    a ValueError says why)."""
    forced = pipeline == "device"
    if predictor is not None:
        if isinstance(predictor, TorchBackend) or not forced:
            return predictor if isinstance(predictor, TorchBackend) else None
        raise ValueError("pipeline='device' runs PyTorch; this predictor runs on the host pipeline (pipeline='host').")
    if runtime not in ("auto", "torch") or precision == "int8":
        if forced:
            what = "int8" if precision == "int8" else runtime
            raise ValueError(f"pipeline='device' runs PyTorch, not {what}; choose runtime='torch' or pipeline='host'.")
        return None
    backend = make_backend(
        plan.model, plan.net, plan.depth, plan.device, precision, plan.tiles.tile_shape, "torch", plan.batch
    )
    assert isinstance(backend, TorchBackend)
    return backend


def _keep_or_release(plan: PredictionPlan, predictor: Any) -> None:
    """After a run: an accelerator's cached memory and a large CPU run's runtime memory are given back in
    :data:`~napari_unetpp.runtimes.memory.RELEASE_AFTER_S` (back-to-back runs keep them); other memory at once."""
    kept = isinstance(predictor, Backend) and predictor.memory() is not None
    if plan.device.type != "cpu":
        if kept:
            release_later(predictor)
        else:
            release_memory(plan.device)  # a predictor passed in: nothing says what it holds
    elif kept and min(plan.batch, plan.total_tiles) * int(np.prod(plan.tiles.tile_shape)) > KEEP_ARENA:
        release_later(predictor)  # in RELEASE_AFTER_S, so that back-to-back runs keep it


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
    return image_stats(lay, normalization or loaded.normalization)
