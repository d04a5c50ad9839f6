"""Which runtime runs the pruned network: PyTorch, ONNX Runtime or OpenVINO, chosen by measurement on the CPU.

On a CPU with native bf16 (AVX512-BF16 or AMX) and precision ``"auto"`` or ``"bf16"``, the candidates are PyTorch's
bf16 autocast, OpenVINO bf16 (its first convolution in fp32) and the fp32 runtimes: on a 2-core AMD EPYC with
AVX512-BF16, OpenVINO bf16 ran the shipped EM model 1.0x-1.55x faster than PyTorch bf16 at L1-L4 with mask Dice
0.9989-0.9995 against fp32 (``benchmarks/bench_inference.py``). ``"fp32"`` still means exact: fp32 candidates only.

On a CPU without bf16 (AVX2 only, like most laptops) everything runs in fp32. There ONNX Runtime's CPU provider
ran our pruned sub-networks 1.15x-1.7x faster than PyTorch's channels-last path, and OpenVINO's CPU plugin (the same
ONNX graph, :mod:`~napari_unetpp.runtimes.graph`) 1.8x-2.0x, with probabilities equal to about 3e-6 and 1e-7
(``benchmarks/bench_inference.py``). Which is faster depends on the CPU, the level and the batch shape, so
:func:`choose` measures every runtime installed once per machine, architecture, level and batch shape
(:class:`~napari_unetpp.runtimes.auto.AutoBackend`) and remembers the answer on disk
(:mod:`~napari_unetpp.runtimes.choices`). :func:`make_backend` gives the backend for one level and batch shape.

``precision="int8"`` runs a statically quantised copy (see :mod:`napari_unetpp.runtimes.int8`) through ONNX Runtime,
or through OpenVINO on a CPU with VNNI where it is installed (1.3x-1.5x ONNX Runtime there, the same Dice).

Out of memory (recognised by the runtimes' own words for an allocation failure,
:func:`~napari_unetpp.runtimes.device.is_oom`) halves the batch; any other failure of ONNX Runtime or OpenVINO in an
auto run hands the rest of the run to PyTorch (:mod:`~napari_unetpp.runtimes.failures`). Runs on other threads (a
slider preview beside a whole-stack run) never measure at the same time, nor save a measurement one of them disturbed
(:mod:`~napari_unetpp.runtimes.cores`); a run that could not measure on its first batch tries again on a later one.
Sessions and compiled models are built once per model however many threads ask.

Nothing here imports Qt or napari. ``onnx`` (to export), ``onnxruntime`` and ``openvino`` are optional: without
them, or when an export fails, PyTorch runs and the reason says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from napari_unetpp.runtimes.auto import AutoBackend
from napari_unetpp.runtimes.base import NAMES, RUNTIMES, Backend, Choice, RuntimeUnavailable, installed
from napari_unetpp.runtimes.choices import choice_key, kept_choice, saved_choice
from napari_unetpp.runtimes.device import cpu_supports_bf16, precision_name
from napari_unetpp.runtimes.failures import failed_here, memo_key
from napari_unetpp.runtimes.graph import onnx_graph
from napari_unetpp.runtimes.int8 import cpu_has_vnni, int8_graph, int8_session
from napari_unetpp.runtimes.onnx_backend import OnnxBackend, cached_session
from napari_unetpp.runtimes.openvino_backend import OpenVinoBackend, openvino_compiled
from napari_unetpp.runtimes.torch_backend import TorchBackend

__all__ = ["choose", "make_backend", "resolve_runtime"]

log = logging.getLogger(__name__)


def _candidates(precision: str) -> dict[str, str | None]:
    """The runtimes besides PyTorch an auto run in ``precision`` (PyTorch's: ``"fp32"``, or ``"bf16"`` on a CPU with
    native bf16) measures, each with None when it can run here, else why not.

    In bf16, ONNX Runtime (fp32) is measured only where OpenVINO is missing: on the 2-core AVX512-BF16 CPU it ran
    0.40x-0.54x OpenVINO bf16 at every level on 512^2 slices, and it is the slowest to measure."""
    found = installed()
    if precision == "bf16":
        found["openvino-bf16"] = found["openvino"]
        if found["openvino"] is None:
            found.pop("onnx")
    return found


def _usable(net: Any, depth: int, precision: str = "fp32") -> tuple[list[str], list[str]]:
    """The runtimes besides PyTorch an auto run of ``net`` at ``depth`` in ``precision`` may use (installed, and not
    failed on this model and level in this process), and why each of the others may not."""
    candidates = _candidates(precision)
    failed = failed_here(net, depth, candidates)
    usable, why_not = [], []
    for r, why in candidates.items():
        if why is not None:
            why_not.append(why)
        elif r in failed:
            why_not.append(f"{NAMES[r]} failed on this model at L{depth} earlier ({failed[r]})")
        else:
            usable.append(r)
    return usable, why_not


def choose(
    net: Any,
    depth: int,
    device: torch.device,
    precision: str = "auto",
    tile: tuple[int, ...] | None = None,
    runtime: str = "auto",
    batch: int = 1,
) -> Choice:
    """Decide what runs the depth-``depth`` network (an inference copy) for batches of ``batch`` tiles of ``tile``.

    - GPUs: PyTorch, with autocast (the other runtimes run on the CPU only).
    - ``precision="int8"``: the quantised graph in ONNX Runtime (OpenVINO on a CPU with VNNI, where installed).
    - On the CPU with ``runtime="auto"``: whichever candidate (those installed) ran this batch shape fastest on this
      machine, remembered per CPU, thread count, package versions, architecture, level, batch shape and precision in
      ``runtime_choices.json``; ``runtime == "auto"`` in the answer when it has not been measured yet (the
      :class:`~napari_unetpp.runtimes.auto.AutoBackend` measures it on the run's own first batch). PyTorch when
      none of the others is installed. The candidates: in fp32, PyTorch, ONNX Runtime and OpenVINO; where bf16 is
      allowed (precision ``"auto"`` or ``"bf16"`` on a CPU with native bf16), PyTorch bf16, OpenVINO bf16 and the
      fp32 ones. bf16 asked on a CPU without native bf16, or fp16 on the CPU: PyTorch's autocast.
    - ``runtime="torch"`` / ``"onnx"`` / ``"openvino"``: that one (the last two raise if they cannot run); OpenVINO
      in bf16 where bf16 is allowed, ONNX Runtime in fp32 only.

    Measured on a 2-core AVX2 CPU (``benchmarks/bench_inference.py``): which one wins depends on the CPU, the level
    and the batch shape (ONNX Runtime 1.4-1.7x at L1, 0.97-1.6x at L4; OpenVINO 1.2-1.3x ONNX Runtime), hence one
    measurement per shape.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}.")
    if precision == "int8":
        if device.type != "cpu":
            raise RuntimeUnavailable("int8 runs on the CPU only; use --device cpu, or fp16/bf16 on the GPU.")
        missing = installed()["onnx"]
        if missing:
            raise RuntimeUnavailable(f"int8 needs ONNX Runtime: {missing}.")
        if cpu_has_vnni() and installed()["openvino"] is None:
            return Choice("openvino-int8", "int8", "static int8, calibrated on the model's own data; VNNI")
        return Choice("onnx-int8", "int8", "static int8, calibrated on the model's own data")
    prec = precision_name(device, precision)
    if device.type != "cpu":
        if runtime in ("onnx", "openvino"):
            raise RuntimeUnavailable(f"the {NAMES[runtime]} path runs on the CPU only; use --runtime auto on a GPU.")
        return Choice("torch", prec, "autocast on the GPU" if prec != "fp32" else "as asked")
    native = prec == "bf16" and cpu_supports_bf16()
    if prec != "fp32" and not native:  # fp16, or bf16 without native bf16: PyTorch's autocast only
        if runtime in ("onnx", "openvino"):
            raise RuntimeUnavailable(
                f"the {NAMES[runtime]} path runs in fp32 (and OpenVINO in bf16 on CPUs with native bf16 only); "
                f"use --precision fp32 with --runtime {runtime}."
            )
        return Choice("torch", prec, "asked")
    torch_why = "bf16 autocast: this CPU has native bf16" if native else "asked"
    if runtime == "torch":
        return Choice("torch", prec, torch_why)
    if runtime == "onnx" and native:
        raise RuntimeUnavailable("the ONNX Runtime path runs in fp32; use --precision fp32 with --runtime onnx.")
    if runtime != "auto":
        name = "openvino-bf16" if native else runtime
        why = installed()[runtime]
        if why:
            raise RuntimeUnavailable(f"{NAMES[runtime]} cannot run: {why}.")
        return Choice(name, prec, "asked")
    usable, why_not = _usable(net, depth, prec)
    if not usable:
        return Choice("torch", prec, "; ".join(([torch_why] if native else []) + why_not))
    key = choice_key(net, depth, batch, tile, prec)
    memo = memo_key(key, net, depth, _candidates(prec))  # key, unless a candidate failed on this model here
    # a full measurement's answer holds if it names a runtime still usable
    known = kept_choice(dict.fromkeys((memo, key)), ("torch", *usable)) or saved_choice(key, memo, ("torch", *usable))
    return known or Choice("auto", prec, "not measured yet on this CPU")


