"""Inference benchmark: pruned depths L1..L4 against a plain eager fp32 reference, in one process.

    python benchmarks/bench_inference.py [--model em-membranes] [--repeats 3] [--skip-stack]

For 512 x 512 slices (8: the five ISBI 2012 validation slices and three of them turned; and the five alone) and a
2048 x 2048 image (4 x 4 real slices), per depth:
megapixels/s of the full ``predict()`` pipeline (normalise, tile, pruned forward, blend, threshold) run back to back
(each run reuses the memory the last one kept, as the files of a batch do), the seconds of a single run after that
memory was given back (automatic levels), peak extra memory while it runs (from memory given back), and the ratio of
its time to the reference: the same architecture's plain eager fp32 forward (every node, every head, batch norm
unfused, no autocast), as a library that does not prune would run it, on the same input. Masks are compared with the
reference's head-k mask (Dice). Each runtime is also forced (PyTorch, ONNX Runtime, OpenVINO; on a CPU with native
bf16 at every level and in bf16 too: PyTorch's autocast and OpenVINO bf16, beside fp32). Then an ablation of the
optimisations at L4, and the bounded-memory check: a 64 x 2048 x 2048 uint16 TIFF stack predicted by the CLI in a
child process, its peak RSS against the input size + 1.5 GB.
Prints markdown tables; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_unetpp import load_model, predict
from napari_unetpp.napari.samples import em_sample
from napari_unetpp.runtimes import onnx_available, openvino_available, release_pending
from napari_unetpp.runtimes.device import autocast_context, cpu_supports_bf16, optimize_for_inference, precision_name
from napari_unetpp.training.metrics import dice_score


class PeakRSS:
    """Samples this process's resident memory every few ms; ``extra_mb`` = peak minus the level at start."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, repeats: int, best: bool = False):
    """Seconds of ``fn`` after a warm-up: the median of ``repeats`` runs (the fastest with ``best``), and its output."""
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(min(times) if best else np.median(times)), out


