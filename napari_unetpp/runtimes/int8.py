"""Optional int8 inference on the CPU (``precision="int8"``, ``--precision int8``): a statically quantised copy of a
pruned level, run by ONNX Runtime.

Static quantisation needs activation ranges from real inputs of the model's own domain. They come from a small
**calibration set** stored with the model: :func:`calibration_tiles` draws normalised tiles from its training (or
validation) images when the model is packaged or fine-tuned, and the registry saves them beside the weights
(``<model>.calibration.safetensors``, about 0.6 MB; :attr:`~napari_unetpp.model.loaded.LoadedModel.calibration`
gives them back). The quantised graph itself is made on first use from the exported fp32 graph and those tiles, and
cached (``cache_dir()/int8``) under the hash of the weights and the tiles.

Measured on a 2-core AVX2 CPU, em-membranes L4 on held-out ISBI slices 25-29 (``benchmarks/bench_inference.py``):
QDQ, per-channel int8 weights, uint8 activations. The plain u8s8 scheme reached mask Dice 0.983
against fp32: without AVX512-VNNI, ONNX Runtime's u8s8 kernels use VPMADDUBSW, whose 16-bit sums saturate. With
7-bit weights (``reduce_range``) Dice rose to 0.993 at the same speed; keeping the first convolution (raw
intensities) and the 1x1 heads in fp32 is what this module does on top, and activation ranges are the 99.999th
percentile of the calibration activations rather than their min and max (nuclei L1 0.9888 -> 0.9905). int8 is never
the default: it is not exact.

On a CPU with VNNI (AVX512-VNNI, AVX-VNNI or AMX), whose int8 dot products do not saturate, the weights keep all 8
bits, and OpenVINO (where installed) runs the quantised graph. Measured on a 2-core AMD EPYC with AVX512-VNNI,
em-membranes, 4 x 512^2 held-out ISBI slices, mask Dice against fp32 (seconds per batch):

============================  ==============  ==============
                              L1              L4
============================  ==============  ==============
ONNX Runtime, 7-bit weights   0.9925 (0.128)  0.9957 (0.735)
ONNX Runtime, 8-bit weights   0.9956 (0.107)  0.9972 (0.702)
OpenVINO, 7-bit weights       0.9925 (0.076)  0.9954 (0.494)
OpenVINO, 8-bit weights       0.9954 (0.084)  0.9970 (0.469)
============================  ==============  ==============

(OpenVINO fp32: 0.302 and 1.350 s.) Without VNNI the measured scheme stays: 7-bit weights in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes.base import RuntimeUnavailable, onnx_available, written_atomically
from napari_unetpp.runtimes.graph import onnx_graph, params_hash
from napari_unetpp.runtimes.onnx_backend import cached_session

__all__ = ["calibration_tiles", "cpu_has_vnni", "int8_graph", "int8_session"]

log = logging.getLogger(__name__)
CALIBRATION_TILES = 8


def calibration_tiles(
    images: Sequence[np.ndarray], size: int | Sequence[int] = 192, n: int = CALIBRATION_TILES, seed: int = 0
) -> np.ndarray:
    """``(n, C, *tile)`` float16 tiles drawn at random from normalised ``(C, *spatial)`` images (the model's own
    training or validation images, normalised as it reads them), from images spread evenly over the list. Tiles are
    clipped to the image (sizes stay multiples of 16 in 2D, 8 in 3D)."""
    if not images:
        raise ValueError("calibration needs at least one image.")
    rng = np.random.default_rng(seed)
    dims = images[0].ndim - 1
    want = (int(size),) * dims if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    step = 16 if dims == 2 else 8
    tile = tuple(max(step, min(w, *(im.shape[1 + a] for im in images)) // step * step) for a, w in enumerate(want))
    out = np.empty((n, images[0].shape[0], *tile), np.float16)
    picks = np.linspace(0, len(images) - 1, n).round().astype(int)  # spread over the stack: its ends are often dim
    for i, j in enumerate(picks):
        im = images[j]
        start = [int(rng.integers(0, im.shape[1 + a] - t + 1)) for a, t in enumerate(tile)]
        out[i] = im[(slice(None), *[slice(s, s + t) for s, t in zip(start, tile)])]
    return out


# how activation ranges are calibrated; part of the cached graph's name, so a change of recipe re-quantises
_PERCENTILE = 99.999
_RECIPE = f"pct{_PERCENTILE:g}"


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot products that do not saturate (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _weight_bits() -> int:
    """8 on a CPU with VNNI; 7 elsewhere (``reduce_range``: u8s8 without VNNI saturates)."""
    return 8 if cpu_has_vnni() else 7


def int8_graph(loaded: Any, depth: int) -> Path:
    """The quantised graph of ``loaded`` at ``depth``, from the cache or made now (a few seconds at L4).

    Raises:
        RuntimeUnavailable: no calibration stored with the model, or onnx/onnxruntime missing.
    """
    missing = onnx_available()
    if missing:
        raise RuntimeUnavailable(f"int8 needs ONNX Runtime: {missing}.")
    tiles = loaded.calibration
    if tiles is None:
        raise RuntimeUnavailable(
            f"{loaded.card.id} has no int8 calibration (models get one when packaged or fine-tuned); "
            "use fp32, or fine-tune it once."
        )
    net = loaded.inference_module("cpu")
    digest = hashlib.sha256(np.ascontiguousarray(tiles).tobytes()).hexdigest()[:8]
    bits = _weight_bits()
    path = cache_dir() / "int8" / f"{params_hash(net, depth)}-{digest}-{_RECIPE}-w{bits}-L{depth}.onnx"
    if path.is_file():
        return path
    fp32 = onnx_graph(net, depth)
    t0 = time.perf_counter()
    written_atomically(path, lambda tmp: _quantize(fp32, tmp, tiles.astype(np.float32), bits), "int8 quantisation")
    log.info("quantised L%d to int8 in %.1f s: %s", depth, time.perf_counter() - t0, path)
    return path


def _quantize(fp32: Path, out: Path, tiles: np.ndarray, bits: int = 7) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": t[None]} for t in tiles])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    graph = onnx.load(str(fp32))
    convs = [n.name for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    keep_fp32 = convs[:1] + [c for c in convs if "/head_" in c or "/cue_" in c]  # raw intensities in; 1x1 heads out
    quiet = _Quiet()  # onnxruntime.quantization logs advice on the root logger, and its histogram calibrator prints
    logging.getLogger().addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            _quantize_static(fp32, out, Reader(), keep_fp32, bits)
    finally:
        logging.getLogger().removeFilter(quiet)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "quantization" not in record.getMessage().lower()


def _quantize_static(fp32: Path, out: Path, reader: Any, keep_fp32: list[str], bits: int = 7) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=bits == 7,  # 7-bit weights: u8s8 without VNNI saturates (Dice 0.983 -> 0.993 on held-out EM)
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # activation ranges from the 99.999th percentile, not min-max: a few extreme activations otherwise widen the
        # 8-bit steps for all. Held-out mask Dice vs fp32 (min-max -> percentile): nuclei L1 0.9888 -> 0.9905, L4
        # 0.9985 -> 0.9987; EM L1 0.9920 -> 0.9924, L4 0.9955 -> 0.9956 (99.9 was worse: EM L4 0.9931)
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": _PERCENTILE},
        nodes_to_exclude=keep_fp32,
    )


def int8_session(loaded: Any, depth: int) -> Any:
    """An ONNX Runtime session over :func:`int8_graph`, kept on ``loaded``."""
    return cached_session(loaded, int8_graph(loaded, depth))
