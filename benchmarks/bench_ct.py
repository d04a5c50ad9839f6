"""CT: teach a new model organs from a few labelled slices of the abdominal series, in 1, 2 and 4 minutes of the
user's wall clock; and how long reading the series takes.

    pip install -e ".[ct]"          # pydicom + nibabel
    python benchmarks/bench_ct.py --json benchmarks/results/bench_ct.json
    python benchmarks/bench_ct.py --summarize benchmarks/results/bench_ct.json

Data: ``../shared/data/ct-abdomen`` (20 axial slices, 0.98 x 0.98 x 2 mm, HU from DICOM; organ labels from
TotalSegmentator ``--fast``, which were computed at 3 mm and resampled, so neighbouring label slices repeat: that is
why held-out slices are at least 3 slices from every training slice).

Runs, each a ``new_model("ct")`` (soft-tissue window W400 L40) fine-tuned with the product's own ``fine_tune`` (recipe
``auto``, which picks ``scratch``), 2D slice by slice:
- liver from 1 (slice 9), 2 (2, 16) and 3 (2, 9, 16) labelled slices, at 1, 2 and 4 minutes;
- liver + spleen as one 3-class model from 3 slices, at 1, 2, 4 and 10 minutes (the spleen needs more steps);
- ``--dims 3``: the same as true 3D models (the labelled slices are sparse annotation inside the volume; pooling
  in-plane only at the first level, as the 2 mm slices ask), predicting the whole volume.
Scored by Dice per level on held-out slices 0, 5, 6, 12, 13, 19 (never trained or validated on), and at the depth the
card recommends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_finetune import cpu_flags  # the same CPU line as the fine-tuning benchmark

from napari_unetpp.inference.predict import predict
from napari_unetpp.io.images import read_image
from napari_unetpp.model.modalities import new_model
from napari_unetpp.runtimes.device import autocast_dtype, describe_device
from napari_unetpp.training import TrainingPair, fine_tune
from napari_unetpp.training.metrics import dice_score

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-abdomen"
HELD = [0, 5, 6, 12, 13, 19]
TRAIN = {1: [9], 2: [2, 16], 3: [2, 9, 16]}
LIVER, SPLEEN = 5, 1
SPACING = (2.0, 0.9765625, 0.9765625)


def reading_times(reps: int = 3) -> dict[str, float]:
    """Best of ``reps`` wall times to read the DICOM series (JPEG 2000 lossless) and the NIfTI labels."""
    out = {}
    for key, path in (
        ("dicom_series_s", SHARED / "dicom"),
        ("nifti_labels_s", SHARED / "labels_totalsegmentator_fast.nii.gz"),
    ):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            read_image(path)
            best = min(best, time.perf_counter() - t0)
        out[key] = round(best, 3)
    return out


def run(
    image: np.ndarray, organs: np.ndarray, classes: dict[str, int], train: list[int], minutes: float, dims: int = 2
) -> dict:
    """One new model (2D, or 3D with anisotropic pooling) trained for ``minutes`` on ``train`` slices; held-out Dice
    per level (a 3D model predicts the whole volume, scored on the held-out slices)."""
    target = np.zeros(organs.shape, np.uint8)
    for k, v in enumerate(classes.values(), start=1):
        target[organs == v] = k
    lm = new_model("ct", classes=list(classes), name="bench-ct", spatial_dims=dims, spacing=SPACING)
    t0 = time.perf_counter()
    res = fine_tune(
        lm,
        TrainingPair(image, target, axes="ZYX", slices=train, name="ct-abdomen", spacing=dict(zip("ZYX", SPACING))),
        minutes=minutes,
        device="cpu",
        name="bench-ct",
    )
    wall = time.perf_counter() - t0
    nc = res.model.module.config.num_classes
    if dims == 2:
        pred = predict(image[HELD], res.model, axes="ZYX", depth=res.model.max_depth, levels="all", device="cpu")
    else:  # context in Z: the whole volume, then the held-out slices
        pred = predict(image, res.model, axes="ZYX", depth=res.model.max_depth, levels="all", device="cpu")
        pred.probabilities = {lv: p[..., HELD, :, :] for lv, p in pred.probabilities.items()}
    gt = target[HELD]
    per, per_class = {}, {}
    for lv, p in pred.probabilities.items():
        mask = (p > 0.5).astype(np.uint8) if nc == 1 else p.argmax(0)
        per[lv] = round(dice_score(mask, gt, num_classes=nc), 4)
        per_class[lv] = {name: round(dice_score(mask == k, gt == k), 4) for k, name in enumerate(classes, start=1)}
    rec = res.recommended_depth
    return {
        "dims": dims,
        "pool": res.model.module.config.to_dict().get("pool"),
        "classes": list(classes),
        "train": train,
        "minutes": minutes,
        "wall_s": round(wall, 1),
        "steps": res.steps,
        "recipe": res.data.get("recipe", {}).get("name"),
        "recommended": rec,
        "held_out": per[rec],
        "held_out_per_class": per_class[rec],
        "levels": per,
        "levels_per_class": per_class,
        "val": res.scores,
    }


def summarize(out: dict) -> str:
    lines = [
        f"CPU flags: {out['cpu']}; precision {out['precision']}; {out['threads']} threads; device {out['device']}",
        f"reading: DICOM series (20 x 512^2, JPEG 2000) {out['reading']['dicom_series_s']:.2f} s, "
        f"NIfTI labels {out['reading']['nifti_labels_s']:.3f} s",
        "",
        "| model | classes | labelled slices | minutes | steps | held-out Dice (rec. level) | L1 | L2 | L3 | L4 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        lv = r["levels"]
        lv = {int(k): v for k, v in lv.items()}
        per = r["held_out_per_class"]
        detail = "" if len(per) == 1 else " (" + ", ".join(f"{k} {v:.3f}" for k, v in per.items()) + ")"
        slices = f"{len(r['train'])} ({', '.join(map(str, r['train']))})"
        lines.append(
            f"| {r.get('dims', 2)}D | {'+'.join(r['classes'])} | {slices} | {r['minutes']:g} | "
            f"{r['steps']} | {r['held_out']:.3f} at L{r['recommended']}{detail} | "
            + " | ".join(f"{lv[k]:.3f}" for k in sorted(lv))
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here (and update it after each run)")
    ap.add_argument("--summarize", type=Path, default=None, help="print the table of a results file and exit")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--slices", type=int, nargs="+", default=[1, 2, 3], help="numbers of labelled slices")
    ap.add_argument("--no-multiclass", action="store_true")
    ap.add_argument("--multiclass-minutes", type=float, nargs="+", default=[1, 2, 4, 10])
    ap.add_argument("--dims", type=int, choices=[2, 3], default=2, help="2D slice-wise or 3D anisotropic models")
    ap.add_argument("--append", action="store_true", help="add the runs to the --json file instead of replacing it")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(json.loads(args.summarize.read_text())))
        return 0
    torch.set_num_threads(torch.get_num_threads())
    image = read_image(SHARED / "dicom").data
    organs = read_image(SHARED / "labels_totalsegmentator_fast.nii.gz").data
    dtype = autocast_dtype(torch.device("cpu"))
    out = {
        "cpu": cpu_flags(),
        "precision": "fp32" if dtype is None else str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "device": describe_device(torch.device("cpu")),
        "reading": reading_times(),
        "runs": [],
    }
    print(f"CPU flags: {out['cpu']}; precision {out['precision']}; reading {out['reading']}", flush=True)
    if args.append and args.json and args.json.is_file():
        out["runs"] = json.loads(args.json.read_text())["runs"]
    jobs = [({"liver": LIVER}, TRAIN[n], m) for n in args.slices for m in args.minutes]
    if not args.no_multiclass:
        jobs += [({"liver": LIVER, "spleen": SPLEEN}, TRAIN[3], m) for m in args.multiclass_minutes]
    for classes, train, minutes in jobs:
        r = run(image, organs, classes, train, minutes, args.dims)
        out["runs"].append(r)
        print(json.dumps({k: r[k] for k in ("classes", "train", "minutes", "steps", "held_out", "levels")}), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    print(summarize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
