"""OME-Zarr in and out (lazy, chunked, atomic, bounded memory) and pixel size (resampling to the model's scale)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unetpp.cli.app import main
from napari_unetpp.data.scale import zoom_for
from napari_unetpp.errors import ReadError
from napari_unetpp.inference.predict import predict
from napari_unetpp.io.images import read_image, write_image
from napari_unetpp.io.zarr import ArrayView, OmeZarrOutputs

zarr = pytest.importorskip("zarr")
SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"


# ---------------------------------------------------------------------------------------------------- OME-Zarr
def test_ome_zarr_round_trip_keeps_axes_scale_and_unit(tmp_path, em_crop):
    p = write_image(tmp_path / "em.zarr", em_crop, "ZYX", {"Z": 0.05, "Y": 0.004, "X": 0.004}, units="um")
    img = read_image(p)
    assert img.axes == "ZYX" and img.units == "um"
    assert img.scale == pytest.approx({"Z": 0.05, "Y": 0.004, "X": 0.004})
    assert type(img.data).__module__.startswith("dask")  # lazy
    np.testing.assert_array_equal(np.asarray(img.data), em_crop)
    attrs = json.loads((p / ".zattrs").read_text())["multiscales"][0]
    assert attrs["version"] == "0.4" and [a["name"] for a in attrs["axes"]] == ["z", "y", "x"]
    assert attrs["axes"][1]["unit"] == "micrometer"


def test_reads_ngff_05_on_zarr_v3_with_its_finest_level(tmp_path, em_crop):
    g = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w", zarr_format=3)
    g.create_array("s0", shape=em_crop.shape, dtype="uint8", chunks=(1, 64, 64))[...] = em_crop
    g.create_array("s1", shape=(3, 80, 93), dtype="uint8", chunks=(1, 64, 64))
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    scale0 = {"type": "scale", "scale": [50.0, 4.0, 4.0]}
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": axes,
                "datasets": [
                    {"path": "s0", "coordinateTransformations": [scale0]},
                    {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 8.0, 8.0]}]},
                ],
            }
        ],
    }
    img = read_image(tmp_path / "v3.zarr")
    assert img.axes == "ZYX" and img.units == "nm" and img.scale == {"Z": 50.0, "Y": 4.0, "X": 4.0}
    np.testing.assert_array_equal(np.asarray(img.data), em_crop)


def test_bad_zarr_inputs_say_one_sentence(tmp_path):
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=2)
    with pytest.raises(ReadError, match="holds no arrays"):
        read_image(tmp_path / "empty.zarr")
    with pytest.raises(ReadError, match="no such zarr store"):
        read_image(tmp_path / "missing.zarr")
    assert main(["predict", str(tmp_path / "empty.zarr"), "-o", str(tmp_path / "m.tif")]) == 2


def test_array_view_writes_like_numpy(tmp_path):
    ref = np.zeros((3, 4, 5, 6), np.int32)
    tgt = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=ref.shape, dtype="int32", chunks=(1, 2, 3, 3))
    view, nv = ArrayView(tgt), ref
    rng = np.random.default_rng(0)
    for order in ([0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1]):
        v, n = view.transpose(order), nv.transpose(order)
        assert v.shape == n.shape
        vals = rng.integers(0, 100, size=n[1][1:3].shape)
        v[1][1:3] = vals
        n[1][1:3] = vals
        sub = rng.integers(0, 100, size=n[(slice(None), 0)][:, 1:].shape)
        v[(slice(None), 0)][:, 1:] = sub
        n[(slice(None), 0)][:, 1:] = sub
        np.testing.assert_array_equal(np.asarray(tgt), ref)
        np.testing.assert_array_equal(np.asarray(v[2]), n[2])
    with pytest.raises(IndexError):
        view[::2]


def test_prediction_written_into_zarr_equals_the_in_memory_one(tmp_path, em_model, em_crop):
    ref = predict(em_crop, em_model, depth=2, levels="all", tile=96, objects="components", precision="fp32")
    out = OmeZarrOutputs(tmp_path / "m.zarr", "ZYX", publish={"mask": "", "L1": "_L1", "objects": "_objects"})
    res = predict(
        em_crop, em_model, depth=2, levels="all", tile=96, objects="components", precision="fp32", allocate=out
    )
    assert res.objects_count == ref.objects_count > 0
    written = out.publish()
    assert [p.name for p in written] == ["m.zarr", "m_L1.zarr", "m_objects.zarr"]
    assert not list(tmp_path.glob(".*partial"))  # scratch arrays (L2, cue ...) went with the temporary folder
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "m.zarr").data), ref.mask)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "m_L1.zarr").data), ref.probabilities[1])
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "m_objects.zarr").data), ref.objects)


def test_cli_zarr_to_zarr_equals_tiff_and_a_failed_run_keeps_the_old_output(tmp_path, em_crop):
    src = write_image(tmp_path / "em.zarr", em_crop, "ZYX")
    tif = tmp_path / "em.tif"
    tifffile.imwrite(tif, em_crop, photometric="minisblack")
    assert main(["predict", str(src), "-o", str(tmp_path / "m.zarr"), "--depth", "1", "--all-levels", "-q"]) == 0
    assert main(["predict", str(tif), "-o", str(tmp_path / "m.tif"), "--depth", "1", "-q"]) == 0
    z = np.asarray(read_image(tmp_path / "m.zarr").data)
    np.testing.assert_array_equal(z, tifffile.imread(tmp_path / "m.tif"))
    assert read_image(tmp_path / "m_L1.zarr").data.dtype == np.float16
    # a run that fails half-way (NaN in the last slice) leaves the previous output as it was, and no partial folder
    bad = em_crop.astype(np.float32)
    bad[-1, 5, 5] = np.nan
    write_image(tmp_path / "bad.zarr", bad, "ZYX")
    assert main(["predict", str(tmp_path / "bad.zarr"), "-o", str(tmp_path / "m.zarr"), "--depth", "1", "-q"]) == 2
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "m.zarr").data), z)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from napari_unetpp.cli.app import main

    for args in json.loads(sys.argv[1]):  # one process: the imports and the first run's set-up are paid once
        if main(args) != 0:
            sys.exit(1)
        with open("/proc/self/status") as f:
            print("PEAK", next(line for line in f if line.startswith("VmHWM:")).split()[1])  # kB
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the next run's peak starts from what the process holds now
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_zarr_output_runs_in_bounded_memory(tmp_path):
    """A 24 x 1024 x 1024 stack whose outputs (mask, two float16 levels and their float16 ensemble: 168 MB) would
    show in the peak memory goes through with about the memory of a 2-slice stack: nothing is held whole. The runs
    share one process (a first 2-slice run warms it up; the peak is reset before each measured run) and PyTorch, so
    neither measures (and loads) the other runtimes."""
    import json

    import torch

    from napari_unetpp.model.loaded import LoadedModel
    from napari_unetpp.model.network import UNetPlusPlus
    from napari_unetpp.model.registry import save_model

    torch.manual_seed(0)
    lm = LoadedModel.from_module(UNetPlusPlus(features=(4, 8, 16)), name="tiny-mem")
    card = save_model(lm.module, lm.card, directory=tmp_path)
    rng = np.random.default_rng(0)
    for name, n in (("small", 2), ("big", 24)):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=2)
        arr = g.create_array("0", shape=(n, 1024, 1024), dtype="uint8", chunks=(1, 1024, 1024))
        for i in range(n):
            arr[i] = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
    runs = [
        ["predict", str(tmp_path / f"{name}.zarr"), "-o", str(tmp_path / f"{name}-{i}-mask.zarr"), "--model", str(card)]
        + ["--all-levels", "--ensemble", "-q", "--precision", "fp32", "--runtime", "torch"]
        for i, name in enumerate(("small", "small", "big"))
    ]
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(runs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _, small, big = (int(line.split()[1]) / 1024 for line in r.stdout.splitlines() if line.startswith("PEAK"))  # MB
    out = read_image(tmp_path / "big-2-mask_ensemble.zarr").data
    assert out.shape == (24, 1024, 1024) and read_image(tmp_path / "big-2-mask_L2.zarr").data.shape == out.shape
    outputs_mb = 24 * 2**20 * (1 + 2 + 2 + 2) / 2**20
    print(f"peak RSS MB: 2 slices {small:.0f}, 24 slices {big:.0f}; outputs {outputs_mb:.0f} MB")
    assert big - small < 0.25 * outputs_mb, (small, big, outputs_mb)


# ---------------------------------------------------------------------------------------------------- pixel size
class _Card:
    id = "test"

    def __init__(self, **training):
        self.training = training


def test_zoom_from_pixel_size_diameter_and_units():
    card = _Card(spacing={"Z": 0.29, "Y": 0.26, "X": 0.26}, spacing_unit="um", object_diameter=20)
    z, why = zoom_for(card, "YX", {"Y": 0.78, "X": 0.78}, "um")
    assert z == pytest.approx((3.0, 3.0)) and "resampled" in why
    z, _ = zoom_for(card, "YX", {"Y": 87.0, "X": 87.0}, "nm")  # units convert
    assert z == pytest.approx((87 / 260, 87 / 260))
    assert zoom_for(card, "YX", {"Y": 0.27, "X": 0.25}, "um") == (None, "")  # within 10 %: left alone
    z, why = zoom_for(card, "YX", diameter=60)
    assert z == pytest.approx((1 / 3, 1 / 3)) and "60 px" in why
    assert zoom_for(_Card(), "YX", {"Y": 1.0, "X": 1.0}, "um") == (None, "")  # the card does not say
    with pytest.raises(ValueError, match="records no object diameter"):
        zoom_for(_Card(spacing={"Y": 1, "X": 1}), "YX", diameter=10)
    with pytest.raises(ValueError, match="positive"):
        zoom_for(card, "YX", diameter=0)


def test_shipped_nuclei_cards_record_their_scale():
    from napari_unetpp.model.registry import load_model

    for name in ("nuclei", "nuclei-objects"):
        tr = load_model(name).card.training
        assert tr["spacing"]["Y"] == 0.26 and tr["spacing_unit"] == "um" and tr["object_diameter"] == 20


def test_rescaling_recovers_nuclei_imaged_at_a_third_of_the_pixel_size():
    """cells3d nuclei enlarged 3x (as if imaged at 0.087 um, ~110 px across): the shipped model breaks them up as
    they are; told the pixel size, it resamples them to its scale and finds them whole, and the outputs keep the
    input's shape."""
    from napari_unetpp.data.scale import resize_plane
    from napari_unetpp.model.registry import load_model
    from napari_unetpp.training.metrics import dice_score, object_f1

    img = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:2, 64:160, 64:160]
    lab = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47_labels.tif")[:2, 64:160, 64:160]
    big = resize_plane(img.astype(np.float32), (288, 288), 1)
    truth = resize_plane(lab, (288, 288), 0)
    model = load_model("nuclei")
    zoom, _ = zoom_for(model.card, "YX", {"Y": 0.26 / 3, "X": 0.26 / 3}, "um")
    assert zoom == pytest.approx((1 / 3, 1 / 3))
    as_is = predict(big, model, precision="fp32", objects="watershed")
    rescaled = predict(big, model, precision="fp32", zoom=zoom, levels="all", objects="watershed")
    assert rescaled.mask.shape == big.shape and rescaled.objects.shape == big.shape
    assert set(rescaled.probabilities) == {1, 2} and rescaled.probabilities[1].dtype == np.float16
    f1_as_is, f1_rescaled = object_f1(as_is.objects, truth)["f1"], object_f1(rescaled.objects, truth)["f1"]
    d_as_is, d_rescaled = dice_score(as_is.mask, truth > 0), dice_score(rescaled.mask, truth > 0)
    assert f1_rescaled > f1_as_is + 0.2 and f1_rescaled > 0.7, (f1_as_is, f1_rescaled)
    assert d_rescaled > d_as_is and d_rescaled > 0.85, (d_as_is, d_rescaled)


