"""Which runtime runs the pruned network: PyTorch, ONNX Runtime or OpenVINO, chosen by measurement on the CPU.

On a CPU without bf16 (AVX2 only, like most laptops) everything runs in fp32. There ONNX Runtime's CPU provider
(blocked NCHWc convolutions, fused activations) ran our pruned sub-networks 1.15x-1.7x faster than PyTorch's
channels-last path, and OpenVINO's CPU plugin (the same ONNX graph, f32 inference precision) 1.8x-2.0x, with
probabilities equal to about 3e-6 and 1e-7 (``benchmarks/bench_inference.py``). Which is faster depends on the CPU,
the level and the batch shape, so :func:`choose` measures every runtime installed once per machine, architecture,
level and batch shape and remembers the answer on disk (``cache_dir()/runtime_choices.json``).

The exported graph is the inference copy of the network at depth k (batch norm folded, only the nodes with
``i + j <= k``) returning the probabilities of heads 1..k (and the cue), stacked: the same array
:class:`~napari_unetpp.inference.predict._Runner` gets from PyTorch. Batch and spatial sizes are dynamic. It is cached
on
disk under a hash of the parameters it holds, so changed weights (a fine-tuned model) never reuse a stale export.

``precision="int8"`` runs a statically quantised copy (see :mod:`napari_unetpp.runtimes.int8`) through ONNX Runtime.

Out of memory (recognised by the runtimes' own words for an allocation failure,
:func:`~napari_unetpp.runtimes.device.is_oom`)
halves the batch; any other failure of ONNX Runtime or OpenVINO in an auto run hands the rest of the run to PyTorch,
and that runtime is not chosen again for that model (its weights) and level in this process; a measurement made
without it serves this process only, and never replaces the saved choice. Runs on other threads (a slider preview
beside a whole-stack run) never measure at the same time, nor save a measurement one of them disturbed
(:func:`hold_cores`); a run that could not measure on its first batch tries again on a later one. Sessions and
compiled models are built once per model however many threads ask.

Nothing here imports Qt or napari. ``onnx`` (to export), ``onnxruntime`` and ``openvino`` are optional: without
them, or when an export fails, PyTorch runs and the reason says why.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_unetpp.errors import UserError
from napari_unetpp.model.network import probabilities
from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes.device import autocast_context, autocast_dtype, cpu_supports_bf16, is_oom, memory_format

__all__ = [
    "RUNTIMES",
    "Backend",
    "Choice",
    "RuntimeUnavailable",
    "choose",
    "hold_cores",
    "make_backend",
    "onnx_available",
    "onnx_graph",
    "openvino_available",
    "params_hash",
    "release_later",
    "release_pending",
    "runtime_failed",
    "torch_instead",
]

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "torch", "onnx", "openvino")
NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime", "onnx-int8": "ONNX Runtime", "openvino": "OpenVINO"}
_MIN_GAIN = 1.03  # another runtime must beat PyTorch by 3 % to be chosen: all are exact, so ties stay with PyTorch
_LOCK = threading.Lock()
_HASHES: weakref.WeakKeyDictionary[nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()
_CHOICES: dict[str, Choice] = {}  # this process's decisions (the file is read once per key)
_FAILED: dict[tuple[str, str], str] = {}  # (params_hash of the model at the level, runtime) -> why it failed here
_MEASURING: dict[str, threading.Lock] = {}  # per choice key: held while one run measures it


class RuntimeUnavailable(UserError, RuntimeError):
    """The runtime or precision asked for cannot run here (a missing package, a failed export, no calibration)."""


@dataclass(frozen=True)
class Choice:
    """What runs the network, and why.

    Attributes:
        runtime: ``"torch"``, ``"onnx"`` (ONNX Runtime fp32), ``"openvino"`` (OpenVINO fp32), ``"onnx-int8"``, or
            ``"auto"`` while not yet measured.
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


