"""OpenVINO: the exported fp32 graph compiled for the CPU plugin, compiled once per model and shared by its runs.

OpenVINO's CPU plugin ran our pruned sub-networks 1.8x-2.0x faster than PyTorch's channels-last path on a CPU without
bf16, with probabilities equal to about 1e-7 (``benchmarks/bench_inference.py``).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_unetpp.runtimes.base import (
    Backend,
    Choice,
    RuntimeUnavailable,
    as_oom_or_failure,
    kept_on,
    openvino_available,
)

__all__ = ["OpenVinoBackend", "OpenVinoModel", "openvino_compiled"]

log = logging.getLogger(__name__)


class OpenVinoModel:
    """An OpenVINO compiled model, shared by every run of one graph (cached on the LoadedModel), and how many of
    its inference requests are running: its memory may be released only when none is (OpenVINO's
    ``release_memory`` must not overlap inference; a slider preview can run beside a whole-stack run)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.lock = threading.Lock()
        self.running = 0

    def release(self) -> bool:
        """Give the intermediate buffers back (allocated again by the next run) unless a request is running;
        whether it did."""
        with self.lock:
            if self.running:
                return False
            try:
                self.compiled.release_memory()
            except Exception as exc:  # pragma: no cover - memory stays cached; nothing else is affected
                log.info("could not release OpenVINO's memory (%s)", exc)
                return False
            return True


class OpenVinoBackend(Backend):
    """An OpenVINO CPU inference request over the exported fp32 graph (one request per backend: a request is not
    thread-safe, the compiled model it comes from is)."""

    def __init__(self, model: OpenVinoModel, choice: Choice) -> None:
        self.model, self.choice = model, choice
        self.request = model.compiled.create_infer_request()

    def memory(self) -> object | None:
        return self.model

    def release(self) -> bool:
        """Give the compiled model's intermediate buffers back, when no other run is using it."""
        return self.model.release()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.model.lock:
            self.model.running += 1
        try:
            self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
            return np.array(self.request.get_output_tensor(0).data, copy=True)
        except Exception as exc:  # OpenVINO raises its own exception types
            raise as_oom_or_failure("OpenVINO", exc) from exc
        finally:
            with self.model.lock:
                self.model.running -= 1


@functools.lru_cache(maxsize=1)
def _ov_core() -> Any:
    import openvino as ov

    return ov.Core()


def openvino_compiled(loaded: Any, path: Path) -> OpenVinoModel:
    """The graph at ``path`` compiled for OpenVINO's CPU plugin in f32 (never bf16, which it would choose on CPUs
    that have it: fp32 asked means exact), latency mode with torch's threads; kept on ``loaded`` (a LoadedModel, or
    None) per graph file and thread count.

    Raises:
        RuntimeUnavailable: OpenVINO is missing or could not compile the graph.
    """
    missing = openvino_available()
    if missing:
        raise RuntimeUnavailable(missing)

    def compile_graph() -> OpenVinoModel:
        core = _ov_core()
        config = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            return OpenVinoModel(core.compile_model(core.read_model(str(path)), "CPU", config))
        except Exception as exc:
            raise RuntimeUnavailable(f"OpenVINO could not compile the graph ({type(exc).__name__}: {exc})") from exc

    return kept_on(loaded, f"ov:{path}", compile_graph)
