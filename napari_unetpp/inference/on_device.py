"""The device pipeline: prediction with everything after the read on the network's device (CUDA, MPS).

On a GPU the network is not what takes the time: on an H100 it ran 1040 Mpx/s at L1 while ``predict()`` delivered
16, the rest being normalisation, tiling, blending, casts and thresholds in NumPy on the CPU. Here only the input
planes' pixels go over (in their own dtype, pinned, read ahead on a thread while the device computes) and only the
outputs the user asked for come back (uint8 / float16 / the mask), as nnU-Net v2's predictor
(``perform_everything_on_device``) and MONAI's ``sliding_window_inference(sw_device=, device=)`` do:

- :class:`DeviceBands` reads, for each row of tiles of each plane, the image rows it needs (reflected at the
  borders by :func:`~napari_unetpp.inference.tiling.source_index`, the same rule as the CPU's
  :func:`~napari_unetpp.inference.tiling.read_tile`), uploads them, checks them for NaN and normalises them on the
  device (:meth:`~napari_unetpp.data.normalization.Normalization.apply_tensor`); a tile is a view of its band;
- the one loop, :func:`~napari_unetpp.inference.sliding_window.sliding_window`, batches those views with
  ``torch.stack`` and blends with :class:`TorchBlender` (the CPU's Gaussian blender over tensors);
- the predictor is the network in PyTorch (:meth:`~napari_unetpp.runtimes.TorchBackend.tensor`), compiled for the
  run's batch shape when the run is long enough to repay the compilation (:class:`Compiling`);
- the :class:`~napari_unetpp.inference.writer.PlaneWriter` crops, casts and thresholds the blended rows where they
  are and copies back only the outputs.

The CPU keeps the host pipeline (:func:`resolve_pipeline`): there, per-tile NumPy reads and ONNX Runtime / OpenVINO
are what measured fastest. The device pipeline also runs on the CPU when asked (``pipeline="device"``), which is
how the tests check it against the host pipeline on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from napari_unetpp.data.normalization import check_pixels, non_finite
from napari_unetpp.inference.plan import PredictionPlan
from napari_unetpp.inference.sliding_window import Plane, Step, sliding_window
from napari_unetpp.inference.tiling import Blender, source_index
from napari_unetpp.runtimes import TorchBackend

__all__ = [
    "PIPELINES",
    "COMPILE_COST_S",
    "COMPILE_GAIN",
    "Compiling",
    "DeviceBands",
    "TorchBlender",
    "compile_pays",
    "device_window",
    "resolve_pipeline",
]

log = logging.getLogger(__name__)

PIPELINES = ("auto", "host", "device")

# torch.compile on an H100 (README's GPU section): 4-5 s to compile a fixed tile shape, then 1.2x at L1 and 1.5x at
# L4. A run compiles when what it would save on the tiles left exceeds the cost, at the smaller gain.
COMPILE_COST_S = 5.0
COMPILE_GAIN = 1.2
# How many bytes of input bands may wait, read ahead, for the device (pinned host memory on CUDA).
READ_AHEAD_BYTES = 512 * 2**20


def resolve_pipeline(pipeline: str, device: torch.device) -> str:
    """``"host"`` or ``"device"``: ``"auto"`` is the device pipeline on CUDA and MPS, the host one on the CPU."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}.")
    if pipeline == "auto":
        return "device" if device.type in ("cuda", "mps") else "host"
    return pipeline


def compile_pays(seconds_per_tile: float, tiles_left: int, cost_s: float = COMPILE_COST_S) -> bool:
    """Whether compiling repays itself in this run: the time saved on ``tiles_left`` tiles at
    :data:`COMPILE_GAIN` exceeds ``cost_s``."""
    return tiles_left * seconds_per_tile * (1.0 - 1.0 / COMPILE_GAIN) > cost_s


def compile_wanted(device: torch.device) -> bool:
    """Whether runs on ``device`` may compile: on CUDA by default; ``NAPARI_UNETPP_COMPILE=0`` never, ``=1`` on any
    device (the CPU's compiler needs a C++ toolchain and takes minutes on a laptop, so it is off there unless
    asked)."""
    env = os.environ.get("NAPARI_UNETPP_COMPILE", "auto")
    if env == "0":
        return False
    return env == "1" or device.type == "cuda"


