"""Where and how the network runs: device (CUDA, Apple MPS or CPU), precision (fp16/bf16 autocast where it pays
off), memory format, the inference-ready copy of a network, and out-of-memory detection and clean-up."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import re
from contextlib import AbstractContextManager

import torch
from torch import nn

__all__ = [
    "DEVICE_CHOICES",
    "autocast_context",
    "autocast_dtype",
    "cpu_supports_bf16",
    "describe_device",
    "is_oom",
    "memory_format",
    "optimize_for_inference",
    "precision_name",
    "release_memory",
    "resolve_device",
]

log = logging.getLogger(__name__)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``/None/a name into a usable ``torch.device``.

    ``"auto"`` picks CUDA, then Apple MPS, then CPU. Asking for a device that is not present raises a
    ``RuntimeError`` that says what is available.

    Args:
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("Apple MPS was requested but is not available; use --device cpu or auto.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise RuntimeError(f"unsupported device {device!r}; choose one of {DEVICE_CHOICES}.")
    return dev


def describe_device(device: torch.device) -> str:
    """Human-readable name, e.g. ``"CUDA: NVIDIA H100"`` or ``"CPU (bf16)"``."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "Apple MPS"
    return "CPU (bf16)" if cpu_supports_bf16() else "CPU (fp32)"


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 convs are slower."""
    try:
        checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(c is not None and c() for c in checks):
            return True
    except Exception:  # pragma: no cover - private helpers may move
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def autocast_dtype(device: torch.device, precision: str = "auto", training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain fp32.

    Args:
        device: The compute device.
        precision: ``"auto"`` (default: on CUDA fp16 to predict, bf16 to train where the GPU has it; fp16 on MPS;
            bf16 on CPUs that support it), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        training: For training (bf16 needs no gradient scaling) rather than prediction. Measured on an H100 at L4
            (``benchmarks/bench_gpu.py``): fp16 autocast predicts masks closer to fp32 than bf16 (Dice 0.9998
            against 0.9981) and 6 % faster; for training the two ran at the same speed.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}.")
    if device.type == "cuda":
        return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def precision_name(device: torch.device, precision: str = "auto") -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"``: what ``precision`` (as :func:`autocast_dtype` takes it) means on
    ``device`` for prediction."""
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[autocast_dtype(device, precision)]


def autocast_context(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """``torch.autocast`` for the chosen precision, or a null context for fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """The memory format inference runs in: channels-last (2D or 3D) on CPU and CUDA, contiguous elsewhere."""
    if device.type not in ("cpu", "cuda"):
        return torch.contiguous_format
    dims = getattr(getattr(model, "config", None), "spatial_dims", 2)
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def optimize_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy on ``device`` with batch norms folded into the preceding convolutions, in channels-last
    memory format on CPU and CUDA.

    Folding removes a memory pass per convolution; the result is numerically the eval-mode model. Channels-last
    halved the forward time on this project's benchmark CPU (bf16 and fp32, 2D and 3D). Inputs must be given in
    the same format: see :func:`memory_format`.
    """
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for (na, a), (nb, b) in zip(items, items[1:]):
                if isinstance(a, (nn.Conv2d, nn.Conv3d)) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    setattr(mod, na, torch.nn.utils.fusion.fuse_conv_bn_eval(a, b))  # in place: the order stays
                    setattr(mod, nb, nn.Identity())
    m = m.to(device)
    fmt = memory_format(m, device)
    if fmt is not torch.contiguous_format:
        m = m.to(memory_format=fmt)  # type: ignore[call-overload]
    for p in m.parameters():
        p.requires_grad_(False)
    return m


# What the runtimes say when an allocation fails, and nothing else: a smaller batch cures these, not an error that
# merely mentions memory (OpenVINO's "memory layout not supported", "Cannot get memory!" for a memory descriptor).
#   CUDA / MPS: "CUDA out of memory. Tried to allocate ...", "MPS backend out of memory ..."
#   torch on the CPU (a plain RuntimeError): "DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
#       (older), "DefaultCPUAllocator: not enough memory: ..." (newer)
#   ONNX Runtime: "Failed to allocate memory for requested buffer of size ..."
#   OpenVINO's CPU plugin: "Failed to allocate 7663872811008 bytes of memory"
#   C++ std::bad_alloc: "std::bad_alloc" (libstdc++), "bad allocation" (MSVC); errno ENOMEM: "Cannot allocate memory"
_OOM_MESSAGE = re.compile(
    r"out of memory|not enough memory|bad[_ ]alloc|(?:can't|cannot|could not|unable to) allocate|failed to allocate",
    re.IGNORECASE,
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: a ``MemoryError``, torch's ``OutOfMemoryError``, or an error of
    torch, ONNX Runtime or OpenVINO whose message is one of an allocation failure (see ``_OOM_MESSAGE``); not any
    error that mentions memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return _OOM_MESSAGE.search(str(exc)) is not None


def release_memory(device: torch.device | str | None = None, collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is False: off the thread that owns the objects) and return cached
    accelerator memory to the driver (after a run, a cancel or an OOM)."""
    if collect:
        gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:  # cuBLAS keeps its workspaces in the caching allocator (32 MB on an H100)
            clear_workspaces()
        torch.cuda.empty_cache()
    elif dev is not None and dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
