"""Segment widget latency and worker throughput, in a real napari viewer (run under a display or xvfb-run -a).

    xvfb-run -a python benchmarks/bench_widget.py [--slider-only] [--hidden]

1. Slider move -> updated mask on the current 512 x 512 slice, per level: uncached (computed in the background
   worker) and cached (levels computed before); until the mask layer holds it, and until the canvas has drawn it.
   The OpenGL renderer is printed: under Xvfb it is Mesa's llvmpipe, which draws on the same CPU cores as the
   network, so every window repaint slows the computation. ``--hidden`` runs the same moves with the window not
   shown (nothing is drawn): our code, the worker and the network alone.
2. Whole-stack throughput (30 x 512 x 512) inside napari's thread worker, streaming into layers, against the same
   prediction outside napari in the main thread, and against the bare generator in a worker without layers (to
   tell a torch-in-QThread slowdown, micro-sam issue 740, from the cost of updating layers).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.pop("NAPARI_UNETPP_SYNC", None)

import napari  # noqa: E402
import torch  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_unetpp import predict  # noqa: E402
from napari_unetpp.inference.predict import normalization_stats, predict_iter  # noqa: E402


def wait(cond, timeout=300.0):
    t = time.perf_counter()
    while not cond():
        QApplication.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t > timeout:
            raise TimeoutError
    return time.perf_counter() - t


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _drawing_cpu() -> float:
    """CPU seconds used so far by this process's main thread and Mesa's software rasteriser threads (llvmpipe-N):
    under Xvfb the window is drawn by the CPU, on the same cores as the network. Linux only (0 elsewhere)."""
    total = 0
    try:
        pid = os.getpid()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                st = f.read()
            name = st[st.index("(") + 1 : st.rindex(")")]
            fields = st[st.rindex(")") + 2 :].split()
            if int(tid) == pid or name.startswith("llvmpipe"):
                total += int(fields[11]) + int(fields[12])
    except OSError:
        return 0.0
    return total / os.sysconf("SC_CLK_TCK")


def main() -> int:
    hidden = "--hidden" in sys.argv
    viewer = napari.Viewer(show=not hidden)
    img = viewer.open_sample("napari-unetpp", "em")[0]
    _, w = viewer.window.add_plugin_dock_widget("napari-unetpp", "UNet++ Segment")
    w.configure(image=img, depth=1)
    wait(lambda: w.jobs.preview is None)
    viewer.dims.set_current_step(0, 2)
    lm = w.model
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"CPU flags: {' '.join(flags)}; torch threads: main {torch.get_num_threads()}")
    # the runtime choice (PyTorch or ONNX Runtime, measured once per machine, level and batch shape) is made before
    # timing, as it is after a user's first run; what ran is printed per level
    for k in range(1, lm.max_depth + 1):
        for n in (1, 4):
            p = predict(np.asarray(img.data[:n]), lm, depth=k, levels="all")
        print(f"L{k}: {p.ran_on}")
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    canvas.native.makeCurrent()
    from vispy.gloo import gl

    renderer = gl.glGetParameter(gl.GL_RENDERER)
    print(f"OpenGL renderer: {renderer}; canvas {canvas.size[0]} x {canvas.size[1]}")
    draws: list[float] = []
    canvas.events.draw.connect(lambda e: draws.append(time.perf_counter()))
    plane = np.asarray(img.data[2])

    def painted(since: float) -> float:
        """Seconds from ``since`` until the canvas has drawn after it (the draw runs inside processEvents); NaN when
        the window is hidden, since nothing is drawn."""
        if hidden:
            return float("nan")
        wait(lambda: bool(draws) and draws[-1] > since)  # (the event loop pass that drew has returned)
        return time.perf_counter()

    def settle() -> None:
        """Let pending draws finish, so a timed move starts from an idle window."""
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            QApplication.processEvents()
            time.sleep(0.005)

    print(
        "\n## slider move -> mask on the current 512 x 512 slice\n\n"
        "'in layer': the mask layer holds the new plane (our code, the worker and the hand-off); 'painted': the canvas "
        "has drawn it. 'network': predict() of the slice alone in the main thread, best of 3. 'drawing CPU': CPU time "
        "of the main thread and the software rasteriser's threads during the uncached move, taken from the 2 cores the "
        "network runs on.\n\n"
        "| level | network s | uncached in layer s | uncached painted s | drawing CPU s | cached in layer s "
        "| cached painted s |\n|---|---|---|---|---|---|---|"
    )
    for k in (1, 2, 3, 4):
        net = min(_timed(lambda: predict(plane, lm, depth=k, levels="all", prob_dtype="float32")) for _ in range(3))
        w.controller.cache.clear()
        w.configure(depth=4 if k == 1 else 1)  # move away (cached or not, then clear again)
        wait(lambda: w.jobs.preview is None)
        settle()
        w.controller.cache.clear()
        cpu0 = _drawing_cpu()
        t0 = time.perf_counter()
        w.configure(depth=k)
        wait(lambda: w.jobs.preview is None)
        unc = time.perf_counter() - t0
        unc_painted = painted(t0 + unc) - t0
        drawing = _drawing_cpu() - cpu0
        w.configure(depth=1 if k != 1 else 2)
        wait(lambda: w.jobs.preview is None)
        settle()
        t0 = time.perf_counter()
        w.configure(depth=k)  # cached now: shown in the slider's own event
        cached = time.perf_counter() - t0
        cached_painted = painted(t0) - t0
        print(
            f"| L{k} | {net:.3f} | {unc:.3f} | {unc_painted:.3f} | {drawing:.3f} | {cached:.4f} "
            f"| {cached_painted:.4f} |"
        )

    if "--slider-only" in sys.argv:
        viewer.close()
        return 0
    tall = np.concatenate([img.data] * 6)
    big = viewer.add_image(tall, name="tall", scale=img.scale)
    w.configure(image=big)
    stats = normalization_stats(tall, lm)
    print("\n## whole stack, 30 x 512 x 512, recommended depth\n\n| where | s | MP/s |\n|---|---|---|")
    k = lm.card.recommended_depth or lm.max_depth
    w.configure(depth=k)
    wait(lambda: w.jobs.preview is None)
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
    wait(lambda: w.jobs.stack is None)
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