def test_cli_pixel_size_from_the_file_and_the_diameter_flag(tmp_path, capsys):
    img = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:2, :128, :128]
    small = np.stack([np.clip(np.rint(p), 0, 65535) for p in img[:, ::3, ::3]]).astype(img.dtype)
    tif = tmp_path / "small.tif"
    tifffile.imwrite(tif, small, imagej=True, resolution=(1 / 0.78, 1 / 0.78), metadata={"unit": "um", "axes": "ZYX"})
    assert read_image(tif).units == "um"
    assert main(["predict", str(tif), "-o", str(tmp_path / "m.tif"), "--model", "nuclei", "-q"]) == 0
    out = capsys.readouterr()
    assert "zoom 3.00 x 3.00" in out.out and "resampled to the model's" in out.err
    assert tifffile.imread(tmp_path / "m.tif").shape == small.shape
    assert main(["predict", str(tif), "-o", str(tmp_path / "n.tif"), "--model", "nuclei", "--no-rescale", "-q"]) == 0
    assert "zoom" not in capsys.readouterr().out
    args = ["predict", str(tif), "-o", str(tmp_path / "d.tif"), "--model", "em-membranes", "--diameter", "8", "-q"]
    assert main(args) == 2
    assert "records no object diameter" in capsys.readouterr().err


