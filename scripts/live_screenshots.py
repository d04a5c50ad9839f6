"""Screenshots of a live session for the docs: before the first stroke, 10 s and 60 s after it.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/live_screenshots.py docs/

The EM sample, a fresh EM network (nothing trained on EM before), strokes painted through the scribble layer's
paint API as a person paints them (along membranes with label 2, through cell interiors with label 1), on slice 2;
the Segment widget shows each snapshot on that slice at L2. Prints the first-preview latency, the steps trained and
the main thread's longest stall.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main(out: Path) -> int:
    import napari
    from qtpy.QtWidgets import QApplication
    from skimage.morphology import skeletonize

    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-unetpp live")
    viewer.window.resize(1500, 950)
    img, ref = viewer.open_sample("napari-unetpp", "em")
    ref.visible = False
    _, seg = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    seg.configure(image=img)
    seg._depth_slider.value = 2
    _, lw = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Live")
    lw._image.value, lw._base.value, lw._device.value = img, "new network (em)", "cpu"
    viewer.dims.set_current_step(0, 2)

    def pump(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QApplication.processEvents()
            time.sleep(0.01)

    def shot(name: str) -> None:
        pump(0.5)
        viewer.screenshot(str(out / name), canvas_only=False, flash=False)
        print("saved", out / name)

    lw.start()
    pump(1.0)
    shot("live_0s.png")
    truth = np.asarray(ref.data[2]) == 1
    layer = lw.scribbles
    layer.brush_size = 3
    membrane = np.argwhere(skeletonize(truth))[::7]
    rng = np.random.default_rng(0)
    inside = np.argwhere(~truth)
    inside = inside[rng.choice(len(inside), 120, replace=False)]
    for y, x in membrane:
        layer.paint((2, int(y), int(x)), 2)
    for y, x in inside:
        layer.paint((2, int(y), int(x)), 1)
    t0 = time.perf_counter()
    lw.stall.start()
    while lw._shown is None and time.perf_counter() - t0 < 120:
        pump(0.1)
    first = time.perf_counter() - t0
    pump(max(0.0, 10 - (time.perf_counter() - t0)))
    shot("live_10s.png")
    pump(max(0.0, 60 - (time.perf_counter() - t0)))
    shot("live_60s.png")
    steps = lw.trainer.steps
    stall = lw.stall.longest_ms
    print(f"first preview {first:.1f} s after the strokes; {steps} steps in 60 s; longest stall {stall:.0f} ms")
    lw.stop()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")))