class TorchBlender(Blender):
    """:class:`~napari_unetpp.inference.tiling.Blender` over tensors on ``device``: the same weights, window and
    arithmetic (float32), so it blends as the CPU's does."""

    def __init__(self, *args: Any, device: torch.device, **kwargs: Any) -> None:
        self.device = device
        super().__init__(*args, **kwargs)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _as_weights(self, weights: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(weights, np.float32), device=self.device)

    def _roll(self, a: Any, shift: int, axis: int) -> torch.Tensor:
        return torch.roll(a, shift, dims=axis)


class DeviceBands:
    """The bands of the padded planes a run needs, normalised on ``device``: for each plane (in order) and each row
    of its tiles (in order), the padded rows ``start:start + tile`` along the first spatial axis at the padded
    extent of the others, ``(C, tile, *padded)`` float32. The next bands' pixels are read on a thread while the
    device computes (at most :data:`READ_AHEAD_BYTES` waiting), pinned on CUDA so their upload is asynchronous.

    Bands must be asked for in that order (:meth:`band`), which is the order the sliding window reads tiles in.
    """

    def __init__(self, plan: PredictionPlan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self._t0 = plan.tiles.tile_shape[0]
        starts = sorted({t[0].start for t in plan.tile_list})
        self._jobs = iter([(p, s) for p in plan.plane_indices() for s in starts])
        self._edge = min(plan.spatial_shape) <= 1
        sp = plan.spatial_shape
        # the padded extent of the other spatial axes, as indices into the image (None: no padding on that axis)
        self._rest = [
            None if a == b == 0 else torch.as_tensor(source_index(slice(0, n + a + b), a, n, self._edge), device=device)
            for (a, b), n in zip(plan.pad[1:], sp[1:])
        ]
        rest_px = int(np.prod([n + a + b for (a, b), n in zip(plan.pad[1:], sp[1:])], dtype=np.int64))
        band_bytes = plan.lay.n_ch * self._t0 * rest_px * np.dtype(plan.lay.src.dtype).itemsize
        self._ahead = int(max(1, min(4, READ_AHEAD_BYTES // max(band_bytes, 1))))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="unetpp-read")
        self._queue: deque[Future[tuple[tuple[Any, int], torch.Tensor, torch.Tensor]]] = deque()
        self.read_seconds = 0.0  # time the device pipeline waited for pixels (what a benchmark reports)

    def planes(self) -> Iterator[Plane]:
        """The run's planes for :func:`~napari_unetpp.inference.sliding_window.sliding_window`, their tiles views
        of these bands."""
        return self.plan.planes(self._reader)

    def _reader(self, pidx: tuple[int, ...]) -> Callable[[tuple[slice, ...]], torch.Tensor]:
        current: list[Any] = [None, None]  # (band start, band)

        def read(sl: tuple[slice, ...]) -> torch.Tensor:
            if current[0] != sl[0].start:
                current[0], current[1] = sl[0].start, self.band(pidx, sl[0].start)
            return current[1][(slice(None), slice(None), *sl[1:])]

        return read

    def band(self, pidx: tuple[int, ...], start: int) -> torch.Tensor:
        """The band of plane ``pidx`` starting at padded row ``start``, normalised on the device."""
        while len(self._queue) < self._ahead:
            job = next(self._jobs, None)
            if job is None:
                break
            self._queue.append(self._pool.submit(self._read, *job))
        t = time.perf_counter()
        key, rows, host = self._queue.popleft().result()
        self.read_seconds += time.perf_counter() - t
        if key != (pidx, start):
            raise RuntimeError(f"band {(pidx, start)} asked for out of order (next read: {key}).")
        plan, dev = self.plan, self.device
        x = host.to(dev, non_blocking=True).to(torch.float32)
        where = f" in plane {pidx}" if pidx else ""
        if host.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            raise non_finite(where)
        x = x.index_select(1, rows.to(dev, non_blocking=True))
        for ax, idx in enumerate(self._rest):
            if idx is not None:
                x = x.index_select(ax + 2, idx)
        return torch.stack([plan.norm.apply_tensor(x[c], plan.stats[c]) for c in range(plan.lay.n_ch)])

    def _read(self, pidx: tuple[int, ...], start: int) -> tuple[tuple[Any, int], torch.Tensor, torch.Tensor]:
        """On the reading thread: the image rows band ``start`` needs, as a (pinned) tensor of the image's dtype,
        and the band's rows as indices into them."""
        plan = self.plan
        lay = plan.lay
        plane = lay.src[pidx] if pidx else lay.src
        idx = source_index(slice(start, start + self._t0), plan.pad[0][0], plan.spatial_shape[0], self._edge)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        lead = (slice(None),) * (len(plane.shape) - len(plan.spatial_shape))  # channels (no Ellipsis: lazy arrays)
        block = np.asarray(plane[(*lead, slice(lo, hi))])
        if not lay.has_c:
            block = block[None]
        check_pixels(block[:0])  # a dtype that is no number: its one sentence (NaNs are looked for on the device)
        if not block.dtype.isnative:  # e.g. a big-endian TIFF's memory map
            block = block.astype(block.dtype.newbyteorder("="))
        no_mps = block.dtype == np.float64 or (block.dtype.kind == "u" and block.itemsize > 1)
        if self.device.type == "mps" and no_mps:
            block = block.astype(np.float32)  # MPS has no float64, uint16 or uint32 tensors
        try:
            host = torch.from_numpy(np.ascontiguousarray(block))
        except (TypeError, ValueError):  # a dtype torch does not take from NumPy
            host = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return (pidx, start), torch.from_numpy(idx - lo), host

    def close(self) -> None:
        """Stop reading ahead (a cancelled or failed run)."""
        for fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class Compiling:
    """``predictor`` (a run's :class:`~napari_unetpp.inference.predictor.SafePredictor` around a
    :class:`~napari_unetpp.runtimes.TorchBackend`) that times its first full batches and, where
    :func:`compile_pays` for the tiles left, compiles the network for that batch shape
    (:meth:`~napari_unetpp.runtimes.TorchBackend.compile_for`; kept for later runs). The last, smaller batch runs
    eagerly (static shapes: it would compile again)."""

    def __init__(self, predictor: Callable[[Any], Any], backend: TorchBackend, total: int, batch: int) -> None:
        self.predictor, self.backend, self.total, self.batch = predictor, backend, total, batch
        self.done = 0
        self._timed: list[float] = []
        self.decided = not compile_wanted(backend.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if self.decided or len(x) < self.batch or self.backend.is_compiled(shape):
            out = self.predictor(x)
        else:
            sync(x.device)
            t = time.perf_counter()
            out = self.predictor(x)
            sync(x.device)
            self._timed.append((time.perf_counter() - t) / len(x))
            if len(self._timed) == 2:  # the first batch pays for warm-up (cuDNN's algorithm search)
                self.decided = True
                left = self.total - self.done - len(x)
                if compile_pays(self._timed[-1], left):
                    log.info("compiling L%d for batches of %s (%d tiles to go)", self.backend.depth, shape, left)
                    self.backend.compile_for(shape)
        self.done += len(x)
        return out


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (to time it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_window(
    plan: PredictionPlan, predictor: Callable[[Any], Any], backend: TorchBackend, sink: Any, bands: DeviceBands
) -> Iterator[Step]:
    """The sliding window of ``plan`` on ``backend``'s device: ``bands``' tiles through ``predictor`` (the safe
    wrapper of ``backend``), blended there by :class:`TorchBlender` into ``sink``; a
    :class:`~napari_unetpp.inference.sliding_window.Step` after every batch."""
    compiling = Compiling(predictor, backend, plan.total_tiles, plan.batch)
    blender = functools.partial(TorchBlender, device=backend.device)
    yield from sliding_window(bands.planes(), compiling, sink, plan.batch, torch.stack, blender)