class TorchBackend(Backend):
    """The network in PyTorch (autocast where it pays, channels-last)."""

    def __init__(self, net: Any, depth: int, device: torch.device, precision: str, choice: Choice) -> None:
        self.net, self.depth, self.device, self.precision, self.choice = net, depth, device, precision, choice
        self.num_classes, self.cue = net.config.num_classes, net.config.has_cue
        self.fmt = memory_format(net, device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            t = torch.from_numpy(x).to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
            outs = self.net(t, depth=self.depth, cue=True) if self.cue else self.net(t, depth=self.depth)
            logits = torch.stack(outs, dim=1).float()  # (B, k, classes [+ cue], ...)
            return probabilities(logits, self.num_classes, dim=2).cpu().numpy()


class OnnxBackend(Backend):
    """An ONNX Runtime session over the exported graph (fp32, or a quantised copy)."""

    def __init__(self, session: Any, choice: Choice) -> None:
        self.session, self.choice = session, choice
        self.input = session.get_inputs()[0].name

    def memory(self) -> object | None:
        return self.session

    def release(self) -> bool:
        """Shrink the session's memory arena: a tiny run with arena shrinkage frees every chunk it does not use
        (chunks another run is using stay). Measured at L4 on 4 x 512^2 batches: the arena held 1.3 GB after a run
        and 19 MB after this; the next run's first batch then takes about 20 % longer (2.19 s against 1.85 s)."""
        import onnxruntime as ort

        shape = [d if isinstance(d, int) else 16 for d in self.session.get_inputs()[0].shape]
        shape[0] = 1
        opts = ort.RunOptions()
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            self.session.run(None, {self.input: np.zeros(shape, np.float32)}, opts)
        except Exception as exc:  # pragma: no cover - memory stays cached; nothing else is affected
            log.info("could not shrink ONNX Runtime's arena (%s)", exc)
        return True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]
        except Exception as exc:  # onnxruntime's own exception types do not derive from RuntimeError
            raise _as_oom_or_failure("ONNX Runtime", exc) from exc


def _as_oom_or_failure(name: str, exc: Exception) -> Exception:
    """A runtime's own exception as MemoryError when it is an allocation failure (the caller halves the batch), else
    as RuntimeError (the caller falls back to PyTorch). By the message's words for an allocation failure only
    (:func:`~napari_unetpp.runtimes.device.is_oom`): OpenVINO's "memory layout not supported" is no out-of-memory."""
    if is_oom(exc):
        return MemoryError(f"out of memory in {name}: {exc}")
    return RuntimeError(str(exc))


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
            raise _as_oom_or_failure("OpenVINO", exc) from exc
        finally:
            with self.model.lock:
                self.model.running -= 1


# Memory a large run leaves behind (ONNX Runtime's arena, OpenVINO's buffers: 1.5 GB at L4 on 4 x 512^2) is given back
# this many seconds after the run, not at its end: the next run within that time (the next file of a batch, a slider
# preview after a whole-stack run, a benchmark's repeat) skips the allocation. Measured at L4 on 5 x 512^2 slices with
# OpenVINO: 1.85 s a run back to back, against 2.85 s with the memory released at the end of each run.
RELEASE_AFTER_S = 10.0
_timer: Callable[..., Any] = threading.Timer  # what waits (tests put a timer they fire themselves)
_pending: dict[int, tuple[Any, Backend]] = {}  # by id of the memory's holder: (its timer, the backend)
_pending_lock = threading.Lock()


def release_later(backend: Backend, delay: float | None = None) -> None:
    """Give ``backend``'s memory back after ``delay`` seconds (:data:`RELEASE_AFTER_S`; 0: now). Another call for the
    same memory restarts the wait, so back-to-back runs keep it; if a run is using it when the time comes, it waits
    that long again."""
    holder = backend.memory()
    if holder is None:
        return
    delay = RELEASE_AFTER_S if delay is None else delay
    key = id(holder)
    with _pending_lock:
        old = _pending.pop(key, None)
        if old is not None:
            old[0].cancel()
        if delay > 0:
            token = object()  # which wait this is: a restarted wait's timer may still fire (cancel() came late)
            timer = _timer(delay, _release_due, (key, backend, delay, token))
            timer.daemon = True
            timer.token = token
            _pending[key] = (timer, backend)
            timer.start()
            return
    _release_or_retry(backend, RELEASE_AFTER_S)


def _release_due(key: int, backend: Backend, delay: float, token: object) -> None:
    with _pending_lock:
        entry = _pending.get(key)
        if entry is None or getattr(entry[0], "token", None) is not token:
            return  # restarted or released meanwhile
        del _pending[key]
    _release_or_retry(backend, delay)


