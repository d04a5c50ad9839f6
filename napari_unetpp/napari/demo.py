"""``napari-unetpp demo``: napari with the plugin and a real sample loaded.

- ``em`` and ``nuclei``: the Segment widget docked and the sample segmented at every level with its shipped model.
- ``ct``: the abdominal CT sample with the Fine-tune widget set up to teach a *new* model the liver from three
  labelled slices (2, 9, 16); press Fine-tune, and the Segment widget shows the result on the other slices.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

SAMPLES = ("em", "nuclei", "ct")
CT_TRAIN_SLICES = (2, 9, 16)
CT_LIVER = 5  # TotalSegmentator's liver label in the sample's reference labels


def run_demo(sample: str = "em", screenshot: str | None = None, minutes: float = 2.0) -> int:
    """Open napari, load ``sample`` from this plugin and dock the widgets (see the module docstring).

    Args:
        sample: Sample key from the manifest (default ``"em"``).
        screenshot: Save a screenshot of the window to this path and close instead of running the event loop (for
            ``ct``, after fine-tuning for ``minutes`` and segmenting the whole volume).
        minutes: The CT demo's fine-tuning budget (default 2).
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
    viewer.dims.axis_labels = ("z", "y", "x")
    if sample == "ct":
        _ct(viewer, image, layers, minutes, run=bool(screenshot))
    else:
        _, widget = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
        widget.configure(image=image, all_levels=True)
        if sample == "nuclei":
            widget.configure(objects="learned")  # the model's own split of touching nuclei
        widget.run_stack()
    if screenshot:
        from qtpy.QtWidgets import QApplication

        viewer.dims.set_current_step(0, 12 if sample == "ct" else 0)  # ct: a slice not trained on
        QApplication.processEvents()  # lay the docks out first (nothing else ran the event loop before the picture)
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def _ct(viewer: Any, image: Any, layers: list[Any], minutes: float, run: bool) -> None:
    """Liver labels on three slices, the Fine-tune widget set to train a new CT model on them."""
    from napari.layers import Labels

    reference = next(ly for ly in layers if isinstance(ly, Labels))
    reference.visible = False
    liver = np.zeros(reference.data.shape, np.uint8)
    for z in CT_TRAIN_SLICES:
        liver[z] = reference.data[z] == CT_LIVER
    slices = ", ".join(str(z) for z in CT_TRAIN_SLICES)
    labels = viewer.add_labels(liver, name=f"liver (slices {slices})", scale=image.scale, opacity=0.5)
    _, seg = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    _, ft = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    seg.configure(image=image)
    ft.configure(image=image, labels=labels, base="new model (ct)", truth="listed slices", slices=slices)
    ft.configure(classes="liver", name="ct-liver-demo", budget_kind="minutes", budget=minutes)
    viewer.dims.set_current_step(0, CT_TRAIN_SLICES[1])
    if run:
        ft.start()  # synchronous here; on return the Segment widget shows the new model
        seg.configure(all_levels=True)
        seg.run_stack()
