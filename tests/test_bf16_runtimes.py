"""bf16 on the CPU: OpenVINO bf16 (its first convolution in fp32) beside PyTorch's bf16 autocast in the measured
choice wherever bf16 is allowed, within its bound on real EM at every level, remembered apart from fp32 choices, and
``fp32`` still exact. The choice tests pretend the CPU has native bf16 (or has not), so they run on any CPU; the
accuracy tests run OpenVINO's bf16 where the CPU has it (elsewhere OpenVINO computes that graph in fp32, and the cut
graph must then equal the whole one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_unetpp import predict
from napari_unetpp.paths import cache_dir
from napari_unetpp.runtimes import (
    Choice,
    RuntimeUnavailable,
    auto,
    choices,
    choose,
    cpu_supports_bf16,
    device,
    failures,
    make_backend,
    onnx_graph,
    selection,
)
from napari_unetpp.runtimes.openvino_backend import (
    OpenVinoBackend,
    OpenVinoModel,
    openvino_compiled,
    split_first_convolution,
)

from .conftest import dice
from .conftest import tiny_loaded as tiny

pytestmark = [pytest.mark.runtimes, pytest.mark.bf16, pytest.mark.usefixtures("own_cache")]
pytest.importorskip("openvino")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(choices, "_CHOICES", {})
    monkeypatch.setattr(failures, "_FAILED", {})


def native_bf16(monkeypatch, native: bool) -> None:
    """Pretend the CPU has (or has not) native bf16, for the choice and for precision "auto"."""
    monkeypatch.setattr(selection, "cpu_supports_bf16", lambda: native)
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: native)


def test_bf16_allowed_on_a_native_cpu_measures_openvino_bf16_beside_pytorch_bf16(monkeypatch):
    native_bf16(monkeypatch, True)
    net = tiny().inference_module("cpu")
    for precision in ("auto", "bf16"):
        c = choose(net, 2, CPU, precision=precision)
        assert (c.runtime, c.precision) == ("auto", "bf16")
    assert selection._usable(net, 2, "bf16")[0] == ["openvino", "openvino-bf16"]  # ONNX Runtime: not with OpenVINO
    c = choose(net, 2, CPU, precision="fp32")  # fp32 means exact: fp32 candidates only
    assert (c.runtime, c.precision) == ("auto", "fp32") and "openvino-bf16" not in selection._usable(net, 2)[0]
    assert choose(net, 2, CPU, precision="auto", runtime="openvino") == Choice("openvino-bf16", "bf16", "asked")
    assert choose(net, 2, CPU, precision="fp32", runtime="openvino") == Choice("openvino", "fp32", "asked")
    assert choose(net, 2, CPU, precision="auto", runtime="torch").precision == "bf16"
    with pytest.raises(RuntimeUnavailable, match="ONNX Runtime path runs in fp32"):
        choose(net, 2, CPU, precision="bf16", runtime="onnx")


def test_without_native_bf16_bf16_stays_on_pytorch(monkeypatch):
    native_bf16(monkeypatch, False)
    net = tiny().inference_module("cpu")
    assert choose(net, 2, CPU, precision="auto").precision == "fp32"  # auto: fp32 where bf16 is emulated
    c = choose(net, 2, CPU, precision="bf16")
    assert (c.runtime, c.precision) == ("torch", "bf16")
    for runtime in ("onnx", "openvino"):
        with pytest.raises(RuntimeUnavailable, match="use --precision fp32"):
            choose(net, 2, CPU, precision="bf16", runtime=runtime)


def test_a_bf16_measurement_is_remembered_apart_from_the_fp32_one(em_crop, monkeypatch):
    """The fastest of PyTorch bf16, OpenVINO fp32 and OpenVINO bf16 runs, named with its precision; the saved entry
    says the precision, under a key of its own: an fp32 run measures again and never picks a bf16 runtime."""
    native_bf16(monkeypatch, True)
    crop = em_crop[0, :64, :64]
    times = iter([1.0, 0.8, 0.5, 1.0, 0.6, 0.7])  # bf16 run: torch, openvino, openvino-bf16; then fp32: torch, ...
    monkeypatch.setattr(auto, "_time", lambda fn: (next(times), fn()))
    got = predict(crop, tiny(), precision="auto")
    assert got.runtime == "openvino-bf16" and "OpenVINO bf16 (2.00x PyTorch bf16 on this CPU at L2" in got.ran_on
    exact = predict(crop, tiny(), precision="fp32")  # fp32: torch 1.0, onnx 0.6, openvino 0.7
    assert exact.runtime == "onnx" and "ONNX Runtime fp32 (1.67x PyTorch on this CPU" in exact.ran_on, exact.ran_on
    saved = json.loads((cache_dir() / "runtime_choices.json").read_text())
    assert len(saved) == 2
    by_precision = {v["precision"]: v for v in saved.values()}
    assert by_precision["bf16"]["runtime"] == "openvino-bf16"
    assert set(by_precision["bf16"]["x_torch"]) == {"openvino", "openvino-bf16"}
    assert by_precision["fp32"]["runtime"] == exact.runtime
    monkeypatch.setattr(choices, "_CHOICES", {})  # a new process reads both from the file
    c = choose(tiny().inference_module("cpu"), 2, CPU, precision="auto", tile=(64, 64), batch=1)
    assert (c.runtime, c.precision) == ("openvino-bf16", "bf16")


def test_a_bf16_run_whose_openvino_fails_goes_on_in_pytorch_bf16(em_crop, monkeypatch):
    native_bf16(monkeypatch, True)
    crop = em_crop[0, :64, :64]
    times = iter([1.0, 0.8, 0.5])
    monkeypatch.setattr(auto, "_time", lambda fn: (next(times), fn()))
    real_call = OpenVinoBackend.__call__
    assert predict(crop, tiny(), precision="auto").runtime == "openvino-bf16"

    def broken(self, x):
        raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported")

    monkeypatch.setattr(OpenVinoBackend, "__call__", broken)
    got = predict(crop, tiny(), precision="auto")
    assert got.runtime == "torch" and "PyTorch bf16 (OpenVINO failed" in got.ran_on, got.ran_on
    assert set(failures.failed_here(tiny().inference_module("cpu"), 2)) == {"openvino-bf16"}  # fp32 not banned
    # an fp32 measurement afterwards is still saved: OpenVINO bf16's failure is not one of its candidates
    monkeypatch.setattr(OpenVinoBackend, "__call__", real_call)
    times = iter([1.0, 0.9, 0.5])  # torch, onnx, openvino (fp32)
    exact = predict(crop, tiny(), precision="fp32")
    assert exact.runtime == "openvino" and "not saved" not in exact.ran_on, exact.ran_on
    saved = json.loads((cache_dir() / "runtime_choices.json").read_text())
    assert sorted(v["runtime"] for v in saved.values()) == ["openvino", "openvino-bf16"]


@pytest.mark.parametrize("depth", [1, 4])
def test_the_graph_cut_after_its_first_convolution_computes_the_same(em_model, em_crop, depth):
    """Both parts of the cut graph compiled in fp32 equal PyTorch fp32 on a real crop to 1e-4 (the cut loses
    nothing and the head's output reaches the rest), on any CPU; the rest no longer reads the image."""
    import openvino as ov

    net = em_model.inference_module("cpu")
    core = ov.Core()
    head, rest = split_first_convolution(core.read_model(str(onnx_graph(net, depth))))
    assert [p.get_friendly_name() for p in rest.get_parameters()] == ["first_conv"]
    fp32 = {"INFERENCE_PRECISION_HINT": "f32"}
    model = OpenVinoModel(core.compile_model(rest, "CPU", fp32), core.compile_model(head, "CPU", fp32))
    backend = OpenVinoBackend(model, Choice("openvino", "fp32", "test"))
    ref = predict(em_crop, em_model, depth=depth, precision="fp32", runtime="torch", prob_dtype="float32")
    got = predict(em_crop, em_model, depth=depth, predictor=backend, prob_dtype="float32")
    assert np.abs(got.probabilities[depth] - ref.probabilities[depth]).max() < 1e-4


@pytest.mark.skipif(not cpu_supports_bf16(), reason="OpenVINO computes bf16 only on CPUs with native bf16")
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_openvino_bf16_on_real_em_within_its_bound(em_model, em_crop, depth):
    """OpenVINO's bf16 graph, cut after its first convolution (which runs in fp32), against PyTorch fp32 on a real
    crop at odd size: masks at Dice >= 0.998, probabilities within bf16's rounding (not equal: bf16 did run)."""
    net = em_model.inference_module("cpu")
    model = openvino_compiled(None, onnx_graph(net, depth), "bf16")
    assert model.head is not None  # the first convolution was cut out, to run in fp32
    ref = predict(em_crop, em_model, depth=depth, precision="fp32", runtime="torch", prob_dtype="float32")
    backend = OpenVinoBackend(model, Choice("openvino-bf16", "bf16", "asked"))
    got = predict(em_crop, em_model, depth=depth, predictor=backend, prob_dtype="float32")
    assert dice(got.mask, ref.mask) >= 0.998, depth
    err = np.abs(got.probabilities[depth] - ref.probabilities[depth])
    assert 1e-4 < err.max() < 0.2 and err.mean() < 5e-3, (err.max(), err.mean())


def test_compiled_models_are_kept_per_precision(em_model):
    """fp32 and bf16 compile apart (one must never answer for the other), each once per model."""
    net = em_model.inference_module("cpu")
    path = onnx_graph(net, 1)
    fp32, bf16 = openvino_compiled(em_model, path, "fp32"), openvino_compiled(em_model, path, "bf16")
    assert fp32 is not bf16 and fp32.head is None and bf16.head is not None
    assert openvino_compiled(em_model, path, "bf16") is bf16


def test_split_runs_keep_the_runtime_and_the_precision(monkeypatch):
    """A run split into blocks passes on what the whole run chose, runtime and precision together."""
    native_bf16(monkeypatch, True)
    lm = tiny()
    net = lm.inference_module("cpu")
    times = iter([1.0, 0.8, 0.5])
    monkeypatch.setattr(auto, "_time", lambda fn: (next(times), fn()))
    assert selection.resolve_runtime(lm, net, 2, CPU, "auto", (64, 64)) == ("openvino", "bf16")
    backend = make_backend(lm, net, 2, CPU, "bf16", (64, 64), "openvino")
    assert backend.choice.runtime == "openvino-bf16" and backend.choice.precision == "bf16"


def test_pytorch_fp32_still_wins_ties_in_fp32(em_crop, monkeypatch):
    """On a bf16 CPU, an fp32 run measures OpenVINO fp32 alone beside PyTorch (no bf16 candidate), and a tie stays
    with PyTorch, saved under the fp32 key."""
    native_bf16(monkeypatch, True)
    times = iter([1.0, 0.99])
    monkeypatch.setattr(selection, "installed", lambda: {"onnx": "not here", "openvino": None})
    monkeypatch.setattr(auto, "_time", lambda fn: (next(times), fn()))
    got = predict(em_crop[0, :64, :64], tiny(), precision="fp32")
    assert got.runtime == "torch" and got.ran_on.startswith("CPU · PyTorch fp32 (OpenVINO 1.01x, not faster")
    ((key, entry),) = json.loads((cache_dir() / "runtime_choices.json").read_text()).items()
    assert "precision=" not in key and entry["precision"] == "fp32" and set(entry["x_torch"]) == {"openvino"}
