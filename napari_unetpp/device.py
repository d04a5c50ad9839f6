"""Device selection and precision: CUDA, Apple MPS or CPU; fp16/bf16 autocast where it pays off."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import ContextManager

import torch

__all__ = ["resolve_device", "describe_device", "cpu_supports_bf16", "autocast_dtype", "autocast_context"]

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


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain fp32.

    Args:
        device: The compute device.
        precision: ``"auto"`` (default: bf16/fp16 on CUDA, fp16 on MPS, bf16 on CPUs that support it),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``.
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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast_context(device: torch.device, precision: str = "auto") -> ContextManager:
    """``torch.autocast`` for the chosen precision, or a null context for fp32."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
