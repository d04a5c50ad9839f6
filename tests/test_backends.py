"""The runtime that runs the network (PyTorch, ONNX Runtime or OpenVINO): chosen by measurement, remembered, exact on
real EM and CT, falls back cleanly, and never reuses an export of other weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_unetpp import LoadedModel, UNetPlusPlus, predict
from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes import (
    NAMES,
    Choice,
    RuntimeUnavailable,
    auto,
    base,
    choices,
    choose,
    failures,
    memory,
    onnx_backend,
    openvino_available,
    release_later,
    release_pending,
)
from napari_unetpp.runtimes.int8 import cpu_has_vnni
from napari_unetpp.runtimes.onnx_backend import OnnxBackend
from napari_unetpp.runtimes.openvino_backend import OpenVinoBackend, OpenVinoModel

from .conftest import dice
from .conftest import tiny_loaded as tiny

# these tests count exports, corrupt caches and measure runtime choices: each gets a cache of its own, and
# runtime="auto" measures the runtimes as it does for users
pytestmark = [pytest.mark.runtimes, pytest.mark.usefixtures("own_cache")]

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
# the exported graph's runtimes: OpenVINO is tested where it is installed (the testing extra installs it)
RUNTIMES = ["onnx"] + (["openvino"] if openvino_available() is None else [])
INT8_RUNTIME = "openvino-int8" if cpu_has_vnni() and "openvino" in RUNTIMES else "onnx-int8"
MISSING = {
    "onnx": "onnxruntime is not installed (pip install onnx onnxruntime)",
    "openvino": "openvino is not installed (pip install onnx openvino)",
}


def only(monkeypatch, *runtimes: str) -> None:
    """Pretend that of the exported graph's runtimes only ``runtimes`` are installed."""
    monkeypatch.setattr(base, "onnx_available", lambda: None if "onnx" in runtimes else MISSING["onnx"])
    monkeypatch.setattr(base, "openvino_available", lambda: None if "openvino" in runtimes else MISSING["openvino"])


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test starts without this process's remembered choices and failed runtimes (the file lives in the test's
    own home)."""
    monkeypatch.setattr(choices, "_CHOICES", {})
    monkeypatch.setattr(failures, "_FAILED", {})


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_runtimes_agree_with_torch_on_real_em(em_model, em_crop, depth, runtime):
    """ONNX Runtime and OpenVINO fp32 against PyTorch fp32 on a real crop: probabilities to 1e-4, masks at Dice >=
    0.999, for every level's head (heads 1..k come from the same graph)."""
    crop = em_crop[:2]
    ref = predict(crop, em_model, depth=depth, levels="all", precision="fp32", runtime="torch", prob_dtype="float32")
    got = predict(crop, em_model, depth=depth, levels="all", precision="fp32", runtime=runtime, prob_dtype="float32")
    assert ref.runtime == "torch" and got.runtime == runtime and f"{NAMES[runtime]} fp32" in got.ran_on
    for lv in range(1, depth + 1):
        assert np.abs(ref.probabilities[lv] - got.probabilities[lv]).max() < 1e-4, lv
    assert dice(ref.mask, got.mask) >= 0.999


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_multiclass_and_cue_models_export(em_crop, runtime):
    """Softmax over classes and the cue channel come out of the graph as from PyTorch."""
    crop = em_crop[0, :64, :80]
    for lm in (tiny(num_classes=3), tiny(cue="distance")):
        kw = dict(levels="all", precision="fp32", prob_dtype="float32")
        ref, got = predict(crop, lm, runtime="torch", **kw), predict(crop, lm, runtime=runtime, **kw)
        np.testing.assert_allclose(got.probabilities[2], ref.probabilities[2], atol=1e-4)
        if lm.module.config.has_cue:
            np.testing.assert_allclose(got.cue, ref.cue, atol=1e-4)
        assert (got.mask != ref.mask).mean() < 1e-3  # an untrained net has values at 0.5 (ties at float rounding)


