"""``napari-unetpp demo``: napari with the UNet++ Segment widget docked and a real sample segmented at every level."""

from __future__ import annotations

import os

SAMPLES = ("em", "nuclei")


def run_demo(sample: str = "em", screenshot: str | None = None) -> int:
    """Open napari, load ``sample`` from this plugin, dock the Segment widget and segment the whole stack with the
    sample's shipped model at its recommended depth, every level as a layer.

    Args:
        sample: Sample key from the manifest (default ``"em"``).
        screenshot: Save a screenshot of the window to this path and close instead of running the event loop.
    """
    if sample not in SAMPLES:
        raise SystemExit(f"unknown sample {sample!r}; choose one of {list(SAMPLES)}.")
    if screenshot:
        os.environ["NAPARI_UNETPP_SYNC"] = "1"  # finish before the picture is taken
    import napari
    from napari.layers import Image

    viewer = napari.Viewer(title="napari-unetpp demo")
    viewer.window.resize(1500, 950)
    layers = viewer.open_sample("napari-unetpp", sample)
    image = next(ly for ly in layers if isinstance(ly, Image))
    _, widget = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    widget._image.value = image
    widget._all_levels.value = True
    if sample == "nuclei":
        widget._instances.value = "watershed"  # touching nuclei become separate objects
    viewer.dims.axis_labels = ("z", "y", "x")
    widget.run_stack()
    if screenshot:
        viewer.dims.set_current_step(0, 0)
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        viewer.close()
        return 0
    napari.run()
    return 0
