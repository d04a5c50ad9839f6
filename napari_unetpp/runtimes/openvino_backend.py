"""OpenVINO: the exported graph compiled for the CPU plugin, in fp32 or in bf16, compiled once per model, precision
and thread count, and shared by its runs.

OpenVINO's CPU plugin ran our pruned sub-networks 1.8x-2.0x faster than PyTorch's channels-last path on a CPU without
bf16, with probabilities equal to about 1e-7 (``benchmarks/bench_inference.py``). On a CPU with native bf16
(AVX512-BF16 or AMX) its bf16 inference precision ran them 1.4x-1.8x faster than its own fp32 and 1.0x-1.55x faster
than PyTorch's bf16 autocast (2-core AMD EPYC with AVX512-BF16, ``predict`` on 5 x 512^2 ISBI slices).

In bf16 the network's first convolution runs in fp32, as PyTorch's autocast path runs it
(:meth:`~napari_unetpp.model.blocks.ConvBlock.forward`): the graph is cut after that convolution (and its bias) into
a small fp32 head and the bf16 rest, and the head's output is handed to the rest without a copy. The first
convolution sees raw intensities; rounded to bf16 they cost mask Dice. Measured on ``em-membranes`` against OpenVINO
fp32: at L1 0.9981 in one bf16 graph, 0.9989 with the head in fp32 (0.094 s against 0.14 s per 4 x 512^2); at L4
0.9989 and 0.9994 (0.67 s against 0.70 s). The CPU plugin's own "keep this node precise" marker did not hold on the
fused convolution (tried on OpenVINO 2026.4), hence the cut.
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

__all__ = ["OpenVinoBackend", "OpenVinoModel", "openvino_compiled", "split_first_convolution"]

log = logging.getLogger(__name__)
HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision names -> OpenVINO's INFERENCE_PRECISION_HINT


class OpenVinoModel:
    """An OpenVINO compiled model, shared by every run of one graph and precision (cached on the LoadedModel), and
    how many of its inference requests are running: its memory may be released only when none is (OpenVINO's
    ``release_memory`` must not overlap inference; a slider preview can run beside a whole-stack run).

    ``head``, when set, is a compiled fp32 model whose output is ``compiled``'s input (bf16 with the first
    convolution in fp32)."""

    def __init__(self, compiled: Any, head: Any | None = None) -> None:
        self.compiled, self.head = compiled, head
        self.lock = threading.Lock()
        self.running = 0

    def release(self) -> bool:
        """Give the intermediate buffers back (allocated again by the next run) unless a request is running;
        whether it did."""
        with self.lock:
            if self.running:
                return False
            try:
                for compiled in (self.head, self.compiled):
                    if compiled is not None:
                        compiled.release_memory()
            except Exception as exc:  # pragma: no cover - memory stays cached; nothing else is affected
                log.info("could not release OpenVINO's memory (%s)", exc)
                return False
            return True


class OpenVinoBackend(Backend):
    """An OpenVINO CPU inference request over the exported graph (one request per backend: a request is not
    thread-safe, the compiled model it comes from is); with a fp32 head, one request for each, the head's output
    tensor handed to the rest as its input."""

    def __init__(self, model: OpenVinoModel, choice: Choice) -> None:
        self.model, self.choice = model, choice
        self.request = model.compiled.create_infer_request()
        self.head = model.head.create_infer_request() if model.head is not None else None

    def memory(self) -> object | None:
        return self.model

    def release(self) -> bool:
        """Give the compiled model's intermediate buffers back, when no other run is using it."""
        return self.model.release()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.model.lock:
            self.model.running += 1
        try:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.head is None:
                self.request.infer({0: x})
            else:
                self.head.infer({0: x})
                self.request.set_input_tensor(0, self.head.get_output_tensor(0))  # no copy
                self.request.infer()
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


def split_first_convolution(model: Any) -> tuple[Any, Any] | None:
    """``model`` (an OpenVINO model read from our export, consumed) cut after its first convolution and that
    convolution's bias: ``(head, rest)``, the head from the graph's input to the convolution's output, the rest
    from a new input of that shape to the graph's outputs; None where the graph does not have one input feeding
    one convolution (nothing is cut)."""
    import openvino.opset13 as ops

    params = model.get_parameters()
    if len(params) != 1:
        return None
    users = [t.get_node() for t in params[0].output(0).get_target_inputs()]
    if len(users) != 1 or users[0].get_type_name() != "Convolution":
        return None
    cut = users[0]
    after = [t.get_node() for t in cut.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
    if len(after) == 1 and after[0].get_type_name() == "Add":  # the bias (a folded batch norm's shift)
        cut = after[0]
    inner = ops.parameter(cut.get_output_partial_shape(0), cut.get_output_element_type(0), name="first_conv")
    for target in list(cut.output(0).get_target_inputs()):  # the bias reads the convolution's shape: left as is
        target.replace_source_output(inner.output(0))
    import openvino as ov

    rest = ov.Model(model.get_results(), [inner], "rest")
    head = ops.result(cut.output(0))
    return ov.Model([head], [params[0]], "first_convolution"), rest


def openvino_compiled(loaded: Any, path: Path, precision: str = "fp32") -> OpenVinoModel:
    """The graph at ``path`` compiled for OpenVINO's CPU plugin in ``precision`` (``"fp32"``, never bf16, which
    OpenVINO would choose on CPUs that have it: fp32 asked means exact; or ``"bf16"``, with the first convolution
    in fp32: see the module's notes), latency mode with torch's threads; kept on ``loaded`` (a LoadedModel, or
    None) per graph file, precision and thread count.

    Raises:
        RuntimeUnavailable: OpenVINO is missing or could not compile the graph.
    """
    missing = openvino_available()
    if missing:
        raise RuntimeUnavailable(missing)

    def config(prec: str) -> dict[str, Any]:
        threads = torch.get_num_threads()
        return {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": HINTS[prec],
        }

    def compile_graph() -> OpenVinoModel:
        core = _ov_core()
        try:
            if precision == "fp32":
                return OpenVinoModel(core.compile_model(core.read_model(str(path)), "CPU", config("fp32")))
            parts = split_first_convolution(core.read_model(str(path)))
            if parts is None:  # pragma: no cover - our exports always start with one convolution
                log.info("OpenVINO bf16: the first convolution could not be kept in fp32")
                return OpenVinoModel(core.compile_model(core.read_model(str(path)), "CPU", config(precision)))
            head = core.compile_model(parts[0], "CPU", config("fp32"))
            return OpenVinoModel(core.compile_model(parts[1], "CPU", config(precision)), head)
        except Exception as exc:
            raise RuntimeUnavailable(f"OpenVINO could not compile the graph ({type(exc).__name__}: {exc})") from exc

    return kept_on(loaded, f"ov:{precision}:{path}", compile_graph)