def _release_or_retry(backend: Backend, retry_after: float) -> None:
    if not backend.release():  # a run is using it: try again later (never at once, or this would spin)
        release_later(backend, max(retry_after, 1.0))


def release_pending() -> None:
    """Give back now the memory waiting for :func:`release_later` (before training, which needs memory of its own)."""
    with _pending_lock:
        entries = list(_pending.values())
        _pending.clear()
    for timer, backend in entries:
        timer.cancel()
        _release_or_retry(backend, RELEASE_AFTER_S)


@atexit.register
def _forget_pending() -> None:  # nothing to give back at exit; a release must not run while Python shuts down
    with _pending_lock:
        for timer, _ in _pending.values():
            timer.cancel()
        _pending.clear()


class _Heads(nn.Module):
    """What the exported graph computes: the nodes of depth k (no pad/crop: inputs are multiples of the pooling,
    as ``predict``'s tiles are) and heads 1..k (with the cue), activated and stacked on axis 1."""

    def __init__(self, net: Any, depth: int) -> None:
        super().__init__()
        self.net, self.depth = net, depth
        self.num_classes, self.cue = net.config.num_classes, net.config.has_cue

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(self.net(x, depth=self.depth, cue=self.cue, pad=False), dim=1)
        return probabilities(stacked, self.num_classes, dim=2)


# ------------------------------------------------------------------------------------------------- availability
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


def params_hash(net: Any, depth: int) -> str:
    """SHA-256 (16 hex digits) of the parameters and buffers the depth-``depth`` graph uses, and the architecture.
    Memoised per network object: inference copies are never modified in place (a new copy follows new weights)."""
    memo = _HASHES.setdefault(net, {})
    if depth not in memo:
        memo[depth] = _params_hash(net, depth)
    return memo[depth]


def _params_hash(net: Any, depth: int) -> str:
    h = hashlib.sha256(json.dumps(net.config.to_dict(), sort_keys=True).encode())
    h.update(f"depth={depth}".encode())
    for name, mod in net.modules_for_depth(depth):
        for k, v in mod.state_dict().items():
            h.update(f"{name}.{k}".encode())
            h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def onnx_graph(net: Any, depth: int) -> Path:
    """The exported fp32 graph of ``net`` (an inference copy: batch norm folded) at ``depth``, from the disk cache
    or exported now (a few seconds at L4). Written to a temporary name and renamed, so readers never see half a file.

    Raises:
        RuntimeUnavailable: onnx is not installed or the export failed.
    """
    missing = onnx_available()
    if missing:
        raise RuntimeUnavailable(missing)
    path = cache_dir() / "onnx" / f"{params_hash(net, depth)}-L{depth}.onnx"
    if path.is_file():
        return path
    dims = net.config.spatial_dims
    mult = net.config.multiple
    sp = ["z", "y", "x"][-dims:]
    example = torch.zeros((1, net.config.in_channels, *[2 * m for m in mult]))
    module = _Heads(_contiguous_copy(net), depth).eval()
    t0 = time.perf_counter()

    def export(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                opset_version=17,
                dynamo=False,
                input_names=["x"],
                output_names=["p"],
                dynamic_axes={"x": {0: "b", **{2 + i: a for i, a in enumerate(sp)}}, "p": {0: "b"}},
            )

    write_atomically(path, export, "the ONNX export")
    log.info("exported L%d to ONNX in %.1f s: %s", depth, time.perf_counter() - t0, path)
    return path


def write_atomically(path: Path, write: Callable[[Path], object], what: str) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place: readers (another process
    using the same cache) never see half a file, and a failure leaves nothing behind.

    Raises:
        RuntimeUnavailable: ``write`` failed ("<what> failed (...)").
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeUnavailable(f"{what} failed ({type(exc).__name__}: {exc})") from exc


def _contiguous_copy(net: Any) -> nn.Module:
    import copy

    return copy.deepcopy(net).cpu().float().to(memory_format=torch.contiguous_format)


