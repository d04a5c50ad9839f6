"""What ``predict()`` costs outside the network: the network replaced by a stub that returns ready probabilities.

    python benchmarks/bench_pipeline.py [--slices 32] [--repeats 5]

On a GPU the network runs a 512 x 512 slice in well under a millisecond at L1, so everything around it (intensity
statistics, tiling, normalisation, casting probabilities to float16/uint8, thresholds, writing the outputs) sets the
speed; on a CPU it is a few percent of the network's time. This times that part alone on real EM slices, in one
process, twice: as predict runs it now, and with the previous implementation of its two costliest steps put back
(probabilities cast to float16/uint8 by assigning float32 into the outputs, and ``np.percentile``), and checks that
both give the same outputs. The stub's copy of its output (what a real backend allocates) is included. Prints the
CPU flags and a markdown table; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import napari_unetpp.data.normalization as nm
import napari_unetpp.inference.predict as pr
import napari_unetpp.inference.writer as wr
from napari_unetpp import load_model, predict
from napari_unetpp.napari.samples import em_sample
from napari_unetpp.runtimes import Backend, Choice


class Stub(Backend):
    """Fixed random probabilities of the right shape, made once per batch shape (the time of a copy is left)."""

    def __init__(self, depth: int) -> None:
        self.depth, self.choice, self.made = depth, Choice("torch", "fp32", "network stubbed out"), {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape not in self.made:
            rng = np.random.default_rng(0)
            self.made[x.shape] = rng.random((x.shape[0], self.depth, 1, *x.shape[2:]), dtype=np.float32)
        return self.made[x.shape].copy()


def assigned(p: np.ndarray, prob_dtype: str) -> np.ndarray:
    """The previous implementation: float32 values, cast by the assignment into the float16 or uint8 output."""
    return np.clip(np.rint(p * 255.0), 0, 255) if prob_dtype == "uint8" else np.asarray(p, np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    info = {"cpu": platform.processor() or platform.machine(), "cpu_flags": " ".join(flags)}
    info["threads"] = torch.get_num_threads()
    print(f"# predict() without the network\n{info}\n")
    pr.make_backend = lambda loaded, net, depth, *a, **k: Stub(depth)  # type: ignore[assignment]
    lm = load_model("em-membranes")
    slices = em_sample()[0][0]
    stack = np.concatenate([slices] * (args.slices // len(slices) + 1))[: args.slices]
    current = (wr.as_prob, nm.percentiles)
    previous = (assigned, lambda x, q: np.asarray(np.percentile(x, q)))
    runs = [
        ("L1", dict(depth=1)),
        ("L4", dict(depth=4)),
        ("L4, every level kept", dict(depth=4, levels="all")),
        ("L4, every level kept, uint8", dict(depth=4, levels="all", prob_dtype="uint8")),
    ]
    rows = []
    for label, kw in runs:
        ms, outs = {}, {}
        for name, (cast, pct) in (("now", current), ("before", previous)):
            wr.as_prob, nm.percentiles = cast, pct  # type: ignore[assignment]
            outs[name] = predict(stack, lm, **kw)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                predict(stack, lm, **kw)
                times.append(time.perf_counter() - t0)
            ms[name] = 1000 * float(np.median(times)) / len(stack)
        wr.as_prob, nm.percentiles = current  # type: ignore[assignment]
        a, b = outs["now"], outs["before"]
        same = np.array_equal(a.mask, b.mask) and all(
            np.array_equal(a.probabilities[lv], b.probabilities[lv]) for lv in a.probabilities
        )
        rows.append(
            {
                "run": label,
                "ms_per_slice": ms["now"],
                "ms_per_slice_before": ms["before"],
                "speedup": ms["before"] / ms["now"],
                "mpx_s": stack[0].size / 1e6 / (ms["now"] / 1000),
                "same_outputs": same,
            }
        )
    print(f"{len(stack)} x 512 x 512 uint8 EM slices, network stubbed out, median of {args.repeats}\n")
    print("| run | ms per slice | before (cast on assignment, np.percentile) | x faster | Mpx/s | same outputs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['ms_per_slice']:.2f} | {r['ms_per_slice_before']:.2f} | {r['speedup']:.1f} | "
            f"{r['mpx_s']:.0f} | {'yes' if r['same_outputs'] else 'NO'} |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_pipeline.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0 if all(r["same_outputs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
