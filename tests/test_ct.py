"""CT end to end on the shipped CT sample written as a DICOM series by pydicom (tests/dicom_series.py, everywhere) and
on the real abdominal series (../shared/data/ct-abdomen, when it is beside the checkout): DICOM and NIfTI reading with
geometry, the round trip back to the file's voxel order, Hounsfield windows, the napari reader and writer, the --new
--modality ct path, and the bad inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unetpp.cli.app import main

from .dicom_series import Series, ct_series

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-abdomen"
DICOM = CT / "dicom"
LABELS = CT / "labels_totalsegmentator_fast.nii.gz"
SAMPLE = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"
LIVER = 5

needs_series = pytest.mark.skipif(not DICOM.is_dir(), reason="the shared CT series is not beside this checkout")


@pytest.fixture(scope="module")
def series():
    """The real series, read."""
    from napari_unetpp.io.images import read_image

    return read_image(DICOM)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Series:
    """The shipped sample as a DICOM series (pydicom), with its organ labels as a LAS NIfTI beside it."""
    return ct_series(tmp_path_factory.mktemp("ct-series"))


@pytest.fixture(scope="module", params=["synthetic", pytest.param("real", marks=needs_series)])
def case(request):
    """A DICOM series and organ labels on its grid: ``(folder, labels file, series read, labels read)``, for the
    sample written by pydicom and for the real series when it is here."""
    from napari_unetpp.io.images import read_image

    if request.param == "real":
        return DICOM, LABELS, request.getfixturevalue("series"), read_image(LABELS)
    s = request.getfixturevalue("synthetic")
    return s.folder, s.labels, read_image(s.folder), read_image(s.labels)


def _by_position(folder: Path) -> list[Path]:
    """The series' files, feet to head."""
    return sorted(folder.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation))


# ----------------------------------------------------------------------------------------------- reading
@needs_series
def test_dicom_series_reads_as_one_hu_volume_with_spacing_and_windows(series):
    assert series.axes == "ZYX" and series.data.shape == (20, 512, 512) and series.data.dtype == np.int16
    assert series.units == "mm"
    assert series.scale == pytest.approx({"Z": 2.0, "Y": 0.9765625, "X": 0.9765625})
    # rescale intercept -1024 applied: air in front of the body is about -1000 HU (the stored value is about 24)
    assert series.data.min() == -1024 and -1010 < np.median(series.data[:, 60:100, 236:276]) < -980
    assert [(w.width, w.level) for w in series.windows] == [(300, 40), (1500, 300)]
    assert series.geometry.axcodes() == "LPS" and series.metadata["Modality"] == "CT"
    # slices sorted feet to head by position, whatever the file order: the affine's Z step is +2 mm (superior)
    assert series.geometry.canonical_affine[2, 2] == pytest.approx(2.0)
    # the shipped sample (which tests/dicom_series.py writes as a series) is its rows 144-495
    np.testing.assert_array_equal(series.data[:, 144:496], tifffile.imread(SAMPLE / "ct_abdomen.tif"))


def test_a_series_written_by_pydicom_reads_back_as_the_volume_it_holds(synthetic):
    """The sample as a series: stored uint16 plus the intercept, slices by position though numbered head down."""
    from napari_unetpp.io.images import read_image

    img = read_image(synthetic.folder)
    assert img.axes == "ZYX" and img.data.dtype == np.int16 and img.units == "mm"
    np.testing.assert_array_equal(img.data, synthetic.hu)
    assert img.scale == pytest.approx({"Z": 2.0, "Y": 0.9765625, "X": 0.9765625})
    assert [(w.width, w.level) for w in img.windows] == [(300, 40), (1500, 300)]
    assert img.geometry.axcodes() == "LPS" and img.metadata["SeriesDescription"] == "CT Body 3.0"
    assert img.metadata["slices"] == 20 and img.geometry.canonical_affine[2, 2] == pytest.approx(2.0)
    # the lowest slice's position is the affine's origin (RAS: x and y negated)
    np.testing.assert_allclose(img.geometry.canonical_affine[:3, 3], [249.51171875, 296.89453125, -804.5])