def ort_session(path: Path) -> Any:
    """An ONNX Runtime CPU session over the graph at ``path``, with every graph optimisation and torch's threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _kept_on(loaded: Any, key: str, build: Callable[[], Any]) -> Any:
    """``build()``, kept on ``loaded`` (a LoadedModel, or None: built every time) under ``key`` and torch's thread
    count: what a runtime loads from a graph file is made once per model, however many threads ask at once
    (:meth:`~napari_unetpp.model.registry.LoadedModel.kept`)."""
    kept = getattr(loaded, "kept", None)
    return build() if kept is None else kept(f"{key}:t{torch.get_num_threads()}", build)


def cached_session(loaded: Any, path: Path) -> Any:
    """:func:`ort_session` over ``path``, kept on ``loaded`` (a LoadedModel, or None) per graph file and thread
    count: the fp32 export and the int8 copy both come through here."""
    return _kept_on(loaded, f"ort:{path}", lambda: ort_session(path))


@functools.lru_cache(maxsize=1)
def _ov_core() -> Any:
    import openvino as ov

    return ov.Core()


def openvino_compiled(loaded: Any, path: Path) -> OpenVinoModel:
    """The graph at ``path`` compiled for OpenVINO's CPU plugin in f32 (never bf16, which it would choose on CPUs
    that have it: fp32 asked means exact), latency mode with torch's threads; kept on ``loaded`` like
    :func:`cached_session`.

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

    return _kept_on(loaded, f"ov:{path}", compile_graph)


# ------------------------------------------------------------------------------------------------- the cores
# A measurement must have the CPU's cores to itself: a slider preview timed while a whole-stack run computes (or the
# stack run timed while a preview computes) measures the contention, and saved it would choose wrongly for good.
# Every CPU run holds the cores while it lasts (prediction.py's runner; a measurement holds them too), by thread.
_cores_lock = threading.Lock()
_holds: dict[int, int] = {}  # id of a CoreHold -> the thread it was taken on
_watches: list[_Watch] = []  # the measurements running now


@dataclass
class _Watch:
    thread: int
    disturbed: bool = False  # another thread's run held the cores at some moment of the measurement


