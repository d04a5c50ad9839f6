"""The one sliding-window loop: read tiles, run them in batches through a predictor, blend, hand rows to a sink.

MONAI's ``sliding_window_inference`` and nnU-Net's predictor work this way, and so does everything here that runs a
network over an image: prediction (:func:`~napari_unetpp.inference.predict.predict_iter`, with its zoom adapter) and
validation during fine-tuning (:func:`~napari_unetpp.training.validation.validate`) differ only in their
:class:`Plane` s, their :class:`Predictor` and their :class:`Sink`:

- a :class:`Plane` is one plane or volume: its tile grid (:class:`~napari_unetpp.inference.tiling.TilePlan`, over the
  padded extent), the tiles to run, and how to read one (lazily: only that tile's pixels, from any array a numpy
  index works on: numpy, memory maps, dask, zarr);
- a :class:`Predictor` runs a batch of tiles through the network (every runtime backend is one, and so is the
  network being trained, run by PyTorch; the loop does not know which runs);
- a :class:`Sink` says which of the predictor's channels are blended and receives the blended rows of each plane as
  they are final (bounded memory: :class:`~napari_unetpp.inference.tiling.Blender` holds one tile's extent along
  the first axis), then hears that the plane is done.

:func:`sliding_window` is a generator that yields a :class:`Step` after every batch, so a caller reports progress and
cancels by closing it (the work stops before the next batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from napari_unetpp.inference.tiling import Blender, TilePlan, gaussian_weights

__all__ = ["Plane", "Predictor", "Sink", "Step", "sliding_window"]

Tile = tuple[slice, ...]


class Predictor(Protocol):
    """What runs the network on a batch of tiles, the one signature every runtime has.

    ``predictor(batch)``: ``batch`` is ``(B, C, *tile)`` float32 (normalised tiles); the result is
    ``(B, k, classes [+ cue], *tile)`` float32 probabilities: heads 1..k of depth k, each with the classes (sigmoid
    foreground for one class, softmax otherwise) and, for a model with an instance cue, the cue after them.

    Every backend :func:`napari_unetpp.runtimes.make_backend` gives is one (PyTorch, ONNX Runtime, OpenVINO, int8);
    so is :func:`~napari_unetpp.inference.predictor.network_predictor` (a network being trained, run by PyTorch in
    eval mode), and so is any plain function of that shape.
    """

    def __call__(self, batch: np.ndarray, /) -> np.ndarray: ...


class Sink(Protocol):
    """Where the blended output of :func:`sliding_window` goes.

    ``channels`` is how many channels :meth:`select` makes of one tile's output, ``(k, classes [+ cue], *tile)``;
    those are blended. :meth:`write_rows` receives rows ``lo:hi`` (along the first spatial axis, padded coordinates)
    of plane ``key`` once they are final, as ``(channels, hi - lo, ...)`` values; each row once, in order.
    :meth:`plane_done` follows the plane's last rows.
    """

    @property
    def channels(self) -> int: ...

    def select(self, probs: np.ndarray, /) -> np.ndarray: ...

    def write_rows(self, key: Hashable, lo: int, hi: int, values: np.ndarray, /) -> None: ...

    def plane_done(self, key: Hashable, /) -> None: ...


@dataclass(frozen=True)
class Plane:
    """One plane (2D) or volume (3D) for :func:`sliding_window`.

    Attributes:
        key: What the sink calls it (e.g. its index over the stack's loop axes).
        tiles: The tile grid over the padded plane.
        read: ``read(tile)``: the tile's normalised input, ``(C, *tile)`` float32 (e.g. by
            :func:`~napari_unetpp.inference.tiling.read_tile`, which reads only the tile's pixels).
        run: The tiles to run, in the grid's raster order (default all). Rows no tile of ``run`` covers blend to 0/0
            (NaN); a sink that runs a subset reads only rows its tiles cover.
        rows: Only rows ``rows[0]:rows[1]`` (padded coordinates) reach the sink (default all).
    """

    key: Hashable
    tiles: TilePlan
    read: Callable[[Tile], Any]  # np.ndarray (or a tensor, in the device pipeline)
    run: Sequence[Tile] | None = None
    rows: tuple[int, int] | None = None

    @functools.cached_property
    def to_run(self) -> Sequence[Tile]:
        """:attr:`run`, or every tile of the grid."""
        return list(self.tiles) if self.run is None else self.run


@dataclass
class Step:
    """What one batch of :func:`sliding_window` did: tiles done so far, and the planes finished by this batch."""

    done: int
    finished: list[Hashable] = field(default_factory=list)


def sliding_window(
    planes: Iterable[Plane],
    predictor: Predictor | Callable[[Any], Any],
    sink: Sink,
    batch: int,
    stack: Callable[[list[Any]], Any] = np.stack,
    blender: Callable[..., Blender] = Blender,
) -> Iterator[Step]:
    """Run every plane's tiles through ``predictor`` in batches of ``batch`` tiles (plane, then raster order; a
    batch may span planes), blend each plane with Gaussian weights (none when one tile covers it) and stream its
    final rows into ``sink``; yield a :class:`Step` after every batch.

    ``planes`` is read lazily: a plane's tiles are read when its batch is made. A plane with no tiles to run is
    skipped (nothing reaches the sink). Exceptions of the predictor or the sink propagate; closing the generator
    stops before the next batch.

    ``stack`` makes a batch of the tiles ``read`` returns and ``blender`` blends them (default: NumPy arrays and
    :class:`~napari_unetpp.inference.tiling.Blender`). The device pipeline passes ``torch.stack`` and
    :class:`~napari_unetpp.inference.on_device.TorchBlender`: tiles, batches, blending and rows stay on the device.
    """
    weights: dict[tuple[int, ...], np.ndarray] = {}  # per tile shape, shared by the planes
    blenders: dict[Hashable, Blender] = {}
    remaining: dict[Hashable, int] = {}
    done = 0
    for items in _batches(_tiles(planes), batch):
        probs = predictor(stack([x for _, _, x in items]))  # (B, k, classes [+ cue], *tile)
        finished = []
        for (plane, sl, _), pr in zip(items, probs):
            key = plane.key
            if key not in blenders:
                grid, shape = plane.tiles, plane.tiles.tile_shape
                if len(grid) > 1 and shape not in weights:
                    weights[shape] = gaussian_weights(shape)
                rows = functools.partial(sink.write_rows, key)
                blenders[key] = blender(
                    grid, sink.channels, rows, weights.get(shape) if len(grid) > 1 else None, plane.rows
                )
                remaining[key] = len(plane.to_run)
            blenders[key].add(sl, sink.select(pr))
            remaining[key] -= 1
            if remaining[key] == 0:
                blenders.pop(key).finish()
                sink.plane_done(key)
                finished.append(key)
        done += len(items)
        yield Step(done, finished)


def _tiles(planes: Iterable[Plane]) -> Iterator[tuple[Plane, Tile, np.ndarray]]:
    for plane in planes:
        for sl in plane.to_run:
            yield plane, sl, plane.read(sl)


def _batches(it: Iterator[tuple[Plane, Tile, np.ndarray]], size: int) -> Iterator[list[tuple[Plane, Tile, np.ndarray]]]:
    batch: list[tuple[Plane, Tile, np.ndarray]] = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
