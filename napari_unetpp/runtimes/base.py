"""What every runtime shares: their names, the error for one that cannot run, :class:`Choice` (what runs and why),
the :class:`Backend` interface, whether ONNX Runtime and OpenVINO are installed, and how what a runtime builds is
kept on the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_unetpp.errors import UserError
from napari_unetpp.paths import write_atomically
from napari_unetpp.runtimes.device import is_oom

__all__ = [
    "NAMES",
    "PRECISIONS",
    "RUNTIMES",
    "Backend",
    "Choice",
    "RuntimeUnavailable",
    "as_oom_or_failure",
    "installed",
    "kept_on",
    "one_line",
    "onnx_available",
    "openvino_available",
    "written_atomically",
]

RUNTIMES = ("auto", "torch", "onnx", "openvino")
NAMES = {
    "torch": "PyTorch",
    "onnx": "ONNX Runtime",
    "onnx-int8": "ONNX Runtime",
    "openvino": "OpenVINO",
    "openvino-bf16": "OpenVINO",
    "openvino-int8": "OpenVINO",
}
# what each runtime other than PyTorch computes in (PyTorch runs in the run's own precision)
PRECISIONS = {"onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32", "openvino-bf16": "bf16", "openvino-int8": "int8"}


class RuntimeUnavailable(UserError, RuntimeError):
    """The runtime or precision asked for cannot run here (a missing package, a failed export, no calibration)."""


@dataclass(frozen=True)
class Choice:
    """What runs the network, and why.

    Attributes:
        runtime: ``"torch"``, ``"onnx"`` (ONNX Runtime fp32), ``"openvino"`` (OpenVINO fp32), ``"openvino-bf16"``
            (OpenVINO bf16, its first convolution in fp32), ``"onnx-int8"``, ``"openvino-int8"``, or ``"auto"`` while
            not yet measured.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.
        reason: One short clause, e.g. ``"1.52x PyTorch on this CPU at L4"``.
        speedup: The chosen runtime's speed over PyTorch where measured, else None.
    """

    runtime: str
    precision: str
    reason: str
    speedup: float | None = None

    def describe(self, device: torch.device) -> str:
        """E.g. ``"CPU · ONNX Runtime fp32 (1.52x PyTorch on this CPU at L4)"``."""
        names = {**NAMES, "auto": "the fastest runtime"}
        where = {"cpu": "CPU", "cuda": "CUDA", "mps": "Apple MPS"}.get(device.type, device.type)
        if device.type == "cuda" and torch.cuda.is_available():
            where = f"CUDA: {torch.cuda.get_device_name(device)}"
        return f"{where} · {names[self.runtime]} {self.precision} ({self.reason})"


class Backend:
    """Runs ``(B, C, *tile)`` float32 batches through depth k; returns ``(B, k, classes [+ cue], *tile)`` float32
    probabilities."""

    choice: Choice

    def __call__(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def release(self) -> bool:
        """Give memory held between runs back (ONNX Runtime's arena, OpenVINO's buffers); PyTorch's CPU allocator
        holds none. False when it could not yet (another run is using that memory): try again later."""
        return True

    def memory(self) -> object | None:
        """What holds this backend's memory between runs (shared by every backend of one graph), if anything."""
        return None


def as_oom_or_failure(name: str, exc: Exception) -> Exception:
    """A runtime's own exception as MemoryError when it is an allocation failure (the caller halves the batch), else
    as RuntimeError (the caller falls back to PyTorch). By the message's words for an allocation failure only
    (:func:`~napari_unetpp.runtimes.device.is_oom`): OpenVINO's "memory layout not supported" is no out-of-memory."""
    if is_oom(exc):
        return MemoryError(f"out of memory in {name}: {exc}")
    return RuntimeError(str(exc))


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message in one line: OpenVINO's run over several ("Exception from src/...:" first); the last
    line says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def onnx_available() -> str | None:
    """None when ONNX export and ONNX Runtime can run here, else why not (one clause)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or 'onnxruntime'} is not installed (pip install onnx onnxruntime)"
    return None


def openvino_available() -> str | None:
    """None when the graph can be exported and OpenVINO can run it here, else why not (one clause)."""
    try:
        import onnx  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"{exc.name or 'openvino'} is not installed (pip install onnx openvino)"
    return None


def installed() -> dict[str, str | None]:
    """The runtimes besides PyTorch, each with None when it can run here, else why not."""
    return {"onnx": onnx_available(), "openvino": openvino_available()}


def kept_on(loaded: Any, key: str, build: Callable[[], Any]) -> Any:
    """``build()``, kept on ``loaded`` (a LoadedModel, or None: built every time) under ``key`` and torch's thread
    count: what a runtime loads from a graph file is made once per model, however many threads ask at once
    (:meth:`~napari_unetpp.model.loaded.LoadedModel.kept`)."""
    kept = getattr(loaded, "kept", None)
    return build() if kept is None else kept(f"{key}:t{torch.get_num_threads()}", build)


def written_atomically(path: Path, write: Callable[[Path], object], what: str) -> None:
    """:func:`napari_unetpp.paths.write_atomically` for the caches: readers (another process using the same cache)
    never see half a file, a failure leaves nothing behind, and the file stays private (``0o600``), as cache files
    always were.

    Raises:
        RuntimeUnavailable: ``write`` failed ("<what> failed (...)").
    """
    try:
        write_atomically(path, write, mode=None)
    except Exception as exc:
        raise RuntimeUnavailable(f"{what} failed ({type(exc).__name__}: {exc})") from exc