class CoreHold:
    """A run using the CPU's cores, from :func:`hold_cores` until :meth:`release` (or until it is collected: a
    generator dropped without closing). While another thread holds them, no runtime is measured, and a measurement
    during which another thread took them is not remembered."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        with _cores_lock:
            _holds[id(self)] = self.thread
            for w in _watches:
                if w.thread != self.thread:
                    w.disturbed = True
        self._release = weakref.finalize(self, _holds.pop, id(self), None)

    def release(self) -> None:
        """The run is over (again: nothing)."""
        with _cores_lock:
            self._release()

    def __enter__(self) -> CoreHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold_cores() -> CoreHold:
    """Say that this thread runs on the CPU's cores until ``.release()`` (or as ``with hold_cores(): ...``): a
    prediction does it for its whole run; a long CPU job beside predictions (training) may too."""
    return CoreHold()


@contextlib.contextmanager
def _watch_cores() -> Iterator[_Watch]:
    """``with _watch_cores() as w``: ``w.disturbed`` says whether another thread held the cores at its start or
    took them since."""
    w = _Watch(threading.get_ident())
    with _cores_lock:
        w.disturbed = any(t != w.thread for t in list(_holds.values()))  # a copy: a collected hold leaves any time
        _watches.append(w)
    try:
        yield w
    finally:
        with _cores_lock:
            _watches.remove(w)


# --------------------------------------------------------------------------------------- runtimes that failed
def _ban_key(net: Any, depth: int) -> str:
    """What a runtime's failure is held against: the exported graph, i.e. the architecture, the level and the
    weights (:func:`params_hash`, memoised per network object; the export computes it anyway). Another model of
    the same architecture (a fine-tuned version) tries that runtime again."""
    return params_hash(net, depth)


def _failed_here(net: Any, depth: int) -> dict[str, str]:
    """The runtimes that failed on this model at this level earlier in this process, each with why."""
    if not _FAILED:
        return {}
    g = _ban_key(net, depth)
    return {r: why for (k, r), why in _FAILED.items() if k == g}


def _memo_key(key: str, net: Any, depth: int) -> str:
    """What this process keeps a choice for ``key`` under: ``key`` itself, or (where a runtime failed on this model
    and level) a key of its own for this model without those runtimes, whose measurement is never saved."""
    failed = _failed_here(net, depth)
    return key if not failed else f"{key}|{_ban_key(net, depth)} without {','.join(sorted(failed))}"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message in one line: OpenVINO's run over several ("Exception from src/...:" first); the last
    line says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torch_instead(backend: Backend, exc: BaseException, net: Any, depth: int, device: torch.device) -> Backend:
    """PyTorch for the rest of a run whose runtime (``backend``, chosen automatically) failed with ``exc``, an error
    that is not out of memory: logged as a warning, and that runtime is not chosen again for this architecture and
    level in this process (measured or remembered, PyTorch or another runtime runs instead)."""
    runtime = backend.choice.runtime
    name = NAMES.get(runtime, "the chosen runtime")
    log.warning("%s failed at L%d (%s); PyTorch runs the rest", name, depth, _one_line(exc))
    if runtime in NAMES and runtime != "torch":
        _FAILED[(_ban_key(net, depth), runtime)] = _one_line(exc, 80)
    why = Choice("torch", "fp32", f"{name} failed during the run; PyTorch ran the rest")
    return TorchBackend(net, depth, device, "fp32", why)


def runtime_failed(backend: Backend, exc: BaseException) -> RuntimeUnavailable:
    """The error to raise when a runtime asked for by name failed during a run with ``exc`` (not out of memory):
    one sentence, saying what to run instead."""
    name = NAMES.get(backend.choice.runtime, backend.choice.runtime)
    return RuntimeUnavailable(
        f"{name} failed on this model ({_one_line(exc)}); run with --runtime auto (or runtime='auto' in Python), "
        "which falls back to PyTorch."
    )


# ------------------------------------------------------------------------------------------------- the choice
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
            write_atomically(_choices_file(), lambda tmp: tmp.write_text(text, encoding="utf-8"), "saving the choice")
        except (OSError, RuntimeUnavailable) as exc:  # a read-only cache: measured again next time
            log.info("could not save the runtime choice (%s)", exc)


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _versions() -> list[str]:
    out = []
    for mod in ("onnxruntime", "openvino"):
        try:
            out.append(f"{mod}={__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod}=none")
    return out


def _key(net: Any, depth: int, batch: int, tile: tuple[int, ...] | None) -> str:
    """What a runtime choice is remembered under (``tile`` None: ``predict``'s usual 512^2 plane, or a 64^3 patch)."""
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
        ]
    )


def _installed() -> dict[str, str | None]:
    """The runtimes besides PyTorch, each with None when it can run here, else why not."""
    return {"onnx": onnx_available(), "openvino": openvino_available()}


