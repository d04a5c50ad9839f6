"""The Segment widget's long work, as generators the widget runs in napari thread workers (synchronously under
``NAPARI_UNETPP_SYNC=1``): the preview of one plane, the whole stack (each finished plane's mask is made in the
worker), and the bioimage.io export. Every value a job uses is passed in when it starts, on the main thread: a
worker reads no widget."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from napari_unetpp.inference.predict import predict_iter
from napari_unetpp.model.loaded import LoadedModel
from napari_unetpp.napari.segment.layers import blank
from napari_unetpp.napari.segment.shown import Display, chosen, chosen_cue, plane_mask
from napari_unetpp.napari.workers import abandon, run_generator

__all__ = ["Jobs", "export_job", "preview_job", "stack_job"]

Factory = Callable[[], Generator[Any, None, Any]]


def preview_job(
    data: Any, lm: LoadedModel, axes: str, depth: int, device: str, stats: list, zoom: Any, runtime: str = "auto"
) -> Factory:
    """Every level up to ``depth`` of one plane (float32 probabilities) on ``runtime``; returns
    ``(Prediction, seconds)``."""

    def gen():
        t0 = time.perf_counter()
        pred = yield from predict_iter(
            data,
            lm,
            axes=axes,
            depth=depth,
            levels="all",
            device=device,
            stats=stats,
            prob_dtype="float32",
            zoom=zoom,
            runtime=runtime,
        )
        return pred, time.perf_counter() - t0

    return gen


def stack_job(
    data: Any, lm: LoadedModel, axes: str, display: Display, device: str, stats: list, zoom: Any, runtime: str = "auto"
) -> Factory:
    """The whole image at the display's depth, keeping only the levels it shows. Yields ``(progress, planes)`` with
    ``(plane, probabilities, cues, mask)`` for each plane finished since the last yield (copied, and the mask made
    here, in the worker); returns the Prediction."""
    k = display.depth
    cfg = lm.module.config

    def gen():
        run = predict_iter(
            data,
            lm,
            axes=axes,
            depth=k,
            levels=display.levels_kept(),
            device=device,
            stats=stats,
            allocate=lambda shape, dtype, name: blank(shape, dtype, data),
            zoom=zoom,
            runtime=runtime,
        )
        while True:
            try:
                p = next(run)
            except StopIteration as stop:
                return stop.value
            planes = []
            for plane in p.planes_done:
                probs = {lv: np.array(a[plane]) for lv, a in p.partial.probabilities.items()}
                cues = {lv: np.array(a[plane]) for lv, a in p.partial.cues.items()}
                prob = chosen(probs, k, display.ensemble)
                cue = chosen_cue(cues, k, display.ensemble)
                mask = plane_mask(prob, cfg.num_classes, display.threshold, display.objects, cfg.spatial_dims, cue)
                planes.append((plane, probs, cues, mask))
            yield p, planes

    return gen


def export_job(lm: LoadedModel, path: str, depth: int, sample: np.ndarray | None) -> Factory:
    """A bioimage.io package of ``lm`` at ``depth`` (TorchScript and ONNX weights); returns the export's result."""

    def gen():
        from napari_unetpp.export.bioimageio import export_bioimageio

        return export_bioimageio(lm, path, depth=depth, sample=sample)
        yield  # a generator for the worker

    return gen


class Jobs:
    """The running thread workers of one widget: the preview (one at a time; the newest request waits), the
    whole-stack run (one at a time, cancellable) and exports. :meth:`abandon` disconnects and stops them all when
    the widget goes (connected to its ``destroyed`` signal with the list, never the widget)."""

    def __init__(self) -> None:
        self.workers: list[Any] = []
        self.preview: Any = None  # the preview worker running
        self.pending_preview = False  # a preview was asked for while one ran
        self.stack: Any = None  # the whole-stack worker running
        self.stack_layer: Any = None  # the unique id of the image layer it segments
        self.cancelled = False

    @property
    def abandon(self) -> Callable[..., None]:
        """A callable for the widget's ``destroyed`` signal that holds the worker list only."""
        return functools.partial(abandon, self.workers)

    def start(
        self,
        factory: Factory,
        on_yield: Callable[[Any], None],
        on_return: Callable[[Any], None],
        on_error: Callable[[str], None],
        on_finish: Callable[[], None],
    ) -> Any:
        """Run ``factory()`` in a worker (see :func:`~napari_unetpp.napari.workers.run_generator`) and track it;
        returns the worker (None when it ran synchronously)."""
        worker = run_generator(factory, on_yield, on_return, on_error, on_finish)
        if worker is not None:
            self.workers.append(worker)
            worker.finished.connect(functools.partial(_forget, self.workers, worker))
        return worker

    def cancel_stack(self) -> None:
        """Stop the whole-stack run at its next tile."""
        if self.stack is not None:
            self.cancelled = True
            self.stack.quit()


def _forget(workers: list[Any], worker: Any) -> None:
    if worker in workers:
        workers.remove(worker)
