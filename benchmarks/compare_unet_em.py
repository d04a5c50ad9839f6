"""UNet++ against a plain U-Net on ISBI 2012 with the same recipe and budget: a table from two training runs.

Equal steps (the papers' protocol: the same epochs, here the same 1000 batches and learning-rate schedule):

    python scripts/train_em.py --arch unetpp --steps 1000 --val-every 100 --out /tmp/em-unetpp
    python scripts/train_em.py --arch unet   --steps 1000 --val-every 100 --out /tmp/em-unet
    python benchmarks/compare_unet_em.py /tmp/em-unetpp /tmp/em-unet --json benchmarks/results/em_pair_1000steps.json

Equal wall-clock time: the same with ``--minutes M`` instead of ``--steps``.

Both runs use scripts/train_em.py unchanged apart from the network: same patches, augmentation, optimiser,
schedule, seed and budget on the same machine. Scores are IoU on ISBI slices 25-29 (never trained on) at each
validation. The table shows, per network (UNet++ per level, U-Net its one head), the best validation (selected on
these same slices, so optimistic for both), the last one and the mean of the last three (no selection; validations
swing by about a point from one to the next, so the mean is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def best(history: list[dict], level: int) -> dict:
    return max(history, key=lambda h: h["val"][level]["mean_iou"])


def tail_mean(history: list[dict], level: int, n: int = 3) -> float:
    return round(sum(h["val"][level]["mean_iou"] for h in history[-n:]) / len(history[-n:]), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unetpp", type=Path)
    ap.add_argument("unet", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    pp = json.loads((args.unetpp / "history.json").read_text())
    un = json.loads((args.unet / "history.json").read_text())
    from napari_unetpp.model.network import UNet, UNetPlusPlus, count_parameters

    rows = []
    n_levels = len(pp["history"][0]["val"])
    for lv in range(n_levels):
        b = best(pp["history"], lv)
        rows.append(
            {
                "network": f"UNet++ L{lv + 1}",
                "params": count_parameters(UNetPlusPlus.from_config(pp["config"]).pruned(lv + 1)),
                "steps": pp.get("steps"),
                **b["val"][lv],
                "at_step": b["step"],
                "last_mean_iou": pp["history"][-1]["val"][lv]["mean_iou"],
                "last3_mean_iou": tail_mean(pp["history"], lv),
                "seconds": pp["history"][-1]["seconds"],
            }
        )
    b = best(un["history"], 0)
    rows.append(
        {
            "network": "U-Net",
            "params": count_parameters(UNet.from_config(un["config"])),
            "steps": un.get("steps"),
            **b["val"][0],
            "at_step": b["step"],
            "last_mean_iou": un["history"][-1]["val"][0]["mean_iou"],
            "last3_mean_iou": tail_mean(un["history"], 0),
            "seconds": un["history"][-1]["seconds"],
        }
    )
    print(
        f"{'network':10} {'params':>8} {'steps':>6} {'wall s':>6} {'best at':>7}  {'IoU membrane':>12} "
        f"{'IoU cell':>8} {'mean IoU':>8} {'last':>6} {'last 3':>6}"
    )
    for r in rows:
        print(
            f"{r['network']:10} {r['params'] / 1e6:7.2f}M {r['steps'] or 0:>6} {r['seconds']:6.0f} "
            f"{r['at_step']:>7}  {r['iou_membrane']:12.4f} {r['iou_cell']:8.4f} {r['mean_iou']:8.4f} "
            f"{r['last_mean_iou']:6.4f} {r['last3_mean_iou']:6.4f}"
        )
    gap = rows[n_levels - 1]["mean_iou"] - rows[-1]["mean_iou"]
    gap_last = rows[n_levels - 1]["last_mean_iou"] - rows[-1]["last_mean_iou"]
    gap_last3 = rows[n_levels - 1]["last3_mean_iou"] - rows[-1]["last3_mean_iou"]
    print(
        f"UNet++ L{n_levels} - U-Net (mean IoU of both classes, in points): {gap * 100:+.2f} at each run's best "
        f"validation, {gap_last * 100:+.2f} at the last, {gap_last3 * 100:+.2f} over the last three"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "unetpp": str(args.unetpp),
                    "unet": str(args.unet),
                    "unetpp_args": pp["args"],
                    "unet_args": un["args"],
                    "rows": rows,
                    "gap_points": round(gap * 100, 2),
                    "gap_points_last": round(gap_last * 100, 2),
                    "gap_points_last3": round(gap_last3 * 100, 2),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