def _usable(net: Any, depth: int) -> tuple[list[str], list[str]]:
    """The runtimes besides PyTorch an auto run of ``net`` at ``depth`` may use (installed, and not failed on this
    model and level in this process), and why each of the others may not."""
    failed = _failed_here(net, depth)
    usable, why_not = [], []
    for r, why in _installed().items():
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

    - GPUs and bf16/fp16 autocast: PyTorch (the other runtimes have no faster exact path there).
    - ``precision="int8"``: the quantised graph in ONNX Runtime.
    - fp32 on the CPU with ``runtime="auto"``: whichever of PyTorch, ONNX Runtime and OpenVINO (those installed)
      ran this batch shape fastest on this machine, remembered per CPU, thread count, package versions,
      architecture, level and batch shape in ``runtime_choices.json``; ``runtime == "auto"`` in the answer when it
      has not been measured yet (the :class:`AutoBackend` measures it on the run's own first batch). PyTorch when
      neither of the others is installed.
    - ``runtime="torch"`` / ``"onnx"`` / ``"openvino"``: that one (the last two raise if they cannot run).

    Measured on a 2-core AVX2 CPU (``benchmarks/bench_inference.py``): which one wins depends on the CPU, the level
    and the batch shape (ONNX Runtime 1.4-1.7x at L1, 0.97-1.6x at L4; OpenVINO 1.2-1.3x ONNX Runtime), hence one
    measurement per shape.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}.")
    if precision == "int8":
        if device.type != "cpu":
            raise RuntimeUnavailable("int8 runs on the CPU only; use --device cpu, or fp16/bf16 on the GPU.")
        missing = onnx_available()
        if missing:
            raise RuntimeUnavailable(f"int8 needs ONNX Runtime: {missing}.")
        return Choice("onnx-int8", "int8", "static int8, calibrated on the model's own data")
    dt = autocast_dtype(device, precision)
    prec = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]
    if device.type != "cpu":
        if runtime in ("onnx", "openvino"):
            raise RuntimeUnavailable(f"the {NAMES[runtime]} path runs on the CPU only; use --runtime auto on a GPU.")
        return Choice("torch", prec, "autocast on the GPU" if dt is not None else "as asked")
    if dt is not None:  # bf16 (or fp16) autocast on the CPU
        if runtime in ("onnx", "openvino"):
            raise RuntimeUnavailable(
                f"the {NAMES[runtime]} path runs in fp32; use --precision fp32 with --runtime {runtime}."
            )
        native = prec == "bf16" and cpu_supports_bf16()
        return Choice("torch", prec, "bf16 autocast: this CPU has native bf16" if native else "asked")
    if runtime == "torch":
        return Choice("torch", "fp32", "asked")
    installed = _installed()
    if runtime != "auto":
        if installed[runtime]:
            raise RuntimeUnavailable(f"{NAMES[runtime]} cannot run: {installed[runtime]}.")
        return Choice(runtime, "fp32", "asked")
    usable, why_not = _usable(net, depth)
    if not usable:
        return Choice("torch", "fp32", "; ".join(why_not))
    key = _key(net, depth, batch, tile)
    memo = _memo_key(key, net, depth)  # key, unless a runtime failed on this model here
    for k in dict.fromkeys((memo, key)):  # a full measurement's answer holds if it names a runtime still usable
        if k in _CHOICES and _CHOICES[k].runtime in ("torch", *usable):
            return _CHOICES[k]
    known = _read_choices().get(key)
    if isinstance(known, dict) and known.get("runtime") in ("torch", *usable):
        _CHOICES[memo] = Choice(known["runtime"], "fp32", str(known.get("reason", "")), known.get("speedup"))
        return _CHOICES[memo]
    return Choice("auto", "fp32", "not measured yet on this CPU")


def _decide(
    key: str,
    depth: int,
    shape: str,
    seconds: dict[str, float],
    keep: str = "saved",
    memo: str | None = None,
    without: Sequence[str] = (),
) -> Choice:
    """Which runtime ran the same batch fastest (``seconds`` per runtime, PyTorch's among them): another runtime must
    beat PyTorch by :data:`_MIN_GAIN`.

    ``keep`` says where the answer is remembered: ``"saved"`` in this process and the file, under ``key``;
    ``"process"`` in this process only, under ``memo`` (a measurement ``without`` runtimes that failed on this
    model here: saved, it would replace a choice one of them won, for every model of the architecture, for good);
    ``"run"`` nowhere (a measurement another run disturbed serves its own run only).
    """
    speed = {r: seconds["torch"] / max(t, 1e-12) for r, t in seconds.items()}
    best = max((r for r in speed if r != "torch"), key=speed.__getitem__)
    at = f"at L{depth}, batches of {shape}"
    if speed[best] >= _MIN_GAIN:
        reason = f"{speed[best]:.2f}x PyTorch on this CPU {at}"
        runtime = best
    else:
        reason, runtime = f"{NAMES[best]} {speed[best]:.2f}x, not faster on this CPU {at}", "torch"
    measured = {r: round(v, 3) for r, v in speed.items() if r != "torch"}
    if keep == "run":
        reason = f"{reason}; measured while another run used the CPU: not remembered"
        log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, runtime, reason, measured)
        return Choice(runtime, "fp32", reason, speed[best])
    if keep == "process":
        names = " and ".join(NAMES.get(r, r) for r in without) or "a runtime"
        reason = f"{reason}; without {names}, which failed on this model: not saved"
        choice = Choice(runtime, "fp32", reason, speed[best])
        _CHOICES[memo or key] = choice
        log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, runtime, reason, measured)
        return choice
    choice = Choice(runtime, "fp32", reason, speed[best])
    _CHOICES[key] = choice
    _write_choice(
        key, {"runtime": choice.runtime, "reason": choice.reason, "speedup": round(speed[best], 3), "x_torch": measured}
    )
    log.info("runtime for L%d: %s (%s; x PyTorch: %s)", depth, choice.runtime, choice.reason, measured)
    return choice


