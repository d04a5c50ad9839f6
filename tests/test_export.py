"""bioimage.io export: a pruned level per package, validated and test-run offline by bioimageio.core."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import yaml

from napari_unetpp.cli.app import main
from napari_unetpp.export.bioimageio import ExportError, export_bioimageio, exported_network

bioimageio_core = pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")


def _test_run(source) -> dict:
    """bioimageio.core's own test of a package (offline): every check's status.

    The objects alive before it are frozen out of the garbage collector's scans meanwhile: bioimageio.core collects
    garbage six times per package as it unloads each weights format, and over this process's heap (torch, the
    models, the test session) that was three quarters of its time."""
    import gc

    gc.freeze()
    try:
        summary = bioimageio_core.test_model(str(source))
    finally:
        gc.unfreeze()
    return {"status": summary.status, "failed": [d.name for d in summary.details if d.status == "failed"]}


@pytest.mark.slow
def test_every_level_exports_and_reproduces_predict(tmp_path, em_model, em_crop):
    """L1..L4 of the shipped EM model: each package holds only its sub-network's parameters, validates, and
    bioimageio.core reproduces the test output (our predict) with TorchScript and ONNX weights."""
    sizes = []
    for k in range(1, em_model.max_depth + 1):
        res = export_bioimageio(em_model, tmp_path / f"em-L{k}", depth=k, sample=em_crop[0], size=128)
        run = _test_run(tmp_path / f"em-L{k}" / "rdf.yaml")
        assert run["status"] == "passed", run
        assert max(res.max_abs_difference.values()) < 1e-4
        assert res.parameters == sum(p.numel() for p in em_model.module.pruned(k).parameters())
        rdf = yaml.safe_load((tmp_path / f"em-L{k}" / "rdf.yaml").read_text())
        assert rdf["format_version"].startswith("0.5") and set(rdf["weights"]) == {"torchscript", "onnx"}
        assert rdf["config"]["napari-unetpp"]["depth"] == k
        assert "scale_range" in [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
        sizes.append(res.parameters)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 4  # L1 carries a fraction of L4's parameters


def test_exported_network_is_head_k_of_the_full_network(em_model, em_crop):
    import torch

    x = torch.from_numpy((em_crop[:1, :64, :64].astype(np.float32) - 128) / 64)[None]
    with torch.inference_mode():
        full = em_model.module.eval()(x, depth=2)[-1]
        np.testing.assert_allclose(exported_network(em_model, 2)(x).numpy(), torch.sigmoid(full).numpy(), atol=1e-5)


def test_cli_export_zip_of_a_cue_model_and_its_errors(tmp_path, capsys):
    out = tmp_path / "nuclei.zip"
    assert main(["export", "nuclei-objects", "--depth", "1", "-o", str(out), "-q"]) == 0
    assert "bioimage.io package of nuclei-objects@v1 at L1" in capsys.readouterr().out
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy"} <= names
    assert len(rdf["outputs"][0]["axes"][1]["channel_names"]) == 1  # the class; the cue is not exported
    assert _test_run(out)["status"] == "passed"
    assert not list(tmp_path.glob(".*partial*"))
    # one sentence for what cannot be exported
    assert main(["export", "em-membranes", "--depth", "7", "-o", str(tmp_path / "x.zip")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_bioimageio("em-membranes", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_ct_model_exports_its_hounsfield_window_as_preprocessing(tmp_path):
    """A fresh CT network (soft-tissue window): the window becomes scale_linear + clip, and the package test-runs."""
    import tifffile

    from napari_unetpp.export.bioimageio import SAMPLES
    from napari_unetpp.model.modalities import new_model

    ct = tifffile.imread(SAMPLES / "ct_abdomen.tif")[3]
    export_bioimageio(new_model("ct", classes=["liver"], name="ct-test"), tmp_path / "ct", depth=2, sample=ct)
    rdf = yaml.safe_load((tmp_path / "ct" / "rdf.yaml").read_text())
    ids = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    assert "scale_linear" in ids and "clip" in ids and "scale_range" not in ids
    assert _test_run(tmp_path / "ct" / "rdf.yaml")["status"] == "passed"


def _fail(message):
    def boom(*a, **k):
        raise RuntimeError(message)

    return boom


@pytest.mark.parametrize("stage", ["torchscript", "onnx"])
def test_a_failing_trace_or_onnx_export_is_one_sentence_and_writes_nothing(tmp_path, monkeypatch, capsys, stage):
    import torch

    long = "Exporting the operator 'aten::foo' to ONNX opset version 17 is not supported.\n  File x, line 1\n..."
    if stage == "torchscript":
        monkeypatch.setattr(torch.jit, "trace", _fail("Tracer cannot infer type of output\nmore detail"))
    else:
        monkeypatch.setattr(torch.onnx, "export", _fail(long))
    out = tmp_path / "em.zip"
    assert main(["export", "em-membranes", "--depth", "1", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-unetpp: error:") and len(err.splitlines()) == 1, err
    assert ("TorchScript" if stage == "torchscript" else "ONNX") in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_a_failed_write_leaves_no_partial_package(tmp_path, monkeypatch, kind):
    """The disk fills while the package is written: no `.partial` file, no half-written folder, one sentence."""
    import bioimageio.spec

    def half(descr, output_path, **kw):
        p = __import__("pathlib").Path(output_path)
        if kind == "zip":
            p.write_bytes(b"PK\x03\x04 half a zip")
        else:
            p.mkdir(parents=True, exist_ok=True)
            (p / "rdf.yaml").write_text("half")
        raise OSError(28, "No space left on device")

    name = "save_bioimageio_package" if kind == "zip" else "save_bioimageio_package_as_folder"
    monkeypatch.setattr(bioimageio.spec, name, half)
    out = tmp_path / ("em.zip" if kind == "zip" else "em")
    if kind == "folder":
        out.mkdir()  # an empty folder the user made for it stays as it was
    with pytest.raises(ExportError, match="No space left on device"):
        export_bioimageio("em-membranes", out, depth=1, size=64)
    assert [p.name for p in tmp_path.iterdir()] == ([] if kind == "zip" else ["em"])
    if kind == "folder":
        assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_the_package_is_written_as_its_partial_name_and_a_killed_exports_partial_goes(tmp_path, kind):
    """The package is written as ``.<name>.partial`` beside it, and what a killed export left under that name (a
    file or a folder) is removed first."""
    from napari_unetpp.export.bioimageio import _write_package

    out = tmp_path / ("em.zip" if kind == "zip" else "em")
    left = tmp_path / f".{out.name}.partial"
    left.mkdir()
    (left / "rdf.yaml").write_text("a killed export's")
    seen = []

    def save(descr, output_path):
        seen.append((output_path.name, output_path.exists()))
        if kind == "zip":
            output_path.write_bytes(b"PK package")
        else:
            output_path.mkdir()
            (output_path / "rdf.yaml").write_text(descr)

    _write_package("the package", out, save, save)
    assert seen == [(left.name, False)] and not left.exists()
    assert (out.read_bytes() == b"PK package") if kind == "zip" else (out / "rdf.yaml").read_text() == "the package"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_the_package_network_of_a_cue_model_never_computes_the_cue():
    """A cue model's package network runs head k alone: the cue's convolution is not traced and sliced off."""
    import types

    import torch

    from napari_unetpp.model.network import UNetPlusPlus

    torch.manual_seed(0)
    net = UNetPlusPlus(features=(4, 8), cue="distance").eval()
    exp = exported_network(types.SimpleNamespace(module=net), 1)
    calls = []
    exp.net.cue.register_forward_hook(lambda *a: calls.append(a))
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        y = exp(x)
        want = torch.sigmoid(net(x, depth=1)[-1])
    assert not calls and y.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(y.numpy(), want.numpy(), atol=1e-6)


def test_the_cover_shows_the_probabilities_of_one_class_and_predicts_mask_of_several(tmp_path):
    from imageio.v3 import imread

    from napari_unetpp.export.description import cover_image
    from napari_unetpp.inference.masks import mask_from

    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 8, 10)).astype(np.float32)
    logits = rng.normal(size=(1, 3, 8, 10))
    y = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    for out, shown in [(y, mask_from(y[0], 3) / 2), (y[:, :1], y[0, 0])]:
        cover_image(x, out, tmp_path / "cover.png")
        right = imread(tmp_path / "cover.png")[:, 10:, 0]  # the output half, red channel
        np.testing.assert_array_equal(right, (np.clip(shown, 0, 1) * 255).astype(np.uint8))