def test_auto_measures_once_remembers_and_runs_one_runtime(em_model, em_crop, monkeypatch):
    """The first auto run measures every runtime on its own first batch and saves the answer; the second reads it
    without measuring; each run's output comes whole from the chosen runtime (equal to a forced run of it)."""
    crop = em_crop[:3]
    decided = []
    real = auto.decide
    monkeypatch.setattr(auto, "decide", lambda *a: decided.append(a) or real(*a))
    first = predict(crop, em_model, depth=1, precision="fp32", batch_size=2, prob_dtype="float32")
    assert len(decided) == 1 and first.runtime in ("torch", *RUNTIMES)
    assert "PyTorch" in first.ran_on and "on this CPU at L1" in first.ran_on
    saved = json.loads((cache_dir() / "runtime_choices.json").read_text())
    (entry,) = saved.values()
    assert entry["runtime"] == first.runtime and entry["speedup"] > 0 and set(entry["x_torch"]) == set(RUNTIMES)
    forced = predict(
        crop, em_model, depth=1, precision="fp32", batch_size=2, prob_dtype="float32", runtime=first.runtime
    )
    np.testing.assert_array_equal(first.probabilities[1], forced.probabilities[1])
    monkeypatch.setattr(choices, "_CHOICES", {})  # a new process: the file answers
    again = predict(crop, em_model, depth=1, precision="fp32", batch_size=2)
    assert len(decided) == 1 and again.runtime == first.runtime


def test_auto_picks_the_faster_by_measurement(em_crop, monkeypatch):
    """The decision follows the measured times, both ways."""
    crop = em_crop[0, :64, :64]
    only(monkeypatch, "onnx")
    for t_torch, t_onnx, want in ((1.0, 0.5, "onnx"), (0.5, 1.0, "torch"), (1.0, 0.99, "torch")):
        monkeypatch.setattr(choices, "_CHOICES", {})
        (cache_dir() / "runtime_choices.json").unlink(missing_ok=True)
        times = iter([t_torch, t_onnx])
        monkeypatch.setattr(auto, "_time", lambda fn, _t=times: (next(_t), fn()))
        got = predict(crop, tiny(), precision="fp32")
        assert got.runtime == want, (t_torch, t_onnx)
        assert f"{t_torch / t_onnx:.2f}x" in got.ran_on


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="OpenVINO is not installed")
def test_auto_picks_the_fastest_of_three(em_crop, monkeypatch):
    """With OpenVINO installed too, the fastest of the three runs (measured in the order PyTorch, ONNX Runtime,
    OpenVINO), and another runtime still has to beat PyTorch by 3 %; the device line says the chosen one's speed."""
    crop = em_crop[0, :64, :64]
    for times, want in (((1.0, 0.6, 0.5), "openvino"), ((1.0, 0.5, 0.6), "onnx"), ((1.0, 1.2, 0.99), "torch")):
        monkeypatch.setattr(choices, "_CHOICES", {})
        (cache_dir() / "runtime_choices.json").unlink(missing_ok=True)
        it = iter(times)
        monkeypatch.setattr(auto, "_time", lambda fn, _t=it: (next(_t), fn()))
        got = predict(crop, tiny(), precision="fp32")
        assert got.runtime == want, times
        assert f"{1.0 / min(times[1:]):.2f}x" in got.ran_on


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="OpenVINO is not installed")
def test_a_runtime_that_fails_on_the_first_batch_is_left_out(em_crop, monkeypatch):
    """OpenVINO failing on the measuring batch: the others are measured without it, and the run completes; that
    measurement is not saved (the next process tries OpenVINO again: issue 28)."""

    def broken(self, x):
        raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported")

    monkeypatch.setattr(OpenVinoBackend, "__call__", broken)
    crop = em_crop[0, :64, :64]
    got = predict(crop, tiny(), precision="fp32")
    ref = predict(crop, tiny(), precision="fp32", runtime="torch")
    assert got.runtime in ("torch", "onnx")
    assert dice(got.mask, ref.mask) >= 0.999
    assert "without OpenVINO, which failed on this model: not saved" in got.ran_on, got.ran_on
    assert not (cache_dir() / "runtime_choices.json").exists()


