"""What runs the network and where: device and precision, PyTorch, ONNX Runtime, OpenVINO, int8.

Other packages import what they need from here (``from napari_unetpp.runtimes import make_backend``), never from the
modules inside, so the runtimes can be arranged without touching their users. The measured choice between runtimes
is :func:`choose`; :func:`make_backend` gives the predictor callable for one level and batch shape.

Inside: :mod:`.base` (names, :class:`Choice`, the :class:`Backend` interface, what is installed), one module per
runtime (:mod:`.torch_backend`, :mod:`.onnx_backend`, :mod:`.openvino_backend`, :mod:`.int8`), :mod:`.graph` (the
exported ONNX graph), :mod:`.selection` (:func:`choose`, :func:`make_backend`), :mod:`.auto` (the measuring backend),
:mod:`.choices` (the remembered choices), :mod:`.failures` (runtimes that failed here), :mod:`.cores` (who holds the
CPU), :mod:`.memory` (memory given back after a run) and :mod:`.device` (device, precision, memory format).
"""

from napari_unetpp.runtimes.base import (
    NAMES,
    RUNTIMES,
    Backend,
    Choice,
    RuntimeUnavailable,
    onnx_available,
    openvino_available,
)
from napari_unetpp.runtimes.cores import hold_cores
from napari_unetpp.runtimes.device import (
    DEVICE_CHOICES,
    autocast_context,
    autocast_dtype,
    cpu_supports_bf16,
    describe_device,
    is_oom,
    memory_format,
    optimize_for_inference,
    release_memory,
    resolve_device,
)
from napari_unetpp.runtimes.failures import runtime_failed, torch_instead
from napari_unetpp.runtimes.graph import onnx_graph, params_hash
from napari_unetpp.runtimes.int8 import calibration_tiles
from napari_unetpp.runtimes.memory import DeviceMemory, device_memory, release_later, release_pending
from napari_unetpp.runtimes.selection import choose, make_backend, resolve_runtime
from napari_unetpp.runtimes.torch_backend import TorchBackend

__all__ = [
    "DEVICE_CHOICES",
    "NAMES",
    "RUNTIMES",
    "Backend",
    "Choice",
    "DeviceMemory",
    "RuntimeUnavailable",
    "TorchBackend",
    "autocast_context",
    "autocast_dtype",
    "calibration_tiles",
    "choose",
    "cpu_supports_bf16",
    "describe_device",
    "device_memory",
    "hold_cores",
    "is_oom",
    "make_backend",
    "memory_format",
    "onnx_available",
    "onnx_graph",
    "openvino_available",
    "optimize_for_inference",
    "params_hash",
    "release_later",
    "release_memory",
    "release_pending",
    "resolve_device",
    "resolve_runtime",
    "runtime_failed",
    "torch_instead",
]
