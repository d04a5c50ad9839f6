"""The device pipeline against the host pipeline and the network alone: ``predict()`` Mpx/s per level.

    python benchmarks/bench_device.py [--device cuda] [--precision fp16] [--json benchmarks/results/bench_device.json]

For each stack shape and level: the network alone on the very tiles ``predict`` runs (already on the device, the
same batch, eager with autocast: the ceiling ``predict`` can reach), then ``predict()`` with the host pipeline
(NumPy on the CPU around the network) and with the device pipeline (everything in torch on the device), each warm
(a run before the timed one). Prints the CPU flags, the device and the precision; on CUDA the shapes are the issue's
32 x 512^2 and 4 x 2048^2 (real EM slices tiled to size), on the CPU 4 x 512^2 and 1 x 1024^2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_finetune import cpu_flags  # noqa: E402

from napari_unetpp import load_model, predict  # noqa: E402
from napari_unetpp.inference.plan import plan_prediction  # noqa: E402
from napari_unetpp.runtimes import make_backend, release_pending  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"


def stack_of(shape: tuple[int, int, int]) -> np.ndarray:
    """Real ISBI EM slices, tiled (mirrored) to ``shape``."""
    img = tifffile.imread(SAMPLES / "isbi2012_z25-29.tif")
    n, h, w = shape
    reps = (-(-n // len(img)), -(-h // img.shape[1]), -(-w // img.shape[2]))
    return np.tile(img, reps)[:n, :h, :w]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def network_alone(x: np.ndarray, model, depth: int, device: torch.device, precision: str, reps: int) -> float:
    """Seconds per run of the network on the tiles ``predict`` would run (normalised, on the device)."""
    plan = plan_prediction(x, model, depth=depth, device=device)
    backend = make_backend(model, plan.net, depth, device, precision, plan.tiles.tile_shape, "torch", plan.batch)
    tiles = [torch.from_numpy(p.read(t)) for p in plan.planes() for t in p.to_run]
    batches = [torch.stack(tiles[i : i + plan.batch]).to(device) for i in range(0, len(tiles), plan.batch)]
    for b in batches[:1]:
        backend.tensor(b)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        for b in batches:
            backend.tensor(b)
    sync(device)
    return (time.perf_counter() - t) / reps


def timed_predict(x: np.ndarray, model, reps: int, **kw) -> tuple[float, str]:
    predict(x, model, **kw)  # warm: allocator, cuDNN's algorithms, a compile that pays
    t = time.perf_counter()
    for _ in range(reps):
        pred = predict(x, model, **kw)
    return (time.perf_counter() - t) / reps, pred.ran_on


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--levels", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    shapes = [(32, 512, 512), (4, 2048, 2048)] if device.type == "cuda" else [(4, 512, 512), (1, 1024, 1024)]
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"CPU flags: {cpu_flags()} · device: {where} · precision {precision} · torch {torch.__version__}")
    model = load_model("em-membranes")
    rows = []
    print(
        "| stack | level | network alone Mpx/s | predict host Mpx/s | predict device Mpx/s | device / host | "
        "device / network |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        x = stack_of(shape)
        mpx = x.size / 1e6
        for k in args.levels:
            release_pending()
            net_s = network_alone(x, model, k, device, precision, args.reps)
            kw = dict(depth=k, device=device, precision=precision, runtime="torch")
            host_s, _ = timed_predict(x, model, args.reps, pipeline="host", **kw)
            dev_s, ran_on = timed_predict(x, model, args.reps, pipeline="device", **kw)
            row = {
                "stack": "x".join(map(str, shape)),
                "level": k,
                "network_mpx_s": round(mpx / net_s, 2),
                "host_mpx_s": round(mpx / host_s, 2),
                "device_mpx_s": round(mpx / dev_s, 2),
                "device_over_host": round(host_s / dev_s, 3),
                "device_over_network": round(net_s / dev_s, 3),
                "ran_on": ran_on,
            }
            rows.append(row)
            print(
                f"| {row['stack']} | L{k} | {row['network_mpx_s']} | {row['host_mpx_s']} | {row['device_mpx_s']} | "
                f"{row['device_over_host']}x | {row['device_over_network']:.0%} |",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu_flags": cpu_flags(), "device": where, "precision": precision, "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
