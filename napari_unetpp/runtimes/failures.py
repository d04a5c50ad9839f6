"""Runtimes that failed on a model in this process, and what runs instead.

Any failure of ONNX Runtime or OpenVINO that is not out of memory, in an auto run, hands the rest of the run to
PyTorch (:func:`torch_instead`), and that runtime is not chosen again for that model (its weights) and level in this
process; a measurement made without it serves this process only, and never replaces the saved choice. A runtime
asked for by name that fails raises :func:`runtime_failed`'s one sentence instead.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch

from napari_unetpp.runtimes.base import NAMES, Backend, Choice, RuntimeUnavailable, one_line
from napari_unetpp.runtimes.device import precision_name
from napari_unetpp.runtimes.graph import params_hash
from napari_unetpp.runtimes.torch_backend import TorchBackend

__all__ = ["failed_here", "mark_failed", "memo_key", "runtime_failed", "torch_instead"]

log = logging.getLogger(__name__)
_FAILED: dict[tuple[str, str], str] = {}  # (params_hash of the model at the level, runtime) -> why it failed here


def _ban_key(net: Any, depth: int) -> str:
    """What a runtime's failure is held against: the exported graph, i.e. the architecture, the level and the
    weights (:func:`~napari_unetpp.runtimes.graph.params_hash`, memoised per network object; the export computes it
    anyway). Another model of the same architecture (a fine-tuned version) tries that runtime again."""
    return params_hash(net, depth)


def mark_failed(net: Any, depth: int, runtime: str, exc: BaseException) -> None:
    """Remember that ``runtime`` failed (with ``exc``) on ``net`` at ``depth``: not chosen again for it here."""
    _FAILED[(_ban_key(net, depth), runtime)] = one_line(exc, 80)


def failed_here(net: Any, depth: int, among: Collection[str] | None = None) -> dict[str, str]:
    """The runtimes (of ``among``, the candidates of a run, if given) that failed on this model at this level
    earlier in this process, each with why: OpenVINO bf16 failing never counts against an fp32 run's choice."""
    if not _FAILED:
        return {}
    g = _ban_key(net, depth)
    return {r: why for (k, r), why in _FAILED.items() if k == g and (among is None or r in among)}


def memo_key(key: str, net: Any, depth: int, among: Collection[str] | None = None) -> str:
    """What this process keeps a choice for ``key`` under: ``key`` itself, or (where a runtime of ``among`` failed on
    this model and level) a key of its own for this model without those runtimes, whose measurement is never saved."""
    failed = failed_here(net, depth, among)
    return key if not failed else f"{key}|{_ban_key(net, depth)} without {','.join(sorted(failed))}"


def torch_instead(
    backend: Backend, exc: BaseException, net: Any, depth: int, device: torch.device, precision: str = "fp32"
) -> Backend:
    """PyTorch (in the run's ``precision``) for the rest of a run whose runtime (``backend``, chosen automatically)
    failed with ``exc``, an error that is not out of memory: logged as a warning, and that runtime is not chosen
    again for this architecture and level in this process (measured or remembered, PyTorch or another runtime runs
    instead)."""
    runtime = backend.choice.runtime
    name = NAMES.get(runtime, "the chosen runtime")
    log.warning("%s failed at L%d (%s); PyTorch runs the rest", name, depth, one_line(exc))
    if runtime in NAMES and runtime != "torch":
        mark_failed(net, depth, runtime, exc)
    why = Choice("torch", precision_name(device, precision), f"{name} failed during the run; PyTorch ran the rest")
    return TorchBackend(net, depth, device, precision, why)


def runtime_failed(backend: Backend, exc: BaseException) -> RuntimeUnavailable:
    """The error to raise when a runtime asked for by name failed during a run with ``exc`` (not out of memory):
    one sentence, saying what to run instead."""
    name = NAMES.get(backend.choice.runtime, backend.choice.runtime)
    return RuntimeUnavailable(
        f"{name} failed on this model ({one_line(exc)}); run with --runtime auto (or runtime='auto' in Python), "
        "which falls back to PyTorch."
    )
