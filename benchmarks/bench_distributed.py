"""Scale-out: throughput of one process against a dask LocalCluster of 1 and 2 workers, and the overhead per file.

    python benchmarks/bench_distributed.py --files 16 --json benchmarks/results/bench_distributed.json

Inputs: ``--files`` TIFFs of 512 x 512 ISBI 2012 slices (``../shared/data/isbi2012``), segmented by
``em-membranes`` at ``--depth`` (default its recommended L3), fp32 on every CPU. Rows:
- one process: the CLI's loop (``predict_file`` per file, the model loaded once);
- ``local:1`` / ``local:2``: the same jobs through ``run_distributed``: the whole run (cluster start and stop
  included), the start until the first file is back, and the steady rate (files between the first and the last
  result);
- overhead per file: wall time minus the network's own ``predict`` seconds, per file (reading, normalisation
  statistics, writing, and for the clusters their start and the transfers).
Torch threads per worker are the cores divided by the workers (``OMP_NUM_THREADS``), so every row uses all cores.
Each figure is the best of ``--repeats`` runs. The masks of every row are compared with the one-process masks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from bench_finetune import cpu_flags

from napari_unetpp.batch.distributed import run_distributed
from napari_unetpp.batch.files import PredictOptions, predict_file
from napari_unetpp.model.registry import load_model, model_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train-volume.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(cpu_flags(), f"| {os.cpu_count()} cores | fp32 | em-membranes L{args.depth}")
    work = Path(tempfile.mkdtemp(prefix="unetpp-bench-dist-"))
    try:
        vol = tifffile.imread(DATA)
        jobs = []
        for i in range(args.files):
            src = work / "in" / f"s{i:03d}.tif"
            src.parent.mkdir(exist_ok=True)
            tifffile.imwrite(src, vol[i % len(vol)])
            jobs.append(src)
        opts = PredictOptions(depth=args.depth, precision="fp32", device="cpu")
        rows = {}

        def one_process() -> tuple[float, float, list]:
            model = load_model("em-membranes")
            out = work / "one"
            out.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            res = [predict_file(s, out / f"{s.stem}_mask.tif", model, opts) for s in jobs]
            return time.perf_counter() - t0, sum(r.seconds for r in res), res

        best = min((one_process() for _ in range(args.repeats)), key=lambda r: r[0])
        wall, net, _ = best
        rows["one process"] = {
            "seconds": wall,
            "files_per_s": args.files / wall,
            "overhead_per_file_s": (wall - net) / args.files,
        }
        ref = {s.stem: tifffile.imread(work / "one" / f"{s.stem}_mask.tif") for s in jobs}
        for n in (1, 2):
            times = []
            for _ in range(args.repeats):
                out = work / f"local{n}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                first: list[float] = []
                t0 = time.perf_counter()
                res = run_distributed(
                    [(s, out / f"{s.stem}_mask.tif") for s in jobs],
                    str(model_file("em-membranes")),
                    opts,
                    f"local:{n}",
                    on_done=lambda r: first.append(time.perf_counter()),
                )
                total = time.perf_counter() - t0
                times.append((total, res, first, t0))
                same = all(np.array_equal(tifffile.imread(out / f"{s.stem}_mask.tif"), ref[s.stem]) for s in jobs)
            total, res, first, t0 = min(times, key=lambda r: r[0])
            net = sum(r.seconds for r in res)
            rows[f"local:{n}"] = {
                "seconds": total,
                "files_per_s": args.files / total,
                "overhead_per_file_s": (total - net / n) / args.files,
                "start_and_first_file_s": first[0] - t0,
                "steady_files_per_s": (len(first) - 1) / (first[-1] - first[0]),
                "masks_equal_one_process": bool(same),
            }
        base = rows["one process"]["files_per_s"]
        print(
            f"{'run':12} {'seconds':>8} {'files/s':>8} {'vs one':>7} {'overhead/file':>14} {'start+1st':>10} "
            f"{'steady files/s':>15} {'vs one':>7} {'masks equal':>12}"
        )
        for k, r in rows.items():
            steady = r.get("steady_files_per_s", r["files_per_s"])
            print(
                f"{k:12} {r['seconds']:8.1f} {r['files_per_s']:8.2f} {r['files_per_s'] / base:6.2f}x "
                f"{r['overhead_per_file_s']:13.2f}s {r.get('start_and_first_file_s', 0):9.1f}s {steady:15.2f} "
                f"{steady / base:6.2f}x {str(r.get('masks_equal_one_process', '-')):>12}"
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"cpu": cpu_flags(), "cores": os.cpu_count(), "files": args.files, "rows": rows}, indent=1)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
