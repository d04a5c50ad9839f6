"""Plot what depth buys: per-level validation score (model card) against throughput (bench_inference.py results).

    python benchmarks/bench_inference.py && python benchmarks/plot_levels.py   # needs matplotlib

Writes docs/levels_em.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    bench = json.loads((ROOT / "benchmarks/results/bench_inference.json").read_text())
    card = json.loads((ROOT / "weights/em-membranes.json").read_text())
    rows = {r["level"]: r for r in bench["levels"] if r["input"] == "5 x 512x512"}
    levels = [f"L{k}" for k in range(1, 5)]
    mps = [rows[lv]["mp_s"] for lv in levels]
    iou = [card["scores"][lv]["mean_iou"] for lv in levels]
    ref = rows["reference (all nodes, fp32 eager)"]["mp_s"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(mps, iou, "o-", color="#c2185b")
    for lv, x, y in zip(levels, mps, iou):
        off = (-62, 2) if x == max(mps) else (6, -22)  # the fastest point sits at the right edge
        ax.annotate(f"{lv}\n{x:.1f} MP/s", (x, y), textcoords="offset points", xytext=off, fontsize=8)
    ax.axvline(ref, color="grey", ls="--", lw=1)
    ax.text(ref, min(iou), " unpruned fp32 eager\n reference", color="grey", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlim(ref * 0.7, max(mps) * 1.6)
    ticks = [t for t in (0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20) if ref * 0.7 <= t <= max(mps) * 1.6]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])  # plain numbers: log-scale labels overlap at this width
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("throughput on 512 x 512 slices, 2 CPU cores (megapixels/s, log)")
    ax.set_ylabel("mean IoU, ISBI 2012 slices 25-29")
    ax.set_title("em-membranes: what each pruned depth buys", fontsize=10)
    rec = card.get("recommended_depth")
    if rec:
        ax.plot([mps[rec - 1]], [iou[rec - 1]], "s", ms=11, mfc="none", mec="black")
        ax.annotate("recommended", (mps[rec - 1], iou[rec - 1]), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = ROOT / "docs/levels_em.png"
    fig.savefig(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