def reference_forward(ref: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    """Plain eager fp32 forward of every node and head, one slice at a time; returns head probabilities."""
    outs = []
    with torch.no_grad():
        for s in x:
            logits = ref(torch.from_numpy(s[None, None]))
            outs.append([torch.sigmoid(o)[0, 0].numpy() for o in logits])
    return [np.stack([o[j] for o in outs]) for j in range(len(outs[0]))]


FLOPS: dict[int, float] = {}  # per level: multiply-adds x 2 per input pixel of the pruned network
FLOPS_ALL: dict[int, float] = {}  # what the reference computes beyond: every node and head (one entry)
SGEMM = [1.0]  # GFLOP/s of a plain 2048^2 fp32 matrix product in torch: the practical fp32 ceiling here


def count_flops(module: torch.nn.Module, depth: int, size: int = 256) -> float:
    """Floating-point operations per input pixel of ``module``'s depth-``depth`` forward (convolutions only)."""
    total = [0.0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.ConvTranspose2d):
            total[0] += 2 * inp[0].numel() * m.out_channels * m.kernel_size[0] * m.kernel_size[1] / m.groups
        elif isinstance(m, torch.nn.Conv2d):
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hs = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        module(torch.zeros(1, module.config.in_channels, size, size), depth=depth)
    for h in hs:
        h.remove()
    return total[0] / size**2


def sgemm_gflops() -> float:
    """The fastest of 10 products (the ceiling; a median was measured at 106 and 168 GFLOP/s a minute apart on a
    shared 2-core machine, which made every share of it meaningless): shares of it err on the low side."""
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    t, _ = timed(lambda: torch.mm(a, b), 10, best=True)
    return 2 * 2048**3 / t / 1e9


def bench_images(lm, name: str, img: np.ndarray, repeats: int, tile: int | None, full: bool = True) -> list[dict]:
    norm = lm.normalization
    x = norm.apply(img.astype(np.float32), norm.bounds(img))
    ref = copy.deepcopy(lm.module).eval()
    mp = img.size / 1e6
    # timings without the memory sampler (its thread would take a core); then one sampled run for memory
    t_ref, ref_probs = timed(lambda: reference_forward(ref, x), repeats)
    with PeakRSS() as mem:
        reference_forward(ref, x)
    rows = [
        {
            "input": name,
            "level": "reference (all nodes, fp32 eager)",
            "seconds": t_ref,
            "mp_s": mp / t_ref,
            "peak_extra_mb": mem.extra_mb,
            "vs_reference": 1.0,
            "gflop_s": sum(FLOPS_ALL.values()) * img.size / t_ref / 1e9,
            "of_sgemm": sum(FLOPS_ALL.values()) * img.size / t_ref / 1e9 / SGEMM[0],
            "runtime": "PyTorch eager fp32",
            "dice_vs_reference": 1.0,
            "flips_near_0.5": "-",
        }
    ]
    levels = range(1, lm.max_depth + 1)
    top = lm.max_depth
    runs = [(f"L{k}", k, {"precision": "auto"}, tile) for k in levels]
    runs += [(f"L{top} fp32", top, {"precision": "fp32"}, tile)]
    if full:
        bf16 = cpu_supports_bf16()  # the bf16 rows beside the fp32 ones, at every level
        forced = [("torch", "PyTorch", "fp32")] + ([("torch", "PyTorch", "bf16")] if bf16 else [])
        if onnx_available() is None:  # each runtime forced, if installed
            forced += [("onnx", "ONNX Runtime", "fp32")]
        if openvino_available() is None:
            forced += [("openvino", "OpenVINO", "fp32")] + ([("openvino", "OpenVINO", "bf16")] if bf16 else [])
        at = levels if bf16 else [top]
        runs += [(f"L{k} {what} {p}", k, {"precision": p, "runtime": rt}, tile) for k in at for rt, what, p in forced]
        runs += [(f"L{k} int8", k, {"precision": "int8"}, tile) for k in levels]
        if max(img.shape[-2:]) > 1024:  # larger than the default tile budget: also show the untiled run
            runs += [(f"L{top} whole image", top, {"precision": "auto"}, 1 << 16)]
    for label, k, kw, tl in runs:
        # back to back, as a batch of files or a benchmark runs: each run reuses the memory the last one kept
        t, pred = timed(lambda: predict(img, lm, depth=k, tile=tl, **kw), repeats)
        t_cold = None
        if kw == {"precision": "auto"} and tl == tile:  # and a single run, after the kept memory was given back
            t_cold, _ = timed(lambda: (release_pending(), predict(img, lm, depth=k, tile=tl, **kw)), repeats)
        release_pending()  # the peak is measured from memory given back
        with PeakRSS() as mem:
            predict(img, lm, depth=k, tile=tl, **kw)
        ref_k = ref_probs[k - 1]
        flips = pred.mask.astype(bool) != (ref_k >= 0.5)
        near = float((np.abs(ref_k[flips] - 0.5) < 0.05).mean()) if flips.any() else 1.0
        rows.append(
            {
                "input": name,
                "level": label,
                "seconds": t,
                "seconds_alone": t_cold,
                "mp_s": mp / t,
                "gflop_s": FLOPS[k] * img.size / t / 1e9,
                "of_sgemm": FLOPS[k] * img.size / t / 1e9 / SGEMM[0],
                "runtime": pred.ran_on.split(" · ", 1)[-1],
                "peak_extra_mb": mem.extra_mb,
                "vs_reference": t_ref / t,
                "dice_vs_reference": dice_score(pred.mask, ref_k >= 0.5),
                "flips_near_0.5": f"{flips.mean():.4%} ({near:.0%})",
            }
        )
    return rows


def network_alone(lm, img: np.ndarray, repeats: int) -> list[dict]:
    """Each level's network alone, as ``predict`` runs it (the runtime the automatic choice made), in steady state:
    batches of 4 slices, after a warm-up, nothing released between runs. Against ``predict`` end to end this shows
    what the pipeline around it costs: the last partial batch, and the first batch after the memory a run held was
    given back."""
    from napari_unetpp.runtimes import make_backend

    norm = lm.normalization
    x = norm.apply(img.astype(np.float32), norm.bounds(img))[:4, None].copy()
    net = lm.inference_module("cpu")
    rows = []
    for k in range(1, lm.max_depth + 1):
        backend = make_backend(lm, net, k, torch.device("cpu"), "auto", (512, 512), "auto", 4)
        backend(x)  # decides (already known from predict's runs) and warms up
        t, _ = timed(lambda b=backend: b(x), repeats)
        gflop_s = FLOPS[k] * x[:, 0].size / t / 1e9
        rows.append(
            {
                "level": f"L{k}",
                "runtime": f"{backend.choice.runtime} {backend.choice.precision}",  # decided by the first call
                "ms_per_slice": 1000 * t / len(x),
                "gflop_s": gflop_s,
                "of_sgemm": gflop_s / SGEMM[0],
            }
        )
        backend.release()
    return rows


def openvino_kernels(lm, depth: int) -> dict[str, int]:
    """Which kernels OpenVINO's bf16 graph runs its convolutions with at ``depth`` (its execution graph's primitive
    types, e.g. ``brgconv_avx512_core_bf16``, or ``..._amx_bf16`` where the CPU has AMX), and how many of each."""
    from napari_unetpp.runtimes import onnx_graph
    from napari_unetpp.runtimes.openvino_backend import openvino_compiled

    model = openvino_compiled(None, onnx_graph(lm.inference_module("cpu"), depth), "bf16")
    kinds: dict[str, int] = {}
    for part in (model.head, model.compiled):
        for op in part.get_runtime_model().get_ordered_ops() if part is not None else []:
            info = op.get_rt_info()
            if info["layerType"].astype(str) in ("Convolution", "Deconvolution"):
                kind = f"{info['layerType'].astype(str)}: {info['primitiveType'].astype(str)}"
                kind += f" ({info['runtimePrecision'].astype(str)})"
                kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def ablation(lm, img: np.ndarray, repeats: int) -> list[dict]:
    """Forward-only timings at L4 on 512 x 512 slices: what each optimisation buys."""
    norm = lm.normalization
    x = torch.from_numpy(norm.apply(img.astype(np.float32), norm.bounds(img))[:, None])
    plain = copy.deepcopy(lm.module).eval()
    cpu = torch.device("cpu")
    optimized = optimize_for_inference(lm.module, cpu)  # folded batch norm, channels-last
    fused = copy.deepcopy(optimized).to(memory_format=torch.contiguous_format)  # .to() converts in place
    variants = [
        ("eager fp32, no_grad (reference)", plain, "fp32", torch.no_grad, False),
        ("+ inference_mode", plain, "fp32", torch.inference_mode, False),
        ("+ batch norm folded", fused, "fp32", torch.inference_mode, False),
        ("+ channels-last (weights and input)", optimized, "fp32", torch.inference_mode, True),
        (
            "+ bf16 autocast" if cpu_supports_bf16() else "+ bf16 autocast (no native bf16 here)",
            optimized,
            "bf16",
            torch.inference_mode,
            True,
        ),
    ]
    rows = []
    base = None
    for label, net, prec, ctx, cl in variants:

        def run():
            with ctx(), autocast_context(cpu, prec):
                for s in x:
                    inp = s[None].contiguous(memory_format=torch.channels_last) if cl else s[None]
                    net(inp, depth=4)

        t, _ = timed(run, repeats)
        base = base or t
        rows.append({"variant": label, "seconds": t, "speedup": base / t})
    return rows


def stack_memory(model: str, depth: int | None, workdir: Path) -> dict:
    """Predict a 64 x 2048 x 2048 uint16 stack with the CLI in a child process; report its peak RSS."""
    tiles = em_sample()[0][0]  # five real 512 x 512 slices
    path = workdir / "stack.tif"
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for z in range(64):
            mosaic = np.block([[tiles[(z + i + j) % 5] for j in range(4)] for i in range(4)]).astype(np.uint16)
            plane = mosaic * 200 + rng.integers(0, 200, mosaic.shape, dtype=np.uint16)
            tw.write(plane[None], contiguous=True, metadata={"axes": "ZYX"} if z == 0 else None)
    in_bytes = 64 * 2048 * 2048 * 2
    cmd = [
        sys.executable,
        "-m",
        "napari_unetpp.cli",
        "predict",
        str(path),
        "-o",
        str(workdir / "mask.tif"),
        "--model",
        model,
        "-q",
    ] + (["--depth", str(depth)] if depth else [])
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    peak = int(r.stdout.strip().splitlines()[-1]) * 1024
    return {
        "input_gb": in_bytes / 2**30,
        "peak_rss_gb": peak / 2**30,
        "limit_gb": (in_bytes + 1.5 * 2**30) / 2**30,
        "seconds": seconds,
        "mp_s": 64 * 2048 * 2048 / 1e6 / seconds,
        "cli": r.stdout.strip().splitlines()[0],
    }


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join(
        "| "
        + " | ".join("-" if r.get(c[0]) is None else format(r[c[0]], c[2]) if c[2] else str(r[c[0]]) for c in cols)
        + " |"
        for r in rows
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="em-membranes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-stack", action="store_true", help="skip the 64 x 2048 x 2048 memory check")
    args = ap.parse_args()
    lm = load_model(args.model)
    slices = em_sample()[0][0]
    big = np.block([[slices[(i + j) % 5] for j in range(4)] for i in range(4)])[None]
    info = {
        "cpu": next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
            platform.processor() or platform.machine(),
        ),
        "threads": torch.get_num_threads(),
        "bf16": cpu_supports_bf16(),
        "torch": torch.__version__,
        "model": lm.card.id,
    }
    for k in range(1, lm.max_depth + 1):
        FLOPS[k] = count_flops(lm.module, k)
    FLOPS_ALL[0] = FLOPS[lm.max_depth]  # every node of the deepest level is every node; extra heads are 1x1
    SGEMM[0] = sgemm_gflops()
    flags = sorted(
        set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
    )
    info["cpu_flags"] = " ".join(flags)
    info["sgemm_gflop_s"] = round(SGEMM[0], 1)
    info["precision_auto"] = precision_name(torch.device("cpu"), "auto")
    print(f"# napari-unetpp inference benchmark\n{info}\n")
    # 8 slices: the five validation slices and three of them turned by 90 degrees (the 8 x 512^2 goal)
    eight = np.concatenate([slices, np.rot90(slices[:3], axes=(1, 2))])
    rows = bench_images(lm, "8 x 512x512", eight, args.repeats, None, full=False)
    rows += bench_images(lm, "5 x 512x512", slices, args.repeats, None)
    rows += bench_images(lm, "2048x2048", big, max(1, args.repeats - 1), None)  # default tile budget
    cols = [
        ("input", "input", ""),
        ("level", "level", ""),
        ("seconds", "s", ".3f"),
        ("seconds_alone", "s after a release", ".3f"),
        ("mp_s", "MP/s", ".2f"),
        ("gflop_s", "GFLOP/s", ".0f"),
        ("of_sgemm", "of sgemm", ".0%"),
        ("runtime", "what ran (and why)", ""),
        ("peak_extra_mb", "peak extra MB", ".0f"),
        ("vs_reference", "x reference", ".2f"),
        ("dice_vs_reference", "mask Dice vs ref", ".4f"),
        ("flips_near_0.5", "pixels flipped (share with ref p within 0.05 of 0.5)", ""),
    ]
    print(table(rows, cols))
    goal = 4 if cpu_supports_bf16() else 2
    for name in ("8 x 512x512", "5 x 512x512", "2048x2048"):
        by = {r["level"]: r for r in rows if r["input"] == name}
        print(
            f"\n{name}: L1 is {by['L1']['mp_s'] / by['L4']['mp_s']:.2f}x faster than L4 (target >= 5); "
            f"L4 is {by['L4']['vs_reference']:.2f}x the reference (target >= {goal}), mask Dice "
            f"{by['L4']['dice_vs_reference']:.4f} (target >= 0.998); in fp32 {by['L4 fp32']['vs_reference']:.2f}x "
            f"with Dice {by['L4 fp32']['dice_vs_reference']:.4f}"
        )
    alone = network_alone(lm, slices, args.repeats)
    print("\n## The network alone, steady state, batches of 4 x 512x512 (what predict runs, without the pipeline)\n")
    cols_alone = [
        ("level", "level", ""),
        ("runtime", "runtime", ""),
        ("ms_per_slice", "ms per slice", ".0f"),
        ("gflop_s", "GFLOP/s", ".0f"),
        ("of_sgemm", "of sgemm", ".0%"),
    ]
    print(table(alone, cols_alone))
    if cpu_supports_bf16() and openvino_available() is None:
        kernels = openvino_kernels(lm, lm.max_depth)
        print(f"\n## OpenVINO bf16 at L{lm.max_depth}: the kernels its convolutions run\n")
        print("\n".join(f"- {k}: {n}" for k, n in kernels.items()))
        info["openvino_bf16_kernels"] = kernels
    abl = ablation(lm, slices, args.repeats)
    print("\n## L4 forward on 5 x 512x512, what each step buys\n")
    print(table(abl, [("variant", "variant", ""), ("seconds", "s", ".3f"), ("speedup", "x reference", ".2f")]))
    result = {"info": info, "levels": rows, "network_alone": alone, "ablation": abl}
    if not args.skip_stack:
        with tempfile.TemporaryDirectory() as tmp:
            st = stack_memory(args.model, None, Path(tmp))
        print("\n## 64 x 2048 x 2048 uint16 stack through the CLI (recommended depth)\n")
        print(
            f"input {st['input_gb']:.2f} GB, peak RSS {st['peak_rss_gb']:.2f} GB (limit {st['limit_gb']:.2f} GB), "
            f"{st['seconds']:.0f} s = {st['mp_s']:.2f} MP/s\n{st['cli']}"
        )
        result["stack"] = st
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_inference.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