class AutoBackend(Backend):
    """Measures PyTorch against the other runtimes installed on one of the run's batches (its first, unless another
    run was using the CPU), then keeps the fastest for the rest of the run.

    A measuring call runs the batch through each runtime twice (a warm-up for first-run allocations and kernel
    choice, then a timed run) and returns the fastest one's output. A runtime that cannot be built or fails on the
    batch is left out (logged), and a measurement without it is not saved. Otherwise the answer is saved, so this
    happens once per machine and batch shape.

    One run measures a key at a time, and only while no other thread's run holds the cores (:class:`CoreHold`): a
    batch that finds the key being measured, or the cores taken, runs on PyTorch without measuring (a slider preview
    during a whole-stack run answers at once instead of waiting seconds for exports and timings), and the next
    batch tries again, so a preview overlapping the start of a long run does not cost that run its faster runtime.
    The outputs of such a run come from two runtimes (its first batches from PyTorch), which agree to about 1e-6 in
    fp32 (ONNX Runtime against PyTorch on the shipped EM model: 9e-7 at L2, 1.5e-6 at L4, masks equal). A
    measurement during which another run took the cores serves its own run but is not remembered.
    """

    def __init__(
        self, torch_backend: TorchBackend, others: dict[str, Callable[[], Backend]], key: str, depth: int
    ) -> None:
        self.torch, self._others, self.key, self.depth = torch_backend, others, key, depth
        self.choice = Choice("auto", "fp32", "measuring")
        self.decided: Backend | None = None
        self._unmeasured = 0  # batches run on PyTorch so far, waiting to measure

    def memory(self) -> object | None:
        return None if self.decided is None else self.decided.memory()

    def release(self) -> bool:
        return True if self.decided is None else self.decided.release()

    def _settle(self, backend: Backend, choice: Choice) -> None:
        if self._unmeasured and backend is not self.torch:  # else PyTorch ran the whole run anyway
            n = self._unmeasured
            choice = replace(
                choice,
                reason=f"{choice.reason}; PyTorch ran the first {n} batch{'es' if n > 1 else ''}, "
                "while another run used the CPU",
            )
        self.decided, self.choice = backend, choice
        backend.choice = choice

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.decided is not None:
            return self.decided(x)
        with _cores_lock:
            lock = _MEASURING.setdefault(self.key, threading.Lock())
        if not lock.acquire(blocking=False):
            return self._meanwhile(x, "another run is measuring this shape")
        try:
            memo = _memo_key(self.key, self.torch.net, self.depth)  # measured by another run since make_backend?
            usable = ("torch", *self._others)
            kept = [_CHOICES[k] for k in (memo, self.key) if k in _CHOICES]
            known = next((c for c in kept if c.runtime in usable), None)
            if known is not None:
                backend = self._use(known)
            else:
                with hold_cores(), _watch_cores() as watch:
                    if not watch.disturbed:
                        return self._measure(x, watch)
                backend = None
        finally:
            lock.release()
        return backend(x) if backend is not None else self._meanwhile(x, "another run was using the CPU")

    def _meanwhile(self, x: np.ndarray, why: str) -> np.ndarray:
        """This batch on PyTorch, unmeasured; the decision stays open for the next batch."""
        self._unmeasured += 1
        self.choice = Choice("torch", "fp32", f"{why}: not measured")
        return self.torch(x)

    def _use(self, choice: Choice) -> Backend:
        """The runtime another run's measurement chose, settled on (PyTorch if it cannot be built here)."""
        backend: Backend = self.torch
        if choice.runtime != "torch":
            try:
                backend = self._others[choice.runtime]()
            except RuntimeUnavailable as exc:
                log.warning("%s not used: %s", NAMES[choice.runtime], exc)
                choice = Choice("torch", "fp32", str(exc))
        self._settle(backend, choice)
        return backend

    def _measure(self, x: np.ndarray, watch: _Watch) -> np.ndarray:
        backends: dict[str, Backend] = {"torch": self.torch}
        failed = []
        net = self.torch.net
        ban = _ban_key(net, self.depth)
        for name, make in self._others.items():
            if name in _failed_here(net, self.depth):  # failed on another thread since this run began
                continue
            try:
                backends[name] = make()
            except RuntimeUnavailable as exc:  # a failed export or compilation: not tried again in this process
                failed.append(str(exc))
                _FAILED[(ban, name)] = _one_line(exc, 80)
                log.warning("%s not used: %s", NAMES[name], exc)
        for name in list(backends):  # warm-ups; a runtime that fails here is left out
            try:
                backends[name](x)
            except (RuntimeError, MemoryError) as exc:
                if name == "torch" or is_oom(exc):
                    raise  # out of memory: the caller halves the batch and this measures again
                failed.append(f"{NAMES[name]} failed ({exc})")
                _FAILED[(ban, name)] = _one_line(exc, 80)
                log.warning("%s not used: it failed on the first batch (%s)", NAMES[name], exc)
                backends.pop(name)
        if len(backends) == 1:
            self._settle(self.torch, Choice("torch", "fp32", "; ".join(dict.fromkeys(failed))))
            return self.torch(x)
        seconds, outs = {}, {}
        for name, backend in backends.items():
            seconds[name], outs[name] = _time(lambda b=backend: b(x))  # type: ignore[misc]
        shape = f"{x.shape[0]}x{'x'.join(map(str, x.shape[2:]))}"
        without = sorted(_failed_here(net, self.depth))  # earlier in this process, or just now
        keep = "run" if watch.disturbed else "process" if without else "saved"
        choice = _decide(self.key, self.depth, shape, seconds, keep, _memo_key(self.key, net, self.depth), without)
        self._settle(backends[choice.runtime], choice)
        for backend in backends.values():
            if backend is not self.decided:
                backend.release()
        return outs[choice.runtime]