def test_falls_back_to_torch_without_onnxruntime(em_crop, monkeypatch):
    only(monkeypatch)
    got = predict(em_crop[0, :64, :64], tiny(), precision="fp32")
    assert got.runtime == "torch" and "onnxruntime is not installed" in got.ran_on
    assert "openvino is not installed" in got.ran_on
    with pytest.raises(RuntimeUnavailable, match="not installed"):
        predict(em_crop[0, :64, :64], tiny(), precision="fp32", runtime="onnx")
    with pytest.raises(RuntimeUnavailable, match="OpenVINO cannot run: openvino is not installed"):
        predict(em_crop[0, :64, :64], tiny(), precision="fp32", runtime="openvino")
    with pytest.raises(RuntimeUnavailable, match="int8 needs ONNX Runtime"):
        predict(em_crop[0, :64, :64], tiny(), precision="int8")


def test_falls_back_to_torch_when_export_fails(em_crop, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    crop = em_crop[0, :64, :64]
    got = predict(crop, tiny(seed=5), precision="fp32")
    ref = predict(crop, tiny(seed=5), precision="fp32", runtime="torch")
    assert got.runtime == "torch" and "ONNX export failed" in got.ran_on
    np.testing.assert_array_equal(got.mask, ref.mask)
    assert not list((cache_dir() / "onnx").glob("*.onnx")) and not list((cache_dir() / "onnx").glob("*.tmp*"))
    for runtime in RUNTIMES:
        with pytest.raises(RuntimeUnavailable, match="ONNX export failed"):
            predict(crop, tiny(seed=5), precision="fp32", runtime=runtime)


def test_runtime_failure_mid_run_falls_back_to_torch(em_crop, monkeypatch):
    """An ONNX Runtime error during an auto run: PyTorch finishes the run, with the same result as a torch run."""
    crop = em_crop[:3, :64, :64]
    lm = tiny()
    only(monkeypatch, "onnx")
    times = iter([1.0, 0.1])  # onnx "measured" faster
    monkeypatch.setattr(auto, "_time", lambda fn: (next(times), fn()))
    calls = []
    real = OnnxBackend.__call__

    def flaky(self, x):
        calls.append(len(x))
        if len(calls) > 3:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a kernel failed")
        return real(self, x)

    monkeypatch.setattr(OnnxBackend, "__call__", flaky)
    got = predict(crop, lm, precision="fp32", batch_size=1)
    ref = predict(crop, lm, precision="fp32", batch_size=1, runtime="torch")
    assert got.runtime == "torch" and "ONNX Runtime failed" in got.ran_on and len(calls) == 4
    np.testing.assert_allclose(
        got.probabilities[2].astype(np.float32), ref.probabilities[2].astype(np.float32), atol=2e-3
    )


def test_onnx_out_of_memory_halves_the_batch(em_crop, monkeypatch):
    class Boom:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            if len(feeds["x"]) > 1:
                raise Exception("[ONNXRuntimeError] : 6 : Failed to allocate memory for requested buffer of size 1")
            return self.session.run(names, feeds)

        def get_inputs(self):
            return self.session.get_inputs()

    real = onnx_backend.ort_session
    monkeypatch.setattr(onnx_backend, "ort_session", lambda *a, **k: Boom(real(*a, **k)))
    crop = em_crop[:3, :64, :64]
    got = predict(crop, tiny(), precision="fp32", batch_size=4, runtime="onnx")
    ref = predict(crop, tiny(), precision="fp32", batch_size=1, runtime="onnx")
    np.testing.assert_array_equal(got.mask, ref.mask)


def test_export_cache_follows_the_weights(em_crop):
    """Changed weights get a new export (keyed by a hash of the parameters), so ONNX Runtime always runs the
    weights PyTorch has; the same weights reuse the file."""
    crop = em_crop[0, :64, :64]
    a = tiny(seed=1)
    pa = predict(crop, a, precision="fp32", runtime="onnx", prob_dtype="float32")
    files = sorted((cache_dir() / "onnx").glob("*.onnx"))
    assert len(files) == 1
    predict(crop, tiny(seed=1), precision="fp32", runtime="onnx")  # same weights, another object: same file
    assert sorted((cache_dir() / "onnx").glob("*.onnx")) == files
    b = tiny(seed=1)
    with torch.no_grad():
        b.module.heads["head_2"].weight.mul_(-1.0)  # weights changed (as fine-tuning does, before a new copy)
    pb = predict(crop, b, precision="fp32", runtime="onnx", prob_dtype="float32")
    tb = predict(crop, b, precision="fp32", runtime="torch", prob_dtype="float32")
    assert len(list((cache_dir() / "onnx").glob("*.onnx"))) == 2
    np.testing.assert_allclose(pb.probabilities[2], tb.probabilities[2], atol=1e-4)
    assert np.abs(pb.probabilities[2] - pa.probabilities[2]).max() > 0.01


def test_bf16_without_native_bf16_stays_on_torch(monkeypatch):
    """(On a CPU with native bf16, OpenVINO bf16 is a candidate too: tests/test_bf16_runtimes.py.)"""
    from napari_unetpp.runtimes import selection

    monkeypatch.setattr(selection, "cpu_supports_bf16", lambda: False)
    net = tiny().inference_module("cpu")
    c = choose(net, 2, torch.device("cpu"), precision="bf16")
    assert c.runtime == "torch" and c.precision == "bf16"
    for runtime in ("onnx", "openvino"):
        with pytest.raises(RuntimeUnavailable, match="fp32"):
            choose(net, 2, torch.device("cpu"), precision="bf16", runtime=runtime)
    with pytest.raises(ValueError, match="runtime must be"):
        choose(net, 2, torch.device("cpu"), runtime="tensorrt")


def test_int8_on_real_em_within_its_bound(em_model, em_crop, capfd):
    """The shipped model's int8 copy (quantised on first use from the calibration tiles shipped with it) keeps the
    mask at Dice >= 0.99 against fp32 on real EM it did not calibrate on; the device line says int8. Quantising
    prints nothing (ORT's percentile calibrator prints its progress), so a CLI run's output stays ours."""
    ref = predict(em_crop, em_model, depth=3, precision="fp32", runtime="torch")
    capfd.readouterr()
    q = predict(em_crop, em_model, depth=3, precision="int8")
    assert capfd.readouterr().out == ""
    assert q.runtime == INT8_RUNTIME and "int8" in q.ran_on
    assert dice(q.mask, ref.mask) >= 0.99
    bits = 8 if cpu_has_vnni() else 7  # the full 8 bits only where VNNI's int8 dot products do not saturate
    assert list((cache_dir() / "int8").glob(f"*-w{bits}-L3.onnx"))


def test_int8_runs_on_openvino_with_vnni_and_on_onnx_runtime_without(monkeypatch):
    from napari_unetpp.runtimes import selection

    net = tiny().inference_module("cpu")
    for vnni, want in ((True, "openvino-int8" if "openvino" in RUNTIMES else "onnx-int8"), (False, "onnx-int8")):
        monkeypatch.setattr(selection, "cpu_has_vnni", lambda v=vnni: v)
        c = choose(net, 2, torch.device("cpu"), precision="int8")
        assert (c.runtime, c.precision) == (want, "int8")


@pytest.mark.skipif("openvino" not in RUNTIMES, reason="OpenVINO is not installed")
def test_int8_goes_to_onnx_runtime_when_openvino_cannot_compile_it(em_model, em_crop, monkeypatch):
    from napari_unetpp.runtimes import selection

    def broken(loaded, path, precision="fp32"):
        raise RuntimeUnavailable("OpenVINO could not compile the graph (RuntimeError: unsupported)")

    monkeypatch.setattr(selection, "cpu_has_vnni", lambda: True)
    monkeypatch.setattr(selection, "openvino_compiled", broken)
    q = predict(em_crop[0, :64, :64], em_model, depth=1, precision="int8")
    assert q.runtime == "onnx-int8" and "OpenVINO could not compile it, so ONNX Runtime ran" in q.ran_on, q.ran_on


def test_int8_needs_a_calibration_and_models_save_theirs(em_crop, tmp_path):
    from napari_unetpp import load_model
    from napari_unetpp.model.card import ModelCard
    from napari_unetpp.model.files import calibration_path
    from napari_unetpp.model.registry import save_model
    from napari_unetpp.runtimes import calibration_tiles

    lm = tiny()
    with pytest.raises(RuntimeUnavailable, match="has no int8 calibration"):
        predict(em_crop[0, :64, :64], lm, precision="int8")
    x = em_crop.astype(np.float32)[:, None] / 255.0
    tiles = calibration_tiles(list(x), 48)
    assert tiles.shape == (8, 1, 48, 48) and tiles.dtype == np.float16
    card = save_model(lm.module, ModelCard(name="calibrated", architecture={}), calibration=tiles)
    back = load_model(card)
    assert calibration_path(back.path).is_file()
    np.testing.assert_array_equal(back.calibration, tiles)
    q = predict(em_crop[0, :64, :64], back, precision="int8")
    assert q.runtime == INT8_RUNTIME and q.mask.shape == (64, 64)


class _Timers:
    """Stands in for ``threading.Timer`` in :func:`~napari_unetpp.runtimes.memory.release_later`: a timer fires when
    the test says so, never by the clock (a loaded CI machine cannot make a test late)."""

    def __init__(self) -> None:
        self.made: list[_Timers.Timer] = []

    def __call__(self, interval, function, args=()):
        timer = self.Timer(interval, function, args)
        self.made.append(timer)
        return timer

    class Timer:
        def __init__(self, interval, function, args) -> None:
            self.interval, self.function, self.args = interval, function, args
            self.daemon = self.started = self.cancelled = self.fired = False

        def start(self) -> None:
            self.started = True

        def cancel(self) -> None:
            self.cancelled = True

        def fire(self) -> None:
            """Come due (a cancelled threading.Timer never calls its function)."""
            assert self.started and not self.fired
            self.fired = True
            if not self.cancelled:
                self.function(*self.args)

    @property
    def live(self) -> list[Timer]:
        """The timers waiting to come due."""
        return [t for t in self.made if t.started and not t.cancelled and not t.fired]


@pytest.fixture
def timers(monkeypatch) -> _Timers:
    fake = _Timers()
    monkeypatch.setattr(memory, "_timer", fake)
    return fake


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_memory_released_a_moment_after_large_runs(em_crop, monkeypatch, runtime, timers):
    """ONNX Runtime's arena and OpenVINO's buffers are kept after a single small tile (a slider preview, which they
    make faster) and given back a moment after a run larger than one 512^2 tile (a stack, a big image); a run within
    that moment keeps them (the next file of a batch skips the allocation), and releasing keeps results."""
    cls = OnnxBackend if runtime == "onnx" else OpenVinoBackend
    released = []
    real = cls.release
    monkeypatch.setattr(cls, "release", lambda self: released.append(1) or real(self))
    lm = tiny()
    small = predict(em_crop[0, :64, :64], lm, precision="fp32", runtime=runtime)
    assert timers.made == []  # a single small tile keeps its memory
    big = np.tile(em_crop[:, :64, :64], (1, 9, 9))  # 3 planes of 576^2
    first = predict(big, lm, precision="fp32", runtime=runtime, prob_dtype="float32")
    (wait,) = timers.live
    assert wait.interval == memory.RELEASE_AFTER_S
    again = predict(big, lm, precision="fp32", runtime=runtime, prob_dtype="float32")
    assert wait.cancelled and len(timers.live) == 1  # the second run came within the moment: it restarted the wait
    wait.function(*wait.args)  # a restarted timer that fires all the same (it lost the race to cancel) does nothing
    assert released == []
    timers.live[0].fire()
    assert released == [1] and not memory._pending  # once, for both runs
    after = predict(big, lm, precision="fp32", runtime=runtime, prob_dtype="float32")
    for other in (again, after):
        np.testing.assert_array_equal(first.probabilities[2], other.probabilities[2])
    assert small.runtime == runtime
    release_pending()  # training gives it back at once
    assert released == [1, 1] and not memory._pending and timers.live == []


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("kw", [{}, {"upsample": "linear"}])
def test_3d_anisotropic_models_on_real_ct(kw, runtime):
    """A 3D model with anisotropic pooling (as CT models are built) through ONNX Runtime or OpenVINO agrees with
    PyTorch on a real CT crop of odd size."""
    import tifffile

    from napari_unetpp.export.bioimageio import SAMPLES
    from napari_unetpp.model.config import anisotropic_pool

    ct = tifffile.imread(SAMPLES / "ct_abdomen.tif")[:, 200:237, 180:221].astype(np.float32)  # 37 x 41 in-plane
    torch.manual_seed(0)
    net = UNetPlusPlus(
        spatial_dims=3, features=(4, 8, 8, 8), norm="batch", pool=anisotropic_pool((2.0, 0.98, 0.98), 3), **kw
    )
    lm = LoadedModel.from_module(net.eval())
    opts = dict(axes="ZYX", precision="fp32", levels="all", prob_dtype="float32")
    ref, got = predict(ct, lm, runtime="torch", **opts), predict(ct, lm, runtime=runtime, **opts)
    assert got.runtime == runtime and got.mask.shape == ct.shape
    for lv in ref.probabilities:
        assert np.abs(ref.probabilities[lv] - got.probabilities[lv]).max() < 1e-4, lv


def test_openvino_memory_is_not_released_while_another_run_infers(timers):
    """A slider preview can run beside a whole-stack run on the same compiled model: the release at the end of one
    run waits for a moment when no request is inferring (OpenVINO's release_memory must not overlap inference)."""
    import threading

    started, go, released = threading.Event(), threading.Event(), []

    class Request:
        def infer(self, feeds):
            started.set()
            go.wait(10)

        def get_output_tensor(self, i):
            return type("T", (), {"data": np.zeros((1, 1, 1, 8, 8), np.float32)})()

    class Compiled:
        def create_infer_request(self):
            return Request()

        def release_memory(self):
            released.append(1)

    model = OpenVinoModel(Compiled())
    stack, preview = (OpenVinoBackend(model, Choice("openvino", "fp32", "")) for _ in range(2))
    t = threading.Thread(target=stack, args=(np.zeros((1, 1, 8, 8), np.float32),))
    t.start()
    assert started.wait(10)
    assert preview.release() is False  # the stack run is inferring: nothing is released
    assert released == [] and model.running == 1
    release_later(preview, 0.05)
    (due,) = timers.live
    due.fire()  # it comes due while the stack run is inferring ...
    assert released == []
    (retry,) = timers.live  # ... and waits again, never sooner than a second (or it would spin)
    assert retry is not due and retry.interval == 1.0
    go.set()
    t.join(10)
    assert model.running == 0
    retry.fire()
    assert released == [1] and not memory._pending and timers.live == []
