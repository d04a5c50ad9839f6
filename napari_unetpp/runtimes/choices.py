"""The measured choices of a runtime: what they are remembered under, this process's, and the saved ones
(``cache_dir()/runtime_choices.json``), and :func:`decide`, which turns a measurement into a choice.

Which runtime is faster depends on the CPU, the level and the batch shape, so a choice is remembered per CPU, thread
count, package versions, architecture, level, batch shape and the precisions allowed (fp32 only, or bf16 too: a
measurement with bf16 candidates never answers an fp32 run) (:func:`choice_key`), once per machine.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import threading
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from napari_unetpp.paths import cache_dir, write_atomically
from napari_unetpp.runtimes.base import NAMES, Choice

__all__ = ["MIN_GAIN", "choice_key", "decide", "kept_choice", "saved_choice"]

log = logging.getLogger(__name__)
MIN_GAIN = 1.03  # another runtime must beat PyTorch (in the run's precision) by 3 % to be chosen: ties stay with it
_LOCK = threading.Lock()
_CHOICES: dict[str, Choice] = {}  # this process's decisions (the file is read once per key)


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> list[str]:
    out = []
    for mod in ("onnxruntime", "openvino"):
        try:
            out.append(f"{mod}={__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod}=none")
    return out


def choice_key(net: Any, depth: int, batch: int, tile: tuple[int, ...] | None, precision: str = "fp32") -> str:
    """What a runtime choice is remembered under (``tile`` None: ``predict``'s usual 512^2 plane, or a 64^3 patch;
    ``precision``: the run's, ``"fp32"`` or ``"bf16"``, which says which candidates were measured)."""
    if not tile:
        tile = (512,) * 2 if net.config.spatial_dims == 2 else (64,) * 3
    return "|".join(
        [
            _cpu_name(),
            f"threads={torch.get_num_threads()}",
            f"torch={torch.__version__}",
            *_versions(),
            json.dumps(net.config.to_dict(), sort_keys=True),
            f"L{depth}",
            f"{batch}x{'x'.join(map(str, tuple(tile)))}",
            *([] if precision == "fp32" else [f"precision={precision}"]),  # fp32 keys stay as they were saved
        ]
    )


def _choices_file() -> Path:
    return cache_dir() / "runtime_choices.json"


def _read_choices() -> dict[str, Any]:
    try:
        data = json.loads(_choices_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_choice(key: str, value: dict[str, Any]) -> None:
    with _LOCK:
        data = _read_choices()
        data[key] = value
        text = json.dumps(data, indent=1, sort_keys=True)
        try:
            # mode None: private (0600), as the cache always was
            write_atomically(_choices_file(), lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=None)
        except OSError as exc:  # a read-only cache: measured again next time
            log.info("could not save the runtime choice (%s)", exc)


def kept_choice(keys: Iterable[str], usable: Container[str]) -> Choice | None:
    """This process's choice under the first of ``keys`` that has one naming a runtime in ``usable``, else None."""
    return next((_CHOICES[k] for k in keys if k in _CHOICES and _CHOICES[k].runtime in usable), None)


def saved_choice(key: str, memo: str, usable: Container[str]) -> Choice | None:
    """The choice saved for ``key`` (``runtime_choices.json``) if it names a runtime in ``usable``, kept in this
    process under ``memo`` (see :func:`~napari_unetpp.runtimes.failures.memo_key`); else None."""
    known = _read_choices().get(key)
    if not isinstance(known, dict) or known.get("runtime") not in usable:
        return None
    prec = str(known.get("precision", "fp32"))
    _CHOICES[memo] = Choice(known["runtime"], prec, str(known.get("reason", "")), known.get("speedup"))
    return _CHOICES[memo]


def decide(
    key: str,
    depth: int,
    shape: str,
    seconds: dict[str, float],
    keep: str = "saved",
    memo: str | None = None,
    without: Sequence[str] = (),
    precisions: dict[str, str] | None = None,
) -> Choice:
    """Which runtime ran the same batch fastest (``seconds`` per runtime, PyTorch's among them): another runtime must
    beat PyTorch by :data:`MIN_GAIN`. ``precisions`` says what each ran in (default fp32; PyTorch's is the run's).

    ``keep`` says where the answer is remembered: ``"saved"`` in this process and the file, under ``key``;
    ``"process"`` in this process only, under ``memo`` (a measurement ``without`` runtimes that failed on this
    model here: saved, it would replace a choice one of them won, for every model of the architecture, for good);
    ``"run"`` nowhere (a measurement another run disturbed serves its own run only).
    """
    prec = {r: "fp32" for r in seconds} | dict(precisions or {})
    speed = {r: seconds["torch"] / max(t, 1e-12) for r, t in seconds.items()}
    best = max((r for r in speed if r != "torch"), key=speed.__getitem__)
    at = f"at L{depth}, batches of {shape}"
    torch_name = "PyTorch" if prec["torch"] == "fp32" else f"PyTorch {prec['torch']}"
    if speed[best] >= MIN_GAIN:
        reason = f"{speed[best]:.2f}x {torch_name} on this CPU {at}"
        runtime = best
    else:
        best_name = f"{NAMES[best]} {prec[best]}" if prec[best] != prec["torch"] else NAMES[best]
        reason, runtime = f"{best_name} {speed[best]:.2f}x, not faster on this CPU {at}", "torch"
    measured = {r: round(v, 3) for r, v in speed.items() if r != "torch"}
    if keep == "run":
        reason = f"{reason}; measured while another run used the CPU: not remembered"
        log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, runtime, reason, measured)
        return Choice(runtime, prec[runtime], reason, speed[best])
    if keep == "process":
        names = " and ".join(NAMES.get(r, r) for r in without) or "a runtime"
        reason = f"{reason}; without {names}, which failed on this model: not saved"
        choice = Choice(runtime, prec[runtime], reason, speed[best])
        _CHOICES[memo or key] = choice
        log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, runtime, reason, measured)
        return choice
    choice = Choice(runtime, prec[runtime], reason, speed[best])
    _CHOICES[key] = choice
    saved = {"runtime": runtime, "precision": prec[runtime], "reason": reason, "speedup": round(speed[best], 3)}
    _write_choice(key, saved | {"x_torch": measured})
    log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, choice.runtime, choice.reason, measured)
    return choice
