"""What runs the network and where: device and precision, PyTorch, ONNX Runtime, OpenVINO, int8.

Other packages import what they need from here (``from napari_unetpp.runtimes import make_backend``), never from the
modules inside, so the runtimes can be arranged without touching their users. The measured choice between runtimes
is :func:`choose`; :func:`make_backend` gives the predictor callable for one level and batch shape.
"""

from napari_unetpp.runtimes.backends import (
    NAMES,
    RUNTIMES,
    Backend,
    Choice,
    RuntimeUnavailable,
    TorchBackend,
    choose,
    hold_cores,
    make_backend,
    onnx_available,
    onnx_graph,
    openvino_available,
    params_hash,
    release_later,
    release_pending,
    resolve_runtime,
    runtime_failed,
    torch_instead,
)
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

__all__ = [
    "DEVICE_CHOICES",
    "NAMES",
    "RUNTIMES",
    "Backend",
    "Choice",
    "RuntimeUnavailable",
    "TorchBackend",
    "autocast_context",
    "autocast_dtype",
    "choose",
    "cpu_supports_bf16",
    "describe_device",
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