def test_slice_order_comes_from_positions_not_file_names(synthetic, tmp_path):
    for n, f in enumerate(reversed(_by_position(synthetic.folder))):  # file names now run against the slice order
        shutil.copy(f, tmp_path / f"img{n:03d}")
    from napari_unetpp.io.images import read_image

    again = read_image(tmp_path)
    np.testing.assert_array_equal(again.data, synthetic.hu)


def test_nifti_labels_overlay_the_dicom_series_in_the_common_orientation(case):
    # the labels file is LAS in x, y, z order; both come out Z, Y, X in LPS on the same grid
    _, _, series, organ_labels = case
    assert organ_labels.geometry.axcodes() == "LAS" and organ_labels.data.shape == series.data.shape
    np.testing.assert_allclose(organ_labels.geometry.canonical_affine, series.geometry.canonical_affine)
    liver_hu = np.median(series.data[organ_labels.data == LIVER])
    assert 40 < liver_hu < 160, liver_hu  # liver tissue, not air or bone: the two are aligned voxel for voxel
    assert np.median(series.data[organ_labels.data == 0]) < -500  # outside the organs: mostly air


def test_nifti_round_trip_keeps_shape_affine_and_voxel_order(case, tmp_path):
    from napari_unetpp.io.images import write_image

    _, labels, series, organ_labels = case
    out = write_image(tmp_path / "same.nii.gz", organ_labels.data, geometry=organ_labels.geometry)
    src, back = nib.load(labels), nib.load(out)
    assert back.shape == src.shape
    np.testing.assert_allclose(back.affine, src.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj))
    # a mask made on the DICOM grid and written as NIfTI lands on the same voxels in world coordinates
    liver = (organ_labels.data == LIVER).astype(np.uint8)
    out2 = write_image(tmp_path / "from_dicom.nii", liver, geometry=series.geometry)
    from nibabel.processing import resample_from_to

    on_labels_grid = np.asarray(resample_from_to(nib.load(out2), src, order=0).dataobj)
    np.testing.assert_array_equal(on_labels_grid, (np.asarray(src.dataobj) == LIVER).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- windows
def test_window_presets_names_numbers_and_the_files_own():
    from napari_unetpp.data.normalization import window_normalization
    from napari_unetpp.data.windows import WINDOWS, Window, parse_window
    from napari_unetpp.errors import InputError

    assert (parse_window("abdomen").width, parse_window("abdomen").level) == (400, 40)
    assert (WINDOWS["lung"].low, WINDOWS["lung"].high) == (-1350, 150)
    assert (WINDOWS["bone"].width, WINDOWS["bone"].level) == (1800, 400)
    assert (WINDOWS["brain"].width, WINDOWS["brain"].level) == (80, 40)
    w = parse_window("350,50")
    assert (w.low, w.high) == (-125, 225)
    own = [Window("dicom WINDOW1", 300, 40), Window("dicom WINDOW2", 1500, 300)]
    assert parse_window("dicom", own) is own[0] and parse_window("dicom2", own) is own[1]
    for bad, words in [("lungs", "unknown window"), ("0,40", "positive"), ("dicom", "no DICOM window")]:
        with pytest.raises(InputError, match=words):
            parse_window(bad)
    norm = window_normalization(WINDOWS["soft-tissue"])
    hu = np.array([-1000, -160, 40, 240, 3000], np.int16)
    np.testing.assert_allclose(norm.apply(hu, norm.bounds(hu)), [0, 0, 0.5, 1, 1])  # clipped outside
    assert norm.describe() == "HU window soft-tissue W400 L40 (-160..240 HU)"


def test_nan_and_non_numbers_get_one_sentence(tmp_path, capsys):
    vol = np.zeros((2, 64, 64), np.float32)
    vol[1, 5, 5] = np.nan
    img = nib.Nifti1Image(vol.T, np.diag([1.0, 1.0, 2.0, 1.0]))
    nib.save(img, tmp_path / "nan.nii.gz")
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.registry import save_model

    lm = new_model("ct", name="ct-nan")
    save_model(lm.module, lm.card)
    assert main(["predict", str(tmp_path / "nan.nii.gz"), "-o", str(tmp_path / "m.nii.gz"), "--model", "ct-nan"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "Traceback" not in err and not (tmp_path / "m.nii.gz").exists()


# ----------------------------------------------------------------------------------------------- bad DICOM
def test_a_folder_of_mixed_series_is_refused_with_what_to_do(synthetic, tmp_path):
    from napari_unetpp.errors import ReadError
    from napari_unetpp.io.images import read_image

    files = sorted(synthetic.folder.iterdir())[:3]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    ds = pydicom.dcmread(tmp_path / files[0].name)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesDescription = "scout"
    ds.save_as(tmp_path / files[0].name)
    with pytest.raises(ReadError, match=r"2 DICOM series .*'CT Body 3.0'.*'scout'.*own folder"):
        read_image(tmp_path)


def test_a_dicom_without_pixel_data_is_named(synthetic, tmp_path):
    from napari_unetpp.errors import ReadError
    from napari_unetpp.io.images import read_image

    ds = pydicom.dcmread(sorted(synthetic.folder.iterdir())[0])
    del ds.PixelData
    ds.save_as(tmp_path / "header-only.dcm")
    with pytest.raises(ReadError, match="no pixel data"):
        read_image(tmp_path / "header-only.dcm")
    with pytest.raises(ReadError, match="no pixel data"):
        read_image(tmp_path)  # the same file as a one-file series


def test_corrupt_nifti_and_empty_folder(tmp_path):
    from napari_unetpp.errors import ReadError
    from napari_unetpp.io.images import read_image

    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(ReadError, match="not a readable NIfTI"):
        read_image(tmp_path / "broken.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReadError, match="folder without DICOM"):
        read_image(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- napari
def test_napari_reader_opens_a_dicom_folder_and_a_label_volume_and_declines_tiffs(case):
    from napari_unetpp.napari.reader import get_reader

    folder, labels, series, _ = case
    assert get_reader(str(SAMPLE / "ct_abdomen.tif")) is None  # left to napari's own readers
    [(data, kw, kind)] = get_reader(str(folder))(str(folder))
    assert kind == "image" and data.shape == series.data.shape and data.shape[0] == 20
    assert kw["scale"] == pytest.approx((2.0, 0.9765625, 0.9765625)) and kw["units"] == "mm"
    assert kw["contrast_limits"] == (-110, 190)  # the file's own soft-tissue window W300 L40
    [(lab, lkw, lkind)] = get_reader(str(labels))(str(labels))
    assert lkind == "labels" and lab.shape == data.shape and lkw["scale"] == kw["scale"]


def test_napari_writer_saves_labels_over_the_ct_grid(case, tmp_path):
    from napari_unetpp.napari.reader import write_labels

    _, _, series, organ_labels = case
    liver = (organ_labels.data == LIVER).astype(np.int32)  # napari labels are often int32
    meta = {"scale": (2.0, 0.977, 0.977), "metadata": {"unetpp_geometry": series.geometry}}
    [path] = write_labels(str(tmp_path / "liver.nii.gz"), liver, meta)
    out = nib.load(path)
    assert out.shape == series.data.shape[::-1] and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, series.geometry.affine)
    # no geometry (a layer drawn on a TIFF): the layer's scale becomes the voxel size
    [plain] = write_labels(str(tmp_path / "plain.nii"), liver[:2], {"scale": (2.0, 0.5, 0.5), "metadata": {}})
    assert nib.load(plain).header.get_zooms() == (0.5, 0.5, 2.0)


def test_the_manifest_declares_the_reader_writer_and_ct_sample():
    import npe2

    pm = npe2.PluginManifest.from_file(Path(__file__).resolve().parents[1] / "napari_unetpp" / "napari.yaml")
    assert {r.command for r in pm.contributions.readers} == {"napari-unetpp.read_ct"}
    assert pm.contributions.readers[0].accepts_directories
    assert [w.filename_extensions for w in pm.contributions.writers] == [[".nii.gz", ".nii"]]
    assert "ct" in [s.key for s in pm.contributions.sample_data]


def test_ct_sample_is_hounsfield_units_with_spacing_and_organs():
    from napari_unetpp.napari.samples import ct_sample

    (img, ikw, ikind), (lab, lkw, lkind) = ct_sample()
    assert ikind == "image" and lkind == "labels" and img.dtype == np.int16 and img.shape == lab.shape
    assert ikw["contrast_limits"] == (-160, 240) and ikw["scale"] == (2.0, 0.9765625, 0.9765625)
    assert set(np.unique(lab)) == {0, 1, 5, 6, 7}
    assert 40 < np.median(img[lab == LIVER]) < 160 and img.min() == -1024


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture
def narrow_new_models(monkeypatch):
    """``--new`` builds networks 4-32 features wide instead of 16-256 (the same depth, pooling, normalisation and
    heads): the CLI's train-from-scratch path at a fraction of the cost."""
    from napari_unetpp.model import modalities

    monkeypatch.setattr(modalities, "ARCHITECTURE", {**modalities.ARCHITECTURE, "features": (4, 8, 16, 16, 32)})


def _ct_crop(tmp_path: Path, box: tuple[slice, ...] = np.s_[8:12, 60:156, 40:168]) -> tuple[Path, Path]:
    """Slices 8-11 of the shipped sample, 96 x 128 around the liver (or ``box``), as NIfTI image and labels
    (2 mm x 0.98 mm)."""
    img = tifffile.imread(SAMPLE / "ct_abdomen.tif")[box]
    lab = tifffile.imread(SAMPLE / "ct_abdomen_labels.tif")[box]
    assert (lab == LIVER).mean() > 0.2 and (lab == 1).sum() == 0
    from napari_unetpp.io.images import write_image

    sp = {"Z": 2.0, "Y": 0.9765625, "X": 0.9765625}
    return (
        write_image(tmp_path / "crop.nii.gz", img, scale=sp),
        write_image(tmp_path / "crop_labels.nii.gz", lab, scale=sp),
    )


def test_new_ct_model_trains_and_predicts_nifti_end_to_end(tmp_path, capsys, narrow_new_models):
    from napari_unetpp.model.registry import load_model

    image, labels = _ct_crop(tmp_path)
    args = ["train", "--image", str(image), "--labels", str(labels), "--new", "--modality", "ct"]
    args += ["--classes", "liver=5", "--slices", "0", "2", "--epochs", "2", "--out", "ct-crop", "--window", "liver"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ct-crop@v1: trained from scratch" in out and "recipe scratch" in out
    card = load_model("ct-crop").card
    assert card.classes == ["liver"] and card.training["modality"] == "ct"
    assert card.normalization["mode"] == "window" and card.normalization["name"] == "liver"
    assert (card.normalization["low"], card.normalization["high"]) == (-45, 105)
    assert card.training["spacing"] == pytest.approx({"Z": 2.0, "Y": 0.9765625, "X": 0.9765625})
    assert card.training["data_summary"]["mirror"] is False  # CT anatomy is not flipped
    # the output follows its extension: NIfTI over the input's grid, and TIFF
    assert main(["predict", str(image), "-o", str(tmp_path / "mask.nii.gz"), "--model", "ct-crop", "-q"]) == 0
    assert "HU window liver W150 L30" in capsys.readouterr().out
    src, mask = nib.load(image), nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == src.shape and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    np.testing.assert_allclose(mask.affine, src.affine)
    assert main(["predict", str(image), "-o", str(tmp_path / "mask.tif"), "--model", "ct-crop", "-q"]) == 0
    assert tifffile.imread(tmp_path / "mask.tif").shape == (4, 96, 128)
    # all levels beside a compound extension
    args = ["predict", str(image), "-o", str(tmp_path / "lv.nii.gz"), "--model", "ct-crop", "--all-levels", "-q"]
    assert main([*args, "--depth", "2"]) == 0
    assert (tmp_path / "lv_L1.nii.gz").is_file() and (tmp_path / "lv_L2.nii.gz").is_file()


def test_ct_training_bad_inputs(tmp_path, capsys):
    image, labels = _ct_crop(tmp_path)
    from napari_unetpp.io.images import write_image

    wrong = write_image(tmp_path / "wrong.nii.gz", np.zeros((4, 96, 120), np.uint8))
    base = ["train", "--image", str(image), "--new", "--modality", "ct", "--epochs", "1"]
    assert main([*base, "--labels", str(wrong)]) == 2
    assert "shape" in capsys.readouterr().err
    assert main([*base, "--labels", str(labels), "--classes", "spleen=1"]) == 2
    assert "no voxel of value [1]" in capsys.readouterr().err
    assert main([*base, "--labels", str(labels), "--classes", "liver=5", "spleen"]) == 2
    assert "not a mix" in capsys.readouterr().err
    assert main(["predict", str(image), "-o", str(tmp_path / "x.nii.gz"), "--window", "lung"]) == 2
    assert "--window is for CT models" in capsys.readouterr().err
    assert main(["predict", str(image), "-o", str(tmp_path / "x.png")]) == 2
    assert ".nii.gz" in capsys.readouterr().err


def test_spacing_mismatch_is_said_plainly():
    from napari_unetpp.data.scale import spacing_note

    trained = {"Z": 2.0, "Y": 0.98, "X": 0.98}
    assert spacing_note(trained, {"Z": 3.0, "Y": 0.9, "X": 0.9}) is None  # within 25 % in-plane
    note = spacing_note(trained, {"Z": 2.0, "Y": 0.6, "X": 0.6}, "mm")
    assert note is not None and "0.98 mm" in note and "0.6 mm" in note and "without resampling" in note
    assert spacing_note(None, {"Y": 0.6}) is None and spacing_note(trained, {}) is None
    thick = {"Z": 5.0, "Y": 0.98, "X": 0.98}
    assert spacing_note(trained, thick) is None  # a 2D model does not see Z
    assert "axis Z" in spacing_note(trained, thick, "mm", axes="ZYX")  # a 3D model does
    # the input in um, the model in mm: compared in one unit, each said in its own
    assert spacing_note(trained, {"Y": 980.0, "X": 980.0}, "um", trained_units="mm") is None
    note = spacing_note(trained, {"Y": 600.0, "X": 600.0}, "um", trained_units="mm")
    assert "trained on 0.98 mm pixels and the input has 600 um" in note and "look larger" in note


@pytest.mark.parametrize("name", ["m.tif", "m.nii.gz"])
def test_outputs_get_the_usual_permissions_not_the_temporary_files(tmp_path, name):
    import os
    import stat

    from napari_unetpp.io.images import write_image

    old = os.umask(0o022)
    try:
        out = write_image(tmp_path / name, np.zeros((2, 8, 8), np.uint8))
        assert stat.S_IMODE(out.stat().st_mode) == 0o644  # mkstemp's 0600 would hide results from colleagues
        os.chmod(out, 0o664)
        write_image(out, np.ones((2, 8, 8), np.uint8))  # replacing a file keeps its mode
        assert stat.S_IMODE(out.stat().st_mode) == 0o664
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------- anisotropic 3D
@pytest.mark.parametrize(
    "spacing, expected",
    [
        ((2.0, 0.977, 0.977), ((1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))),  # this CT: Z pooled from level 2
        ((5.0, 0.7, 0.7), ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))),  # thick slices wait two levels
        ((1.0, 1.0, 1.0), ((2, 2, 2),) * 4),  # isotropic: the usual network
        ((0.5, 1.0, 1.0), ((2, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))),  # fine Z: the rule is symmetric
    ],
)
def test_anisotropic_pooling_follows_the_voxel_size(spacing, expected):
    from napari_unetpp.model.config import anisotropic_pool

    assert anisotropic_pool(spacing, 4) == expected


def test_anisotropic_3d_network_runs_prunes_and_keeps_its_pooling(tmp_path):
    import torch

    from napari_unetpp.model.config import UNetPlusPlusConfig
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.model.network import UNetPlusPlus
    from napari_unetpp.model.registry import load_model, save_model

    lm = new_model("ct", spatial_dims=3, spacing=(2.0, 0.977, 0.977), name="ct3d")
    cfg = lm.module.config
    assert cfg.multiple == (8, 16, 16)  # Z is halved 3 times, not 4
    assert "in-plane only" in lm.card.training["decision"]["pooling"]
    # the encoder really keeps Z at level 1: X(1,0) sees 12 slices of 24 x 24 from a 12 x 48 x 48 input
    seen = {}

    def shape_of(module, inputs, output):
        seen["x_1_0"] = tuple(output.shape)

    lm.module.nodes["x_1_0"].register_forward_hook(shape_of)
    x = torch.randn(1, 1, 12, 40, 40)  # not multiples: padded to 16 x 48 x 48 and cropped back
    lm.module.eval()
    with torch.no_grad():
        outs = lm.module(x)
        assert [tuple(o.shape) for o in outs] == [(1, 1, 12, 40, 40)] * 4
        assert seen["x_1_0"] == (1, 32, 16, 24, 24)
        torch.testing.assert_close(lm.module.pruned(2)(x), lm.module(x, depth=2)[1])
    save_model(lm.module, lm.card)
    again = load_model("ct3d")
    assert again.module.config.pool == cfg.pool
    assert tuple(again.module.nodes["x_0_1"].up.proj.weight.shape[2:]) == (1, 2, 2)  # undoes level 1's pooling
    # an isotropic config leaves the card as it was
    assert "pool" not in UNetPlusPlusConfig(spatial_dims=3).to_dict()
    with pytest.raises(ValueError, match="pool needs 4 levels"):
        UNetPlusPlus(spatial_dims=3, pool=((2, 2, 2),))


def test_3d_ct_model_trains_on_sparse_slices_and_predicts(tmp_path, capsys, narrow_new_models):
    from napari_unetpp.model.registry import load_model

    image, labels = _ct_crop(tmp_path, np.s_[6:14, 40:168, 30:190])  # 8 x 128 x 160
    args = ["train", "--image", str(image), "--labels", str(labels), "--new", "--modality", "ct", "--dims", "3"]
    args += ["--classes", "liver=5", "--slices", "0", "4", "7", "--epochs", "1", "--out", "ct3d-crop"]
    args += ["--patch-size", "32", "--batch-size", "1"]  # 8 x 32 x 32 patches: the smallest this network takes
    assert main(args) == 0, capsys.readouterr().err
    card = load_model("ct3d-crop").card
    assert card.architecture["spatial_dims"] == 3 and card.architecture["pool"][0] == [1, 2, 2]
    assert card.training["data_summary"]["pairs"][0]["known_pixels"] == 3 * 128 * 160  # three painted slices
    assert main(["predict", str(image), "-o", str(tmp_path / "m3.nii.gz"), "--model", "ct3d-crop", "-q"]) == 0
    assert nib.load(tmp_path / "m3.nii.gz").shape == nib.load(image).shape


def test_slices_without_positions_are_ordered_by_instance_number(tmp_path, synthetic):
    from napari_unetpp.io.images import read_image

    files = sorted(synthetic.folder.iterdir())
    for n, f in enumerate(files[:4]):
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.InstanceNumber = 10 - n  # file order against instance order
        ds.save_as(tmp_path / f"s{n}.dcm")
    vol = read_image(tmp_path)
    assert vol.data.shape == (4, *synthetic.hu.shape[1:]) and vol.scale["Z"] == pytest.approx(3.0)  # SliceThickness
    firsts = [pydicom.dcmread(f).pixel_array for f in files[:4]]
    np.testing.assert_array_equal(vol.data[0] + 1024, firsts[3])  # instance 7 comes first


# ----------------------------------------------------------------------------------------------- organs side by side
def test_ct_models_train_without_mirroring_and_microscopy_with_it():
    from napari_unetpp.training.augment import augment_batch

    rng = np.random.default_rng(0)
    y = np.zeros((8, 16, 16), np.int64)
    y[:, :, :4] = 1  # an organ on the left of every patch
    x = np.random.default_rng(1).random((8, 1, 16, 16)).astype(np.float32)
    v = np.ones_like(y, bool)
    _, y_ct, _ = augment_batch(x, y, v, rng, mirror=False)
    np.testing.assert_array_equal(y_ct, y)  # left stays left: the liver is never where the spleen is
    _, y_em, _ = augment_batch(x, y, v, rng, mirror=True)
    assert not np.array_equal(y_em, y)


def test_foreground_patches_pick_each_organ_equally_often():
    from napari_unetpp.training.augment import sample_batch
    from napari_unetpp.training.data import TrainingItem, TrainingSet

    target = np.zeros((64, 64), np.int64)
    target[:, :40] = 1  # a large organ
    target[50:58, 50:58] = 2  # a small one: 64 of 2,624 foreground pixels
    known = np.ones_like(target, bool)
    it = TrainingItem(np.zeros((1, 64, 64), np.float32), target, known, np.zeros_like(known), None, "synthetic")
    it.index()
    ds = TrainingSet([it], 2, {})
    centres: list = []
    rng = np.random.default_rng(0)
    for _ in range(100):
        sample_batch(ds, rng, 4, (16, 16), focus_fraction=0.0, foreground_fraction=1.0, centres=centres)
    small = sum(target[c] == 2 for _, c in centres) / len(centres)
    assert 0.4 < small < 0.6, small  # half, not 2.4 %


def test_validation_scores_only_the_classes_it_holds_and_every_painted_class_gets_a_block():
    import torch

    from napari_unetpp.training.data import TrainingItem, TrainingSet
    from napari_unetpp.training.validation import validate

    class Fixed(torch.nn.Module):  # predicts class 1 everywhere, never class 2
        def __init__(self):
            super().__init__()
            self.config = type(
                "C", (), {"num_classes": 3, "max_depth": 1, "has_cue": False, "multiple": 1, "spatial_dims": 2}
            )()

        def forward(self, x, depth=1):  # validation tiles like predict: called on batches of tiles
            logits = torch.zeros((x.shape[0], 3, *x.shape[2:]))
            logits[:, 1] = 5.0
            return [logits]

    target = np.ones((32, 32), np.int64)
    val = np.zeros_like(target, bool)
    val[:16] = True
    it = TrainingItem(np.zeros((1, 32, 32), np.float32), target, ~val, val, None, "synthetic")
    # class 2 is absent from validation: it neither inflates the score (1.0 for never predicted) nor lowers it
    assert validate(Fixed(), TrainingSet([it], 2, {}), torch.device("cpu"), None) == {1: 1.0}
    it.target = target.copy()
    it.target[:4, :4] = 2  # now validation holds class 2 and the model misses it: mean of 0.984 and 0
    assert validate(Fixed(), TrainingSet([it], 2, {}), torch.device("cpu"), None)[1] == pytest.approx(0.4921, abs=1e-3)


def test_a_small_organ_painted_only_in_training_blocks_gets_a_validation_block():
    from napari_unetpp.model.modalities import new_model
    from napari_unetpp.training import TrainingPair
    from napari_unetpp.training.data import prepare_data

    img = tifffile.imread(SAMPLE / "ct_abdomen.tif")[[2, 9, 16]]
    org = tifffile.imread(SAMPLE / "ct_abdomen_labels.tif")[[2, 9, 16]]
    target = np.zeros(org.shape, np.uint8)
    target[org == LIVER], target[org == 1] = 1, 2
    lm = new_model("ct", classes=["liver", "spleen"])
    ds = prepare_data(TrainingPair(img, target, axes="ZYX", slices="all"), lm)
    assert any((it.target[it.val] == 2).any() for it in ds.items)  # the spleen is validated on
    assert all((it.target[it.train] == 2).any() for it in ds.items)  # and still trained on in every slice


def _synthetic_dicom(path: Path, z: int, series_uid: str | None, description: str = "synthetic") -> None:
    """A small CT slice (16 x 16 int16, 1 mm pixels, 2 mm apart) written by pydicom, with or without its series."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "CT", description, z + 1
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 2.0 * z]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.full((16, 16), 1000 + z, np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_a_folder_mixing_files_with_and_without_a_series_uid_is_one_sentence(tmp_path):
    """Files without SeriesInstanceUID beside files with one once raised 'generator raised StopIteration'."""
    from pydicom.uid import generate_uid

    from napari_unetpp.errors import ReadError
    from napari_unetpp.io.images import read_image

    uid = generate_uid()
    for z in range(3):
        _synthetic_dicom(tmp_path / f"s{z}.dcm", z, uid, "CT Body")
    _synthetic_dicom(tmp_path / "x.dcm", 3, None)
    with pytest.raises(
        ReadError, match=r"2 DICOM series .*3 files of 'CT Body'.*1 file without a SeriesInstanceUID \('synthetic'\)"
    ):
        read_image(tmp_path)
    (tmp_path / "x.dcm").unlink()  # one series: it reads, slices in position order, HU applied
    vol = read_image(tmp_path)
    assert vol.data.shape == (3, 16, 16) and [int(p[0, 0]) for p in vol.data] == [-24, -23, -22]
    bare = tmp_path / "bare"
    bare.mkdir()
    for z in range(2):  # every file without the tag: one series
        _synthetic_dicom(bare / f"b{z}.dcm", z, None)
    assert read_image(bare).data.shape == (2, 16, 16)
