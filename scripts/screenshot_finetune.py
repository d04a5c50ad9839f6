"""Screenshot of the correct -> fine-tune -> re-segment loop on data the shipped model never saw (real thread worker).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_finetune.py --out docs/finetune_nuclei.png

Opens the cells3d nuclei sample, segments it with the EM membrane model (wrong domain: poor), "corrects" slices 2 and
6 by copying the reference labels into the mask through napari's paint path, fine-tunes for ``--minutes`` in a
napari thread worker, waits for the Segment widget to show the new version, and saves a screenshot.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/finetune_nuclei.png")
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--slices", type=int, nargs="+", default=[2, 6])
    args = ap.parse_args()
    os.environ.setdefault("NAPARI_UNETPP_HOME", tempfile.mkdtemp(prefix="unetpp-shot-"))
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1550, 980)
    img, ref = viewer.open_sample("napari-unetpp", "nuclei")
    _, seg = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    seg.configure(model="em-membranes@v1", image=img)
    app = QApplication.instance()

    def wait(cond, timeout=900):
        t0 = time.time()
        while not cond() and time.time() - t0 < timeout:
            app.processEvents()
            time.sleep(0.02)

    viewer.dims.set_current_step(0, 5)
    seg.configure(depth=3)
    seg.preview()
    wait(lambda: not seg.busy and "[UNet++ mask]" in " ".join(ly.name for ly in viewer.layers))
    mask = viewer.layers["cells3d nuclei [UNet++ mask]"]
    before = np.array(mask.data[5])
    _, ft = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Fine-tune")
    ft.configure(labels=mask)
    for z in args.slices:
        want = (np.asarray(ref.data[z]) > 0).astype(mask.data.dtype)
        yy, xx = np.nonzero(np.asarray(mask.data[z]) != want)
        mask.data_setitem((np.full(yy.shape, z), yy, xx), want[yy, xx])
    ft.configure(budget=args.minutes)
    t0 = time.time()
    ft.start()
    wait(lambda: ft.result is not None and not ft.running)
    print(f"fine-tuned in {time.time() - t0:.0f} s: {ft.status}")
    wait(lambda: not seg.busy)
    new = viewer.layers["cells3d nuclei [UNet++ mask 2]"]
    gt = np.asarray(ref.data[5]) > 0

    def d(a):
        a = a > 0
        return 2 * (a & gt).sum() / (a.sum() + gt.sum())

    print(f"slice 5 (not corrected): Dice before {d(before):.3f}, after {d(new.data[5]):.3f}")
    mask.visible = False
    new.opacity = 0.45
    viewer.dims.set_current_step(0, 5)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    viewer.screenshot(args.out, canvas_only=False)
    print(f"wrote {args.out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