def resolve_runtime(
    loaded: Any,
    net: Any,
    depth: int,
    device: torch.device,
    precision: str,
    tile: tuple[int, ...],
    runtime: str = "auto",
    batch: int = 1,
) -> str:
    """``"torch"``, ``"onnx"`` or ``"openvino"``: what an ``"auto"`` run of this shape uses, measured now on a zero
    batch if it is not known yet (else ``runtime`` unchanged). Blocks of one split run pass it on, so every block
    runs the same runtime and their numbers equal a single process's."""
    backend = make_backend(loaded, net, depth, device, precision, tile, runtime, batch)
    if isinstance(backend, AutoBackend):
        backend(np.zeros((batch, net.config.in_channels, *tile), np.float32))
    chosen = backend.choice.runtime
    return chosen if chosen in ("torch", "onnx", "openvino") else runtime


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
    """The backend :func:`choose` picks (an :class:`AutoBackend` that measures, when it is not known yet), with its
    ONNX Runtime session or OpenVINO compiled model cached on ``loaded`` (a LoadedModel, or None) per graph. A failed
    export falls back to PyTorch, unless a runtime was asked for by name."""
    choice = choose(net, depth, device, precision, tile, runtime, batch)
    torch_backend = TorchBackend(net, depth, device, precision, choice)
    if choice.runtime == "torch":
        return torch_backend
    makers: dict[str, Callable[[], Backend]] = {
        "onnx": lambda: OnnxBackend(cached_session(loaded, onnx_graph(net, depth)), Choice("onnx", "fp32", "")),
        "openvino": lambda: OpenVinoBackend(
            openvino_compiled(loaded, onnx_graph(net, depth)), Choice("openvino", "fp32", "")
        ),
    }
    if choice.runtime == "auto":
        usable = {r: makers[r] for r in _usable(net, depth)[0]}
        return AutoBackend(torch_backend, usable, _key(net, depth, batch, tile), depth)
    try:
        if choice.runtime == "onnx-int8":
            from napari_unetpp.runtimes.int8 import int8_session

            return OnnxBackend(int8_session(loaded, depth), choice)
        backend = makers[choice.runtime]()
        backend.choice = choice
        return backend
    except RuntimeUnavailable as exc:
        if runtime != "auto" or choice.runtime == "onnx-int8":
            raise
        log.warning("%s not used: %s", NAMES[choice.runtime], exc)
        return TorchBackend(net, depth, device, precision, Choice("torch", "fp32", str(exc)))
