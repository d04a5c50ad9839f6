"""``napari-unetpp demo``: napari with a real sample and its UNet++ segmentation at every level."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SAMPLE_MODELS = {"em": "em-membranes"}


def run_demo(sample: str = "em", screenshot: str | None = None) -> int:
    """Open napari, load ``sample`` from this plugin, segment it with its shipped model (all levels) and show it.

    Args:
        sample: Sample key from the manifest (default ``"em"``).
        screenshot: Save a screenshot of the window to this path and close instead of running the event loop.
    """
    import napari
    from napari.layers import Image

    from ._layers import show_prediction
    from .inference import predict_iter
    from .models import load_model

    if sample not in SAMPLE_MODELS:
        raise SystemExit(f"unknown sample {sample!r}; choose one of {sorted(SAMPLE_MODELS)}.")
    viewer = napari.Viewer(title="napari-unetpp demo")
    viewer.window.resize(1500, 950)
    layers = viewer.open_sample("napari-unetpp", sample)
    image = next(ly for ly in layers if isinstance(ly, Image))
    _, widget = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    widget._image.value = image
    model = load_model(SAMPLE_MODELS[sample])
    gen = predict_iter(image.data, model, depth=model.max_depth, levels="all")
    viewer.status = f"UNet++ ({model.card.id}) is segmenting {image.name} ..."
    if screenshot or os.environ.get("NAPARI_UNETPP_SYNC") == "1":
        pred = _drain(gen)
        show_prediction(viewer, image, pred)
        viewer.status = f"UNet++ L1-L{pred.depth} in {pred.seconds:.1f} s on {pred.device}"
        if screenshot:
            viewer.dims.set_point(0, 0)
            viewer.screenshot(screenshot, canvas_only=False, flash=False)
            viewer.close()
            return 0
    else:
        from napari.qt.threading import create_worker

        worker = create_worker(lambda: (yield from gen), _progress={"total": 0, "desc": "UNet++"})
        worker.returned.connect(lambda pred: show_prediction(viewer, image, pred))
        worker.start()
    napari.run()
    return 0


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
