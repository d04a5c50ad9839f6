"""Runtimes under failure and under threads (issue 28): out-of-memory is recognised by its real messages only, a
runtime failure that is not out of memory falls back to PyTorch, a runtime measurement is never taken or saved while
another run uses the cores, and what a model builds for inference is built once however many threads ask."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unetpp import predict, predict_iter
from napari_unetpp.model import loaded as loaded_model
from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes import (
    Choice,
    RuntimeUnavailable,
    auto,
    base,
    choices,
    cores,
    failures,
    hold_cores,
    selection,
)
from napari_unetpp.runtimes.device import is_oom
from napari_unetpp.runtimes.onnx_backend import OnnxBackend, ort_session
from napari_unetpp.runtimes.openvino_backend import OpenVinoBackend, OpenVinoModel

from .conftest import tiny_loaded as tiny

# these tests count exports, corrupt caches and measure runtime choices: each gets a cache of its own, and
# runtime="auto" measures the runtimes as it does for users
pytestmark = [pytest.mark.runtimes, pytest.mark.usefixtures("own_cache")]

ONNX = "onnxruntime is not installed (pip install onnx onnxruntime)"
OPENVINO = "openvino is not installed (pip install onnx openvino)"

# What the runtimes really say when memory runs out (torch 2.x on the CPU and CUDA, ONNX Runtime, OpenVINO's CPU
# plugin, the C++ runtime on Linux and Windows) ...
OOM_MESSAGES = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)",
    "MPS backend out of memory (MPS allocated: 1.2 GB, other allocations: 0 bytes)",
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "4611686018427387904 bytes. Error code 12 (Cannot allocate memory)",
    "DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes.",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: Failed to allocate memory for "
    "requested buffer of size 1073741824",
    "Exception from src/inference/src/cpp/infer_request.cpp:223:\nCheck 'ptr' failed at "
    "src/plugins/intel_cpu/src/cpu_memory.cpp:257:\nFailed to allocate 7663872811008 bytes of memory",
    "std::bad_alloc",
    "Exception from src\\core\\src\\runtime\\allocator.cpp:79:\nbad allocation",
]
# ... and failures that only mention memory, which a smaller batch does not cure.
NOT_OOM_MESSAGES = [
    "Exception from src/plugins/intel_cpu/src/node.cpp:1024: memory layout not supported for this Convolution",
    "Exception from src/plugins/intel_cpu/src/cpu_memory.h:206: Cannot get memory!",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Status Message: unsupported memory format",
    "shared memory segment is too small for the request",
]


@pytest.fixture(autouse=True)
def _fresh_runtime_state(monkeypatch):
    """This process's remembered choices and failed runtimes start empty (the file lives in the test's own home), and
    so do the holds on the cores and the measurements running (a test that fails while holding leaks nothing)."""
    monkeypatch.setattr(choices, "_CHOICES", {})
    monkeypatch.setattr(failures, "_FAILED", {})
    monkeypatch.setattr(auto, "_MEASURING", {})
    monkeypatch.setattr(cores, "_holds", {})
    monkeypatch.setattr(cores, "_watches", [])


# ------------------------------------------------------------------------------------------ out of memory, strictly
@pytest.mark.parametrize("msg", OOM_MESSAGES)
def test_out_of_memory_is_recognised_by_its_messages(msg):
    assert is_oom(RuntimeError(msg)) and is_oom(Exception(msg))
    assert is_oom(MemoryError("anything")) and is_oom(torch.cuda.OutOfMemoryError("x"))


@pytest.mark.parametrize("msg", NOT_OOM_MESSAGES)
def test_a_failure_that_only_mentions_memory_is_not_out_of_memory(msg):
    assert not is_oom(RuntimeError(msg))


class _Request:
    """An OpenVINO inference request that raises ``error`` (and counts its calls)."""

    def __init__(self, error: BaseException, calls: list[int]) -> None:
        self.error, self.calls = error, calls

    def infer(self, feeds):
        self.calls.append(len(feeds[0]))
        raise self.error


class _Compiled:
    def __init__(self, error: BaseException, calls: list[int]) -> None:
        self.error, self.calls = error, calls

    def create_infer_request(self):
        return _Request(self.error, self.calls)

    def release_memory(self):
        pass


class _Session:
    """An ONNX Runtime session that raises ``error`` (onnxruntime's errors are not RuntimeErrors)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def get_inputs(self):
        return [type("I", (), {"name": "x", "shape": ["b", 1, "y", "x"]})()]

    def run(self, names, feeds, *opts):
        raise self.error


@pytest.mark.parametrize("oom", [True, False])
def test_runtime_errors_are_out_of_memory_only_when_they_say_so(oom):
    """OpenVINO's and ONNX Runtime's errors become MemoryError (the batch is halved) only for real allocation
    failures; "memory layout not supported" stays a failure of that runtime (PyTorch takes over)."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    for msg in OOM_MESSAGES if oom else NOT_OOM_MESSAGES:
        ov = OpenVinoBackend(OpenVinoModel(_Compiled(RuntimeError(msg), [])), Choice("openvino", "fp32", ""))
        ort = OnnxBackend(_Session(Exception(msg)), Choice("onnx", "fp32", ""))
        for backend in (ov, ort):
            with pytest.raises((RuntimeError, MemoryError)) as info:
                backend(x)
            assert isinstance(info.value, MemoryError) == oom, (type(backend).__name__, msg)
            assert is_oom(info.value) == oom


def _fake_openvino(monkeypatch, error: BaseException) -> tuple[list[int], list[int]]:
    """OpenVINO "installed" (ONNX Runtime not), remembered as the fastest for every shape, its requests raising
    ``error``; returns the lists its compilations and inference calls are counted in."""
    compiled, calls = [], []
    monkeypatch.setattr(base, "onnx_available", lambda: ONNX)
    monkeypatch.setattr(base, "openvino_available", lambda: None)
    monkeypatch.setattr(selection, "onnx_graph", lambda net, depth: Path(f"fake-L{depth}.onnx"))

    def compile_graph(loaded, path):
        compiled.append(1)
        return OpenVinoModel(_Compiled(error, calls))

    monkeypatch.setattr(selection, "openvino_compiled", compile_graph)

    class Remembered(dict):  # runtime_choices.json says OpenVINO, whatever the shape
        def get(self, key, default=None):
            return {"runtime": "openvino", "reason": "1.90x PyTorch on this CPU", "speedup": 1.9}

    monkeypatch.setattr(choices, "_read_choices", Remembered)
    return compiled, calls


def test_openvino_failure_mentioning_memory_falls_back_to_torch(em_crop, monkeypatch, caplog):
    """OpenVINO failing with an error that mentions memory but is not out of memory (issue 28, item 12): PyTorch
    runs the rest, with a logged warning, instead of halving the batch down to "choose a smaller tile"; and OpenVINO
    is not chosen again for that model and level in this process."""
    compiled, calls = _fake_openvino(monkeypatch, RuntimeError(NOT_OOM_MESSAGES[0]))
    crop = em_crop[:2, :64, :80]
    lm = tiny()
    with caplog.at_level(logging.WARNING, logger="napari_unetpp"):
        got = predict(crop, lm, depth=2, tile=32, batch_size=1, precision="fp32", prob_dtype="float32")
    ref = predict(crop, lm, depth=2, tile=32, batch_size=1, precision="fp32", prob_dtype="float32", runtime="torch")
    assert got.runtime == "torch" and "OpenVINO failed" in got.ran_on, got.ran_on
    np.testing.assert_allclose(got.probabilities[2], ref.probabilities[2], atol=1e-5)
    np.testing.assert_array_equal(got.mask, ref.mask)
    assert calls == [1] and compiled == [1]  # one failed batch, never retried with fewer tiles
    assert any("OpenVINO" in r.getMessage() and "memory layout" in r.getMessage() for r in caplog.records)
    again = predict(crop, lm, depth=2, tile=32, batch_size=1, precision="fp32")
    assert again.runtime == "torch" and "OpenVINO failed" in again.ran_on, again.ran_on
    assert calls == [1] and compiled == [1]  # not built, not run again
    other = predict(crop, lm, depth=1, tile=32, batch_size=1, precision="fp32")  # another level: tried there
    assert other.runtime == "torch" and calls == [1, 1]


def test_openvino_out_of_memory_still_halves_the_batch(em_crop, monkeypatch):
    """A real OpenVINO allocation failure is out of memory: the batch is halved, down to the one-sentence error."""
    _fake_openvino(monkeypatch, RuntimeError(OOM_MESSAGES[5]))
    with pytest.raises(MemoryError, match="even for a single tile"):
        predict(em_crop[0, :64, :80], tiny(), depth=2, tile=32, batch_size=4, precision="fp32")


def test_a_runtime_asked_by_name_that_fails_says_so_in_one_sentence(em_crop, monkeypatch):
    _fake_openvino(monkeypatch, RuntimeError(NOT_OOM_MESSAGES[0]))
    with pytest.raises(RuntimeUnavailable) as info:
        predict(em_crop[0, :64, :80], tiny(), depth=2, tile=32, precision="fp32", runtime="openvino")
    msg = str(info.value)
    assert msg.startswith("OpenVINO failed on this model") and "--runtime" in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- measurements and the cores
def _only_onnx(monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setattr(base, "onnx_available", lambda: None)
    monkeypatch.setattr(base, "openvino_available", lambda: OPENVINO)


def _saved() -> dict:
    path = cache_dir() / "runtime_choices.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def test_a_preview_during_a_measurement_runs_pytorch_and_nothing_wrong_is_saved(em_crop, monkeypatch):
    """A whole-stack run is measuring the runtimes when the slider asks for a preview of the same shape: the preview
    does not wait for the measurement (nor measure itself: one measurement per key at a time), it runs PyTorch at
    once; the stack run's measurement, disturbed by the preview, is used for that run only and is not saved. The
    next run, alone, measures and saves."""
    _only_onnx(monkeypatch)
    lm, crop = tiny(), em_crop[:2, :64, :64]
    measuring, go = threading.Event(), threading.Event()
    timed: list[str] = []

    def fake_time(fn):  # PyTorch is timed first, then ONNX Runtime; the stack run's first timing waits for `go`
        timed.append(threading.current_thread().name)
        if len(timed) == 1:
            measuring.set()
            go.wait(30)
        return (1.0 if len(timed) % 2 else 0.5), fn()  # ONNX Runtime "2x faster"

    monkeypatch.setattr(auto, "_time", fake_time)
    kw = dict(depth=2, precision="fp32", prob_dtype="float32")
    out: dict[str, object] = {}
    stack = threading.Thread(target=lambda: out.setdefault("stack", predict(crop, lm, **kw)), name="stack")
    stack.start()
    try:
        assert measuring.wait(30)
        preview = predict(crop, lm, **kw)  # same shape, same key, while the stack run measures
    finally:
        go.set()
        stack.join(30)
    assert preview.runtime == "torch" and "another run" in preview.ran_on, preview.ran_on
    assert timed == ["stack", "stack"]  # the preview timed nothing
    res = out["stack"]
    assert res.runtime == "onnx" and "not remembered" in res.ran_on, res.ran_on
    assert _saved() == {} and choices._CHOICES == {}
    alone = predict(crop, lm, **kw)
    assert alone.runtime == "onnx" and "not remembered" not in alone.ran_on
    (entry,) = _saved().values()
    assert entry["runtime"] == "onnx"


def test_no_measurement_while_another_run_holds_the_cores(em_crop, monkeypatch):
    """A run in another thread (here a whole-stack run paused between two batches) holds the cores: a run of an
    unmeasured shape meanwhile runs PyTorch without measuring and saves nothing; once that run ends, it measures."""
    _only_onnx(monkeypatch)
    lm = tiny()
    decided = []
    real = auto.decide
    monkeypatch.setattr(auto, "decide", lambda *a: decided.append(a) or real(*a))
    stack = predict_iter(
        np.tile(em_crop[:2, :64, :64], (1, 2, 2)), lm, depth=2, tile=64, batch_size=1, precision="fp32"
    )
    started = threading.Thread(target=lambda: next(stack))
    started.start()
    started.join(30)
    assert len(decided) == 1  # the stack run measured its own shape
    (first,) = _saved()
    small = em_crop[0, :48, :48]
    meanwhile = predict(small, lm, depth=2, precision="fp32")
    assert meanwhile.runtime == "torch" and "another run" in meanwhile.ran_on and len(decided) == 1
    assert list(_saved()) == [first]
    stack.close()  # the stack run ends (a cancel): the cores are free
    later = predict(small, lm, depth=2, precision="fp32")
    assert len(decided) == 2 and len(_saved()) == 2 and "another run" not in later.ran_on


# ----------------------------------------------------------------------------- built once, whatever the threads
def _race(n: int, call) -> list:
    """Run ``call()`` in ``n`` threads released together by a barrier; their results."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait(30)
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _slow_build(built: list, make, parties: int = 2):
    """``make`` wrapped to count its builds; each build waits (up to 1 s) for a second build to start, so two
    builds run at the same time whenever nothing stops them (the race is certain, not likely)."""
    meet = threading.Barrier(parties, timeout=1.0)

    def build(*a, **k):
        built.append(1)
        try:
            meet.wait()
        except threading.BrokenBarrierError:
            pass  # nobody else came in: the others wait on a lock
        return make(*a, **k)

    return build


def test_inference_module_is_built_once_by_concurrent_callers(monkeypatch):
    built: list = []
    monkeypatch.setattr(loaded_model, "optimize_for_inference", _slow_build(built, loaded_model.optimize_for_inference))
    lm = tiny()
    a, b = _race(2, lambda: lm.inference_module("cpu"))
    assert built == [1] and a is b is lm.inference_module("cpu")


def test_a_runtime_session_is_built_once_by_concurrent_callers():
    built: list = []
    lm = tiny()
    build = _slow_build(built, object)
    a, b = _race(2, lambda: base.kept_on(lm, "ort:graph.onnx", build))
    assert built == [1] and a is b


def test_loaded_model_still_pickles_and_copies_with_its_locks():
    lm = tiny()
    lm.inference_module("cpu")
    for other in (pickle.loads(pickle.dumps(lm)), copy.deepcopy(lm)):
        assert other.card == lm.card and other.inference_module("cpu") is not lm.inference_module("cpu")
        built: list = []
        assert base.kept_on(other, "k", _slow_build(built, object, parties=1)) is base.kept_on(other, "k", object)


# ------------------------------------------------------------------- a run disturbed at its start measures later
def _to_end(gen):
    """Drive a ``predict_iter`` generator to its end; its Prediction."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _timings(*seconds: float):
    """A stand-in for :func:`~napari_unetpp.runtimes.auto._time` that answers ``seconds`` in turn (PyTorch first,
    then the others in the order they are measured) and fails the test if anything is measured once more."""
    left = list(seconds)

    def fake_time(fn):
        if not left:
            pytest.fail("a runtime was measured once more than expected")
        return left.pop(0), fn()

    return fake_time


@pytest.mark.parametrize("busy", ["cores held", "key being measured"])
def test_a_run_disturbed_at_its_start_measures_on_a_later_batch(em_crop, monkeypatch, busy):
    """A whole-stack run whose first batch comes while a preview holds the cores (or while another run measures the
    same shape) runs that batch on PyTorch without measuring, and measures on a later batch once the cores are free:
    a preview that overlaps a long run's start no longer costs it ONNX Runtime for the whole run. Its outputs then
    come from two runtimes, equal to a PyTorch run's to float rounding."""
    _only_onnx(monkeypatch)
    monkeypatch.setattr(auto, "_time", _timings(1.0, 0.5))  # ONNX Runtime "2x faster"
    lm, crop = tiny(), em_crop[:3, :64, :64]
    kw = dict(depth=2, tile=64, batch_size=1, precision="fp32", prob_dtype="float32")
    if busy == "cores held":
        holds: list = []
        other = threading.Thread(target=lambda: holds.append(hold_cores()))  # a preview, paused mid-run
        other.start()
        other.join(30)
        free = holds[0].release
    else:
        measuring = threading.Lock()
        measuring.acquire()  # another run is measuring this key

        class Busy(dict):
            def setdefault(self, key, default=None):
                return measuring

        monkeypatch.setattr(auto, "_MEASURING", Busy())
        free = measuring.release
    gen = predict_iter(crop, lm, **kw)
    next(gen)  # the first plane's one tile: PyTorch, nothing measured
    assert _saved() == {}
    free()
    got = _to_end(gen)
    assert got.runtime == "onnx" and "PyTorch ran the first 1 batch" in got.ran_on, got.ran_on
    (entry,) = _saved().values()
    assert entry["runtime"] == "onnx"
    ref = predict(crop, lm, runtime="torch", **kw)
    np.testing.assert_allclose(got.probabilities[2], ref.probabilities[2], atol=1e-5)


def test_a_saved_choice_is_used_while_another_run_holds_the_cores(em_crop, monkeypatch):
    """With a choice saved for the shape, a run that starts while another run holds the cores uses it: nothing is
    measured, so nothing needs the cores to itself."""
    _only_onnx(monkeypatch)
    monkeypatch.setattr(auto, "_time", _timings(1.0, 0.5))  # the one measurement
    lm, crop = tiny(), em_crop[:2, :64, :64]
    kw = dict(depth=2, tile=64, batch_size=1, precision="fp32")
    assert predict(crop, lm, **kw).runtime == "onnx"
    monkeypatch.setattr(choices, "_CHOICES", {})  # a new process: the file answers
    holds: list = []
    other = threading.Thread(target=lambda: holds.append(hold_cores()))
    other.start()
    other.join(30)
    try:
        again = predict(crop, lm, **kw)
    finally:
        holds[0].release()
    assert again.runtime == "onnx" and "another run" not in again.ran_on, again.ran_on


# --------------------------------------------------------------------- a failed runtime and the saved choice
class _OrtAsOpenVino:
    """An OpenVINO compiled model that runs the exported graph through ONNX Runtime (so the test needs no OpenVINO)
    and fails, like a broken plugin, while ``broken[0]`` is set; counts its inference calls."""

    def __init__(self, path: Path, broken: list[bool], calls: list[int]) -> None:
        self.session, self.broken, self.calls = ort_session(path), broken, calls

    def create_infer_request(self):
        model = self

        class Request:
            def infer(self, feeds):
                model.calls.append(len(feeds[0]))
                if model.broken[0]:
                    raise RuntimeError(NOT_OOM_MESSAGES[0])
                self.out = model.session.run(None, {"x": feeds[0]})[0]

            def get_output_tensor(self, i):
                return type("T", (), {"data": self.out})()

        return Request()

    def release_memory(self):
        pass


def test_a_runtime_failed_in_this_process_never_overwrites_the_saved_choice(em_crop, monkeypatch):
    """OpenVINO was measured fastest and saved; in a later process it fails on this model, so that process measures
    PyTorch against ONNX Runtime for the rest of its runs: that measurement serves this process only and never
    replaces the saved choice (the next process tries OpenVINO again, whose failure may have been this model's)."""
    _only_onnx(monkeypatch)
    monkeypatch.setattr(base, "openvino_available", lambda: None)
    broken, calls = [False], []
    monkeypatch.setattr(
        selection, "openvino_compiled", lambda loaded, path: OpenVinoModel(_OrtAsOpenVino(path, broken, calls))
    )
    # torch, ONNX Runtime, OpenVINO in the first process; torch, ONNX Runtime once OpenVINO failed
    monkeypatch.setattr(auto, "_time", _timings(1.0, 0.8, 0.5, 1.0, 0.5))
    lm, crop = tiny(), em_crop[:2, :64, :64]
    kw = dict(depth=2, tile=64, batch_size=1, precision="fp32")
    assert predict(crop, lm, **kw).runtime == "openvino"
    (key,) = _saved()
    assert _saved()[key]["runtime"] == "openvino"
    broken[0] = True
    monkeypatch.setattr(choices, "_CHOICES", {})  # a new process, in which OpenVINO fails on this model
    failed = predict(crop, lm, **kw)
    assert failed.runtime == "torch" and "OpenVINO failed" in failed.ran_on, failed.ran_on
    without = predict(crop, lm, **kw)  # measures PyTorch against ONNX Runtime
    assert without.runtime == "onnx" and "not saved" in without.ran_on, without.ran_on
    assert _saved()[key]["runtime"] == "openvino" and list(_saved()) == [key]
    n = len(calls)
    assert predict(crop, lm, **kw).runtime == "onnx" and len(calls) == n  # this process keeps its answer
    broken[0] = False
    monkeypatch.setattr(choices, "_CHOICES", {})  # the next process
    monkeypatch.setattr(failures, "_FAILED", {})
    assert predict(crop, lm, **kw).runtime == "openvino"


def test_a_runtime_failure_is_held_against_those_weights_only(em_crop, monkeypatch):
    """OpenVINO failing on one model is not tried again on that model and level in this process, but is on another
    model of the same architecture (a fine-tuned version): a failure can be the graph's, which the weights make."""
    compiled, calls = _fake_openvino(monkeypatch, RuntimeError(NOT_OOM_MESSAGES[0]))
    crop = em_crop[0, :64, :64]
    a, b = tiny(seed=0), tiny(seed=1)
    assert predict(crop, a, depth=2, precision="fp32").runtime == "torch" and calls == [1]
    assert predict(crop, a, depth=2, precision="fp32").runtime == "torch" and calls == [1]
    assert predict(crop, b, depth=2, precision="fp32").runtime == "torch" and calls == [1, 1]


# ------------------------------------------------------------------------------ fine-tuning on the CPU
def test_no_runtime_is_measured_while_a_cpu_fine_tune_trains(em_crop, em_crop_membrane, monkeypatch):
    """A fine-tune on the CPU holds the cores while it trains: a prediction of an unmeasured shape meanwhile (on
    another thread) runs PyTorch and saves no measurement of the contention; once fine-tuning ends, it measures."""
    from napari_unetpp.training import TrainingPair, fine_tune_iter

    _only_onnx(monkeypatch)
    decided = []
    real = auto.decide
    monkeypatch.setattr(auto, "decide", lambda *a: decided.append(a) or real(*a))
    lm, small = tiny(), em_crop[0, :48, :48]
    training = fine_tune_iter(
        tiny(seed=1),
        TrainingPair(em_crop[:, :96, :96], em_crop_membrane[:, :96, :96], slices=[0]),
        epochs=1,
        steps_per_epoch=3,
        batch_size=1,
        patch_size=64,
        small_patch_size=64,
        device="cpu",
        save=False,
    )
    try:
        assert next(p for p in training if p.phase == "train").step == 1  # paused between two training steps
        out: dict = {}
        other = threading.Thread(target=lambda: out.setdefault("r", predict(small, lm, depth=2, precision="fp32")))
        other.start()
        other.join(60)
        meanwhile = out["r"]
    finally:
        training.close()  # cancelled: the cores are free
    assert meanwhile.runtime == "torch" and "another run" in meanwhile.ran_on, meanwhile.ran_on
    assert decided == [] and _saved() == {}
    predict(small, lm, depth=2, precision="fp32")
    assert len(decided) == 1 and len(_saved()) == 1
