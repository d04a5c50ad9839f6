"""Segment widget latency and worker throughput, in a real napari viewer (run under a display or xvfb-run -a).

    xvfb-run -a python benchmarks/bench_widget.py

1. Slider move -> updated mask on the current 512 x 512 slice, per level: uncached (computed in the background
   worker) and cached (levels computed before).
2. Whole-stack throughput (30 x 512 x 512) inside napari's thread worker, streaming into layers, against the same
   prediction outside napari in the main thread, and against the bare generator in a worker without layers (to
   tell a torch-in-QThread slowdown, micro-sam issue 740, from the cost of updating layers).
"""

from __future__ import annotations

import os
import time

import numpy as np

os.environ.pop("NAPARI_UNETPP_SYNC", None)

import napari  # noqa: E402
import torch  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_unetpp import predict  # noqa: E402
from napari_unetpp.prediction import normalization_stats, predict_iter  # noqa: E402


def wait(cond, timeout=300.0):
    t = time.perf_counter()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t > timeout:
            raise TimeoutError
    return time.perf_counter() - t


def main() -> int:
    viewer = napari.Viewer(show=True)
    img = viewer.open_sample("napari-unetpp", "em")[0]
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w._image.value = img
    w._depth_slider.value = 1
    wait(lambda: w._preview_worker is None)
    viewer.dims.set_current_step(0, 2)
    lm = w.model
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"CPU flags: {' '.join(flags)}; torch threads: main {torch.get_num_threads()}")
    # the runtime choice (PyTorch or ONNX Runtime, measured once per machine, level and batch shape) is made before
    # timing, as it is after a user's first run; what ran is printed per level
    for k in range(1, lm.max_depth + 1):
        for n in (1, 4):
            p = predict(np.asarray(img.data[:n]), lm, depth=k, levels="all")
        print(f"L{k}: {p.device}")
    print("\n## slider move -> mask on the current 512 x 512 slice\n\n| level | uncached s | cached s |\n|---|---|---|")
    for k in (1, 2, 3, 4):
        w._cache.clear()
        w._depth_slider.value = 4 if k == 1 else 1  # move away (cached or not, then clear again)
        wait(lambda: w._preview_worker is None)
        w._cache.clear()
        t0 = time.perf_counter()
        w._depth_slider.value = k
        wait(lambda: w._preview_worker is None)
        unc = time.perf_counter() - t0
        w._depth_slider.value = 1 if k != 1 else 2
        wait(lambda: w._preview_worker is None)
        t0 = time.perf_counter()
        w._depth_slider.value = k  # cached now
        QApplication.processEvents()
        cached = time.perf_counter() - t0
        print(f"| L{k} | {unc:.3f} | {cached:.4f} |")

    tall = np.concatenate([img.data] * 6)
    big = viewer.add_image(tall, name="tall", scale=img.scale)
    w._image.value = big
    stats = normalization_stats(tall, lm)
    print("\n## whole stack, 30 x 512 x 512, recommended depth\n\n| where | s | MP/s |\n|---|---|---|")
    k = lm.card.recommended_depth or lm.max_depth
    w._depth_slider.value = k
    wait(lambda: w._preview_worker is None)
    mp = tall.size / 1e6
    t0 = time.perf_counter()
    predict(tall, lm, depth=k, levels="all", stats=stats)
    t_main = time.perf_counter() - t0
    print(f"| predict() in the main thread, outside napari's worker | {t_main:.2f} | {mp / t_main:.2f} |")

    from napari.qt.threading import create_worker

    threads = []

    def bare():
        threads.append(torch.get_num_threads())
        return (yield from predict_iter(tall, lm, depth=k, levels="all", stats=stats))

    t0 = time.perf_counter()
    worker = create_worker(bare)
    finished = []
    worker.finished.connect(lambda: finished.append(1))
    worker.start()
    wait(lambda: finished)
    t_bare = time.perf_counter() - t0
    print(f"| predict_iter in a napari thread worker, no layers | {t_bare:.2f} | {mp / t_bare:.2f} |")
    t0 = time.perf_counter()
    w.run_stack()
    wait(lambda: w._stack_worker is None)
    t_widget = time.perf_counter() - t0
    print(f"| widget Run whole stack (worker + streaming into layers) | {t_widget:.2f} | {mp / t_widget:.2f} |")
    print(
        f"\ntorch threads inside the worker: {threads[0]}; worker/main time ratio {t_bare / t_main:.2f} (bare), "
        f"{t_widget / t_main:.2f} (widget)"
    )
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
