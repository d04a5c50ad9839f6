"""The CUDA path on a real GPU: memory given back after runs and cancels, out-of-memory retries that really happen,
where a fine-tuning step's time goes, and inference throughput per level against the memory-bound ceiling.

    python benchmarks/bench_gpu.py --json benchmarks/results/bench_gpu.json [--sections memory oom steps throughput]

Sections:

- ``memory``: ``torch.cuda.memory_allocated``/``memory_reserved`` and this process's ``nvidia-smi`` figure before
  anything ran, after a fine-tuning run, after a cancelled run (the generator closed mid-training), after a stopped
  run (the stop event), after ``predict`` and a cancelled ``predict``, and once the model is dropped.
- ``oom``: a per-process memory cap (``torch.cuda.set_per_process_memory_fraction``) that the batch sized from free
  memory does not know about, so the allocator really runs out: fine-tuning must retry with smaller batches and
  ``predict`` must halve its batch and give the same mask as an uncapped run.
- ``steps``: short fine-tuning runs in bf16 autocast, fp16 autocast (with a gradient scaler) and fp32, and bf16
  with the batches made in line instead of by the prefetching thread: steps, batch, seconds per step, and the time
  the loop waited for batches.
- ``throughput``: the network alone on 512 x 512 EM tiles per level: eager with autocast (what ``predict`` runs),
  eager in half weights, CUDA graphs of the half network (and ``torch.compile`` in bf16), in fp16 and bf16, batches
  of 8, 32 and 64; Mpx/s against the memory-bound ceiling (the activation bytes every convolution
  must read and write, counted with hooks, over the measured copy bandwidth); head-k mask Dice against fp32; and the
  whole ``predict()`` pipeline (tiling, blending, thresholds on the CPU) per level on a 32-slice stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NAPARI_UNETPP_HOME", str(Path("/tmp") / f"unetpp-gpu-bench-{os.getpid()}"))

from bench_finetune import cpu_flags  # noqa: E402

from napari_unetpp.inference.predict import predict, predict_iter  # noqa: E402
from napari_unetpp.model.registry import load_model  # noqa: E402
from napari_unetpp.runtimes.device import optimize_for_inference, release_memory  # noqa: E402
from napari_unetpp.training import TrainingPair, fine_tune, fine_tune_iter  # noqa: E402
from napari_unetpp.training import source as ft_source  # noqa: E402
from napari_unetpp.training.metrics import dice_score  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"
MB = 2**20


def em() -> tuple[np.ndarray, np.ndarray]:
    """The packaged ISBI 2012 slices 25-29 and their membrane mask."""
    img = tifffile.imread(SAMPLES / "isbi2012_z25-29.tif")
    lab = (tifffile.imread(SAMPLES / "isbi2012_z25-29_labels.tif") == 1).astype(np.uint8)
    return img, lab


def smi_mb() -> float | None:
    """This process's GPU memory as nvidia-smi reports it (the CUDA context included), else the GPU's total use."""
    q = ["nvidia-smi", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(q + ["--query-compute-apps=pid,used_memory"], capture_output=True, text=True, timeout=30)
        for line in out.stdout.strip().splitlines():
            pid, used = (s.strip() for s in line.split(","))
            if int(pid) == os.getpid():
                return float(used)
        out = subprocess.run(q + ["--query-gpu=memory.used"], capture_output=True, text=True, timeout=30)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def memory_row(state: str) -> dict:
    torch.cuda.synchronize()
    row = {
        "state": state,
        "allocated_mb": round(torch.cuda.memory_allocated() / MB, 1),
        "reserved_mb": round(torch.cuda.memory_reserved() / MB, 1),
        "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / MB, 1),
        "nvidia_smi_mb": smi_mb(),
    }
    torch.cuda.reset_peak_memory_stats()
    print(
        f"  {state:44} allocated {row['allocated_mb']:8.1f} MB  reserved {row['reserved_mb']:8.1f} MB  "
        f"peak {row['peak_allocated_mb']:8.1f} MB  nvidia-smi {row['nvidia_smi_mb']} MB",
        flush=True,
    )
    return row


def memory_section() -> list[dict]:
    img, lab = em()
    pair = TrainingPair(img, lab, axes="ZYX", slices=[0, 2])
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the context exists before the first reading
    torch.cuda.empty_cache()
    rows = [memory_row("start (CUDA context only)")]
    base = load_model("em-membranes")
    res = fine_tune(base, pair, minutes=0.25, device="cuda", save=False)
    rows.append(memory_row(f"after a fine-tuning run ({res.steps} steps)"))
    gen = fine_tune_iter(base, pair, minutes=0.5, device="cuda", save=False)
    steps = 0
    for p in gen:
        steps += p.phase == "train"
        if steps == 5:
            break
    gen.close()
    rows.append(memory_row("after a cancelled run (closed after 5 steps)"))
    stop = threading.Event()
    steps = 0
    for p in (gen := fine_tune_iter(base, pair, minutes=0.5, device="cuda", save=False, stop=stop)):
        steps += p.phase == "train"
        if steps == 5:
            stop.set()
    rows.append(memory_row("after a stopped run (stop event after 5 steps)"))
    model = load_model("em-membranes")
    predict(img, model, axes="ZYX", depth=4, device="cuda")
    rows.append(memory_row("after predict (model's inference copy cached)"))
    gen2 = predict_iter(np.concatenate([img] * 4), model, axes="ZYX", depth=4, device="cuda", tile=256)
    next(gen2)
    gen2.close()
    rows.append(memory_row("after a cancelled predict"))
    del model, gen, gen2, res, base
    release_memory("cuda")
    rows.append(memory_row("model dropped"))
    return rows


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def oom_section(cap_gb: float = 2.5) -> dict:
    img, lab = em()
    total = torch.cuda.get_device_properties(0).total_memory
    out: dict = {"cap_gb": cap_gb}
    base = load_model("em-membranes")
    release_memory("cuda")
    torch.cuda.set_per_process_memory_fraction(cap_gb * 1e9 / total)
    try:
        retries: list[str] = []
        res = fine_tune(
            base,
            TrainingPair(img, lab, axes="ZYX", slices=[0, 2]),
            minutes=0.4,
            device="cuda",
            save=False,
            on_progress=lambda p: retries.append(p.message) if p.phase == "retry" else None,
        )
        out["finetune"] = {
            "first_batch": res.data.get("batch"),
            "retries": retries,
            "steps": res.steps,
            "val": res.scores,
        }
        print(
            f"  fine-tuning under a {cap_gb} GB cap: batch {res.data.get('batch')} first; {retries}; {res.steps} "
            f"steps, validation {res.scores}",
            flush=True,
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    release_memory("cuda")
    stack = np.concatenate([img] * 4)
    model = load_model("em-membranes")
    ref = predict(stack, model, axes="ZYX", depth=4, device="cuda", tile=512, batch_size=20).mask
    release_memory("cuda")
    cap = 0.6
    handler = _Warnings()
    logging.getLogger("napari_unetpp").addHandler(handler)
    torch.cuda.set_per_process_memory_fraction(cap * 1e9 / total)
    try:
        got = predict(stack, model, axes="ZYX", depth=4, device="cuda", tile=512, batch_size=20).mask
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        logging.getLogger("napari_unetpp").removeHandler(handler)
    out["predict"] = {
        "cap_gb": cap,
        "warnings": handler.messages,
        "mask_pixels_differing": int((got != ref).sum()),
        "pixels": int(ref.size),
    }
    print(
        f"  predict under a {cap} GB cap, batch 20 asked: {handler.messages}; "
        f"{out['predict']['mask_pixels_differing']} of {ref.size} mask pixels differ from the uncapped run",
        flush=True,
    )
    return out


def steps_section(seconds: float = 30.0) -> list[dict]:
    img, lab = em()
    pair = TrainingPair(img, lab, axes="ZYX", slices=[0, 2])
    base = load_model("em-membranes")
    rows = []
    inline = ft_source.batch_maker

    def no_prefetch(ds, rng, cfg, mirror, dev):
        return inline(ds, rng, cfg, mirror, torch.device("cpu"))

    for label, opts, patch in (
        ("bf16 autocast", {"precision": "auto"}, None),
        ("fp16 autocast + grad scaler", {"precision": "fp16"}, None),
        ("fp32", {"precision": "fp32"}, None),
        ("bf16, batches made in line (no prefetch)", {"precision": "auto"}, no_prefetch),
    ):
        if patch:
            ft_source.batch_maker = patch
        try:
            t = time.perf_counter()
            res = fine_tune(base, pair, minutes=seconds / 60, device="cuda", save=False, recipe="adapt", **opts)
            wall = time.perf_counter() - t
        finally:
            ft_source.batch_maker = inline
        d = res.data
        row = {
            "run": label,
            "batch": d.get("batch"),
            "patch": d.get("patch"),
            "steps": res.steps,
            "wall_s": round(wall, 1),
            "train_steps_s": d.get("train_steps_s"),
            "waited_for_batches_s": d.get("waited_for_batches_s"),
            "s_per_step": round(d.get("train_steps_s", 0) / max(res.steps, 1), 4),
            "val": res.scores,
            "stopped": res.stopped,
        }
        rows.append(row)
        print(
            f"  {label:42} batch {row['batch']:>3} steps {row['steps']:>4} in {row['wall_s']:5.1f} s; step "
            f"{row['s_per_step'] * 1e3:6.1f} ms; waited for batches {row['waited_for_batches_s']} s; val {res.scores}",
            flush=True,
        )
    return rows


def activation_bytes_per_pixel(net: torch.nn.Module, depth: int, itemsize: int = 2) -> float:
    """Bytes every convolution must read (input) and write (output) per input pixel at ``depth``: the traffic
    a perfectly fused implementation still moves, whatever the arithmetic."""
    total = [0]

    def hook(mod, inp, out):
        total[0] += inp[0].numel() + out.numel()

    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 1, 512, 512, device=next(net.parameters()).device), depth=depth)
    finally:
        for h in hs:
            h.remove()
    return total[0] * itemsize / (512 * 512)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t)
    del a, b
    release_memory("cuda")
    return bw


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / 1e3 / reps


def throughput_section(compile_levels: list[int]) -> dict:
    img, _ = em()
    model = load_model("em-membranes")
    bw = copy_bandwidth()
    ref32 = optimize_for_inference(model.module, torch.device("cuda"))
    x_all = torch.from_numpy(((img - img.mean()) / img.std()).astype(np.float32))[:, None]
    out: dict = {"copy_bandwidth_tb_s": round(bw / 1e12, 2), "rows": [], "predict": []}
    print(f"  device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    masks32 = {}
    with torch.inference_mode():
        xs = x_all.cuda().contiguous(memory_format=torch.channels_last)
        for k in range(1, 5):
            masks32[k] = (ref32(xs, depth=k)[-1] > 0).cpu().numpy()
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = optimize_for_inference(model.module, torch.device("cuda")).to(dtype)
        for k in range(1, 5):
            ceiling = bw / activation_bytes_per_pixel(ref32, k) / 1e6
            free, _ = torch.cuda.mem_get_info()
            for batch in (8, 32, 64):
                xb = x_all[np.arange(batch) % len(x_all)].cuda().contiguous(memory_format=torch.channels_last)
                xh = xb.to(dtype)
                paths = {}

                def eager_autocast():
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                        return ref32(xb, depth=k)  # noqa: B023

                def eager_half():
                    with torch.inference_mode():
                        return half(xh, depth=k)  # noqa: B023

                paths["eager autocast"] = eager_autocast
                paths["eager half"] = eager_half
                if batch == 32:
                    static = xh.clone()
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s), torch.inference_mode():
                        for _ in range(3):
                            half(static, depth=k)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g), torch.inference_mode():
                        static_out = half(static, depth=k)
                    paths["CUDA graph half"] = g.replay
                    if k in compile_levels and dtype_name == "bf16":
                        comp = torch.compile(half)
                        t = time.perf_counter()
                        with torch.inference_mode():
                            comp(xh, depth=k)
                        compile_s = time.perf_counter() - t

                        def compiled():
                            with torch.inference_mode():
                                return comp(xh, depth=k)  # noqa: B023

                        paths[f"torch.compile half (compiled in {compile_s:.0f} s)"] = compiled
                for name, fn in paths.items():
                    try:
                        sec = _time(fn)
                    except torch.cuda.OutOfMemoryError:
                        release_memory("cuda")
                        continue
                    with torch.inference_mode():
                        o = static_out if name.startswith("CUDA graph") else fn()
                        mask = (o[-1][: len(img)] > 0).cpu().numpy()
                    mpx = batch * 512 * 512 / sec / 1e6
                    row = {
                        "dtype": dtype_name,
                        "level": k,
                        "batch": batch,
                        "path": name,
                        "mpx_s": round(mpx, 1),
                        "ceiling_mpx_s": round(ceiling, 1),
                        "fraction_of_ceiling": round(mpx / ceiling, 3),
                        "dice_vs_fp32": round(dice_score(mask, masks32[k][: len(mask)]), 5),
                        "free_gb_before": round(free / 1e9, 1),
                    }
                    out["rows"].append(row)
                    print(
                        f"  {dtype_name} L{k} batch {batch:>3} {name:40} {mpx:8.1f} Mpx/s  ceiling {ceiling:7.1f} "
                        f"({mpx / ceiling:5.1%})  mask Dice vs fp32 {row['dice_vs_fp32']:.5f}",
                        flush=True,
                    )
                paths.clear()
                release_memory("cuda")
        half = None
        release_memory("cuda")
    stack = np.concatenate([img] * 7)[:32]
    for k in range(1, 5):
        predict(stack[:4], model, axes="ZYX", depth=k, device="cuda")  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        pred = predict(stack, model, axes="ZYX", depth=k, device="cuda")
        sec = time.perf_counter() - t
        out["predict"].append({"level": k, "seconds": round(sec, 3), "mpx_s": round(stack.size / sec / 1e6, 1)})
        print(
            f"  predict() 32 x 512^2 L{k}: {sec:.2f} s, {stack.size / sec / 1e6:.1f} Mpx/s ({pred.ran_on})", flush=True
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sections", nargs="+", default=["memory", "oom", "steps", "throughput"])
    ap.add_argument("--compile-levels", nargs="*", type=int, default=[1, 4])
    ap.add_argument("--step-seconds", type=float, default=30.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this benchmark measures the CUDA path only.")
        return 1
    props = torch.cuda.get_device_properties(0)
    out: dict = {
        "gpu": props.name,
        "gpu_memory_gb": round(props.total_memory / 1e9, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_flags": cpu_flags(),
        "cpu_threads": torch.get_num_threads(),
    }
    print(
        f"GPU {props.name} ({out['gpu_memory_gb']} GB); torch {torch.__version__} CUDA {torch.version.cuda}; "
        f"CPU flags {out['cpu_flags']}, {out['cpu_threads']} threads",
        flush=True,
    )

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))

    sections = {
        "memory": memory_section,
        "oom": oom_section,
        "steps": lambda: steps_section(args.step_seconds),
        "throughput": lambda: throughput_section(args.compile_levels),
    }
    for name in args.sections:
        print(f"\n== {name}", flush=True)
        t = time.perf_counter()
        try:
            out[name] = sections[name]()
        except Exception as exc:  # keep what the other sections measured
            import traceback

            traceback.print_exc()
            out[name] = {"error": repr(exc)}
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
