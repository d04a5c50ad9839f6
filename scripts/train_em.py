"""Train the shipped EM membrane UNet++ on ISBI 2012 (slices 0-24 train, 25-29 validation).

    python scripts/train_em.py --minutes 45 --out /tmp/em-ckpt --dest weights

trains, then packages the best state as ``weights/em-membranes.{safetensors,json}`` (``--package-only`` re-packages
an existing checkpoint folder).

Foreground = membrane (label 0 in ``train-labels.tif``). Random 256x256 patches, flips, 90-degree rotations,
intensity jitter; AdamW with cosine decay; deep supervision over all heads; bf16 autocast on CPUs that support it.
Per-level IoU of both classes on slices 25-29 is measured during training; the best state (mean IoU of the
deepest head) is saved as a model version with its card.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from _shipping import learning_rate, load_best, recommended, run_record, save_fp16_checked, write_checkpoint  # noqa: E402  (scripts/ is on sys.path when run)

from napari_unetpp.data.normalization import Normalization
from napari_unetpp.model.network import UNet, UNetPlusPlus
from napari_unetpp.runtimes.device import autocast_context, resolve_device
from napari_unetpp.training.losses import DeepSupervisionLoss

log = logging.getLogger("train_em")


def iou_both(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """IoU of membrane (True) and of cell interior (False)."""
    out = []
    for cls in (True, False):
        p, g = pred == cls, gt == cls
        out.append(float((p & g).sum() / max((p | g).sum(), 1)))
    return out[0], out[1]


def sample_batch(img: np.ndarray, mem: np.ndarray, rng: np.random.Generator, batch: int, patch: int):
    z = rng.integers(0, img.shape[0], batch)
    y = rng.integers(0, img.shape[1] - patch + 1, batch)
    x = rng.integers(0, img.shape[2] - patch + 1, batch)
    xs, ys = [], []
    for b in range(batch):
        a = img[z[b], y[b] : y[b] + patch, x[b] : x[b] + patch]
        t = mem[z[b], y[b] : y[b] + patch, x[b] : x[b] + patch]
        k = int(rng.integers(4))
        a, t = np.rot90(a, k), np.rot90(t, k)
        if rng.random() < 0.5:
            a, t = a[:, ::-1], t[:, ::-1]
        gain, bias, gamma = rng.uniform(0.8, 1.25), rng.uniform(-0.15, 0.15), rng.uniform(0.7, 1.5)
        a = np.clip(a, 0, 1) ** gamma * gain + bias + rng.normal(0, rng.uniform(0, 0.05), a.shape)
        xs.append(np.ascontiguousarray(a, dtype=np.float32))
        ys.append(np.ascontiguousarray(t))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).long()


@torch.no_grad()
def validate(
    model: UNetPlusPlus | UNet, img: np.ndarray, mem: np.ndarray, device: torch.device
) -> list[dict[str, float]]:
    model.eval()
    per_level: list[list[tuple[float, float]]] = []  # one list per output (UNet++: 4 levels, U-Net: 1)
    for z in range(img.shape[0]):
        x = torch.from_numpy(img[z][None, None].astype(np.float32)).to(device)
        with autocast_context(device):
            outs = model(x)
        per_level += [[] for _ in range(len(outs) - len(per_level))]
        for j, o in enumerate(outs):
            per_level[j].append(iou_both(torch.sigmoid(o.float())[0, 0].cpu().numpy() > 0.5, mem[z] > 0))
    model.train()
    res = []
    for scores in per_level:
        m, c = np.mean([s[0] for s in scores]), np.mean([s[1] for s in scores])
        res.append(
            {
                "iou_membrane": round(float(m), 4),
                "iou_cell": round(float(c), 4),
                "mean_iou": round(float((m + c) / 2), 4),
            }
        )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/isbi2012")
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument(
        "--steps",
        type=int,
        default=0,
        help="train for exactly this many steps instead of --minutes (the learning-rate schedule then "
        "follows steps, so two architectures see identical schedules and batches)",
    )
    ap.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-every", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--arch",
        default="unetpp",
        choices=["unetpp", "unet"],
        help="unet: the plain U-Net baseline with the same blocks, recipe and budget (not packaged)",
    )
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder (best.safetensors + history.json)")
    ap.add_argument("--dest", type=Path, default=None, help="package the best state into this folder (weights/)")
    ap.add_argument("--package-only", action="store_true", help="skip training; package --out into --dest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.package_only:
        return package(args.out, args.dest or Path("weights"), args.data)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = resolve_device(args.device)

    vol = tifffile.imread(args.data / "train-volume.tif")
    lab = tifffile.imread(args.data / "train-labels.tif")
    norm = Normalization(mode="percentile", low=1.0, high=99.8)
    img = norm.apply(vol.astype(np.float32), norm.bounds(vol))
    mem = (lab == 0).astype(np.uint8)  # membrane = foreground
    tr_img, tr_mem, va_img, va_mem = img[:25], mem[:25], img[25:], mem[25:]

    arch = UNetPlusPlus if args.arch == "unetpp" else UNet
    model = arch(features=tuple(args.features), norm="batch").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = DeepSupervisionLoss()
    budget = args.minutes * 60
    t0 = time.time()
    step, best, history = 0, -1.0, []
    args.out.mkdir(parents=True, exist_ok=True)

    def finished() -> bool:
        return step >= args.steps if args.steps else time.time() - t0 >= budget

    while not finished():
        frac = step / args.steps if args.steps else min((time.time() - t0) / budget, 1.0)
        lr = learning_rate(args.lr, frac, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample_batch(tr_img, tr_mem, rng, args.batch, args.patch)
        with autocast_context(device):
            outs = model(x.to(device))
        loss = loss_fn(outs, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.val_every == 0 or finished():
            scores = validate(model, va_img, va_mem, device)
            entry = {
                "step": step,
                "seconds": round(time.time() - t0, 1),
                "loss": round(float(loss), 4),
                "lr": lr,
                "val": scores,
            }
            history.append(entry)
            log.info(
                "step %d %.0fs loss %.4f val mean IoU per level %s",
                step,
                entry["seconds"],
                float(loss),
                [s["mean_iou"] for s in scores],
            )
            improved = scores[-1]["mean_iou"] > best
            best = max(best, scores[-1]["mean_iou"])
            write_checkpoint(
                args.out,
                model,
                entry,
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "device": str(device),
                    "config": model.config.to_dict(),
                    "arch": args.arch,
                    "steps": step,
                    "history": history,
                },
                improved,
            )
    log.info("done: %d steps in %.0f s, best mean IoU (deepest head) %.4f", step, time.time() - t0, best)
    return package(args.out, args.dest, args.data) if args.dest else 0


def package(ckpt: Path, dest: Path, data: Path, name: str = "em-membranes", margin: float = 0.005) -> int:
    """Evaluate the best checkpoint per level through the real prediction path on slices 25-29, pick the
    recommended depth (shallowest level within ``margin`` mean IoU of the best), save fp16 weights + card into
    ``dest`` and check the saved file reproduces the scores."""
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.model.card import ModelCard
    from napari_unetpp.model.loaded import LoadedModel

    model, hist, best = load_best(ckpt)
    norm = Normalization(mode="percentile", low=1.0, high=99.8)
    vol = tifffile.imread(data / "train-volume.tif")[25:]
    mem = tifffile.imread(data / "train-labels.tif")[25:] == 0

    def evaluate(m) -> dict[str, dict[str, float]]:
        pred = predict(vol, m, axes="ZYX", depth=m.max_depth, levels="all", precision="fp32")
        out = {}
        for lv, prob in pred.probabilities.items():
            im, ic = iou_both(prob.astype(np.float32) > 0.5, mem)
            out[f"L{lv}"] = {
                "iou_membrane": round(im, 4),
                "iou_cell": round(ic, 4),
                "mean_iou": round((im + ic) / 2, 4),
            }
        return out

    lm = LoadedModel.from_module(model, name=name, normalization=norm.to_dict())
    scores = evaluate(lm)
    rec = recommended(scores, "mean_iou", margin)
    card = ModelCard(
        name=name,
        architecture=model.config.to_dict(),
        normalization=norm.to_dict(),
        classes=["membrane"],
        description="Membranes in serial-section TEM of neural tissue (foreground = membrane); 2D UNet++ L1-L4.",
        training={
            "data": "ISBI 2012 EM segmentation challenge training volume, slices 0-24 (30 x 512 x 512, ~4 nm "
            "pixels, 50 nm sections, Drosophila first-instar larva ventral nerve cord)",
            "validation": "ISBI 2012 training volume slices 25-29 (never trained on)",
            "citations": [
                "Cardona et al. 2010, PLoS Biology 8(10): e1000502",
                "Arganda-Carreras et al. 2015, Frontiers in Neuroanatomy 9:142",
            ],
            "licence": "ISBI 2012 challenge data, released by the organisers for research use with citation",
            "recipe": "random 256x256 patches, flips, 90-degree rotations, gamma/gain/bias/noise jitter; AdamW "
            "(weight decay 1e-4), cosine learning rate, deep supervision with equal head weights on "
            "BCE + soft Dice; bf16 autocast on CPU; best state by mean IoU of head 4",
            **run_record(hist, best, "scripts/train_em.py"),
        },
        scores=scores,
        recommended_depth=rec,
    )
    save_fp16_checked(model, card, dest, evaluate, "mean_iou")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
