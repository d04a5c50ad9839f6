"""UNet++ against a plain U-Net on ISBI 2012 with the same recipe and budget: a table from two training runs.

    python scripts/train_em.py --arch unetpp --minutes 12 --out /tmp/em-unetpp
    python scripts/train_em.py --arch unet   --minutes 12 --out /tmp/em-unet
    python benchmarks/compare_unet_em.py /tmp/em-unetpp /tmp/em-unet --json benchmarks/results/unet_vs_unetpp_em.json

Both runs use scripts/train_em.py unchanged apart from the network: same patches, augmentation, optimiser,
schedule, seed and wall-clock budget on the same machine. Scores are IoU on ISBI slices 25-29 (never trained on) at
each validation; the table shows the best validation of each run (for UNet++ per level, for U-Net its one head).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def best(history: list[dict], level: int) -> dict:
    return max(history, key=lambda h: h["val"][level]["mean_iou"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("unetpp", type=Path)
    ap.add_argument("unet", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    pp = json.loads((args.unetpp / "history.json").read_text())
    un = json.loads((args.unet / "history.json").read_text())
    from napari_unetpp.model import UNet, UNetPlusPlus, count_parameters

    rows = []
    n_levels = len(pp["history"][0]["val"])
    for lv in range(n_levels):
        b = best(pp["history"], lv)
        rows.append({"network": f"UNet++ L{lv + 1}", "params": count_parameters(
            UNetPlusPlus.from_config(pp["config"]).pruned(lv + 1)), "steps": pp.get("steps"), **b["val"][lv],
            "at_step": b["step"]})
    b = best(un["history"], 0)
    rows.append({"network": "U-Net", "params": count_parameters(UNet.from_config(un["config"])), "steps": un.get("steps"),
                 **b["val"][0], "at_step": b["step"]})
    print(f"{'network':10} {'params':>8} {'steps':>6} {'best at':>7}  {'IoU membrane':>12} {'IoU cell':>8} "
          f"{'mean IoU':>8}")
    for r in rows:
        print(f"{r['network']:10} {r['params'] / 1e6:7.2f}M {r['steps'] or 0:>6} {r['at_step']:>7}  "
              f"{r['iou_membrane']:12.4f} {r['iou_cell']:8.4f} {r['mean_iou']:8.4f}")
    gap = rows[n_levels - 1]["mean_iou"] - rows[-1]["mean_iou"]
    print(f"UNet++ L{n_levels} - U-Net: {gap * 100:+.2f} IoU points (mean of both classes)")
    if args.json:
        args.json.write_text(json.dumps({"unetpp": str(args.unetpp), "unet": str(args.unet), "rows": rows,
                                         "gap_points": round(gap * 100, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