def test_zoom_beyond_8x_either_way_is_refused_naming_both_pixel_sizes():
    from napari_unetpp.data.scale import MAX_ZOOM, ZoomError

    card = _Card(spacing={"Z": 0.05, "Y": 0.004, "X": 0.004}, spacing_unit="um")
    with pytest.raises(ZoomError) as err:  # a CT slice in mm given to the EM model (4 nm): zoom 175,000
        zoom_for(card, "YX", {"Y": 0.7, "X": 0.7}, "mm")
    msg = str(err.value)
    assert "0.7 x 0.7 mm" in msg and "0.004 x 0.004 um" in msg, msg
    assert "--no-rescale" in msg and "rescale=False" in msg and "--pixel-size" in msg and "pixel_size=" in msg
    assert isinstance(err.value, ValueError)  # a UserError the CLI and the widgets show as it is
    with pytest.raises(ZoomError, match="1/"):  # far the other way
        zoom_for(card, "YX", {"Y": 0.0004, "X": 0.0004}, "um")
    edge = 0.004 * MAX_ZOOM  # exactly 8x is still resampled
    assert zoom_for(card, "YX", {"Y": edge, "X": edge}, "um")[0] == pytest.approx((MAX_ZOOM, MAX_ZOOM))
    assert zoom_for(card, "YX", {"Y": 0.7, "X": 0.7}, "mm", max_zoom=None)[0] == pytest.approx((175000, 175000))
    obj = _Card(object_diameter=20)
    with pytest.raises(ZoomError, match="--diameter"):
        zoom_for(obj, "YX", diameter=0.5)