def resolve_runtime(
    loaded: Any,
    net: Any,
    depth: int,
    device: torch.device,
    precision: str,
    tile: tuple[int, ...],
    runtime: str = "auto",
    batch: int = 1,
) -> tuple[str, str]:
    """``(runtime, precision)`` as :func:`choose` takes them (``"torch"``, ``"onnx"`` or ``"openvino"``, and the
    precision it runs in): what an ``"auto"`` run of this shape uses, measured now on a zero batch if it is not known
    yet (else ``runtime`` and ``precision`` unchanged). Blocks of one split run pass them on, so every block runs the
    same runtime in the same precision and their numbers equal a single process's."""
    backend = make_backend(loaded, net, depth, device, precision, tile, runtime, batch)
    if isinstance(backend, AutoBackend):
        backend(np.zeros((batch, net.config.in_channels, *tile), np.float32))
    chosen = backend.choice
    if chosen.runtime == "torch":
        return "torch", precision
    if chosen.runtime in ("onnx", "openvino", "openvino-bf16"):
        return chosen.runtime.split("-")[0], chosen.precision
    return runtime, precision


def make_backend(
    loaded: Any,
    net: Any,
    depth: int,
    device: torch.device,
    precision: str = "auto",
    tile: tuple[int, ...] | None = None,
    runtime: str = "auto",
    batch: int = 1,
) -> Backend:
    """The backend :func:`choose` picks (an :class:`~napari_unetpp.runtimes.auto.AutoBackend` that measures, when it
    is not known yet), with its ONNX Runtime session or OpenVINO compiled model cached on ``loaded`` (a LoadedModel,
    or None) per graph. A failed export falls back to PyTorch, unless a runtime was asked for by name."""
    choice = choose(net, depth, device, precision, tile, runtime, batch)
    torch_backend = TorchBackend(net, depth, device, precision, choice)
    if choice.runtime == "torch":
        return torch_backend
    makers: dict[str, Callable[[], Backend]] = {
        "onnx": lambda: OnnxBackend(cached_session(loaded, onnx_graph(net, depth)), Choice("onnx", "fp32", "")),
        "openvino": lambda: OpenVinoBackend(
            openvino_compiled(loaded, onnx_graph(net, depth)), Choice("openvino", "fp32", "")
        ),
        "openvino-bf16": lambda: OpenVinoBackend(
            openvino_compiled(loaded, onnx_graph(net, depth), "bf16"), Choice("openvino-bf16", "bf16", "")
        ),
    }
    if choice.runtime == "auto":
        prec = choice.precision
        usable = {r: makers[r] for r in _usable(net, depth, prec)[0]}
        key = choice_key(net, depth, batch, tile, prec)
        return AutoBackend(torch_backend, usable, key, depth, prec, tuple(_candidates(prec)))
    try:
        if choice.runtime == "onnx-int8":
            return OnnxBackend(int8_session(loaded, depth), choice)
        if choice.runtime == "openvino-int8":
            graph = int8_graph(loaded, depth)  # no calibration: raises, whichever runtime would run it
            try:
                return OpenVinoBackend(openvino_compiled(loaded, graph), choice)
            except RuntimeUnavailable as exc:
                if installed()["onnx"]:  # no ONNX Runtime either
                    raise
                log.warning("OpenVINO int8 not used: %s", exc)
                why = f"{choice.reason}; OpenVINO could not compile it, so ONNX Runtime ran"
                return OnnxBackend(int8_session(loaded, depth), Choice("onnx-int8", "int8", why))
        backend = makers[choice.runtime]()
        backend.choice = choice
        return backend
    except RuntimeUnavailable as exc:
        if runtime != "auto" or choice.precision == "int8":
            raise
        log.warning("%s not used: %s", NAMES[choice.runtime], exc)
        return TorchBackend(net, depth, device, precision, Choice("torch", precision_name(device, precision), str(exc)))