def test_zoom_is_checked_against_free_memory_before_allocating(monkeypatch, em_crop):
    """An explicit zoom (API) whose resampled image cannot fit is refused before anything is allocated; one that fits
    runs."""
    from napari_unetpp.data import scale
    from napari_unetpp.data.scale import ZoomError

    img = em_crop[0, :64, :64]
    allocated = []
    real_empty = np.empty
    monkeypatch.setattr(
        np, "empty", lambda shape, *a, **k: allocated.append(shape) or real_empty(shape, *a, **k), raising=True
    )
    monkeypatch.setattr(scale, "available_memory", lambda: 1 << 20)  # 1 MiB free
    with pytest.raises(ZoomError, match=r"needs about .*MiB and 1\.0 MiB is free"):
        predict(img, "em-membranes", zoom=(8.0, 8.0), depth=1, device="cpu", runtime="torch")
    assert not [s for s in allocated if tuple(s)[-2:] == (512, 512)]
    monkeypatch.setattr(scale, "available_memory", lambda: 1 << 40)
    fits = predict(img, "em-membranes", zoom=(2.0, 2.0), depth=1, device="cpu", runtime="torch", precision="fp32")
    assert fits.mask.shape == img.shape
    with pytest.raises(ZoomError):  # the bound itself, independent of the machine
        scale.check_zoom_fits((20, 512, 512), (175000.0, 175000.0), 9, available=64 << 30)


def test_cli_refuses_a_model_far_from_the_files_pixel_size_and_no_rescale_runs(tmp_path, capsys, em_crop):
    """`predict` of a file in mm (a CT slice) with the EM model (4 nm) once asked for exabytes; now one sentence
    that names both pixel sizes, and --no-rescale segments it as it is."""
    tif = tmp_path / "ct.tif"
    tifffile.imwrite(tif, em_crop[0], imagej=True, resolution=(1 / 0.7, 1 / 0.7), metadata={"unit": "mm"})
    assert read_image(tif).units == "mm"
    out = tmp_path / "m.tif"
    assert main(["predict", str(tif), "-o", str(out), "--model", "em-membranes", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-unetpp: error:") and len(err.splitlines()) == 1, err
    assert "0.7 x 0.7 mm" in err and "0.004 x 0.004 um" in err and "--no-rescale" in err, err
    assert not out.exists()
    args = ["predict", str(tif), "-o", str(out), "--model", "em-membranes", "--runtime", "torch", "--depth", "1"]
    assert main([*args, "--no-rescale", "-q"]) == 0
    assert tifffile.imread(out).shape == em_crop[0].shape
    note = capsys.readouterr().err  # as it is, and the note compares in one unit (it said "0.004 mm" before)
    assert "trained on 0.004 um pixels and the input has 0.7 mm" in note and "look smaller" in note, note
    args = ["predict", str(tif), "-o", str(tmp_path / "p.tif"), "--model", "em-membranes", "--pixel-size", "700"]
    assert main([*args, "-q"]) == 2  # a wrong --pixel-size (nm given as um): taken at its word, but never allocated
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is free" in err and "--pixel-size" in err, err
