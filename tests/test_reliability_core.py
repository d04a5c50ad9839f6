"""Fuzz (hypothesis) for the core's reliability fixes of issue 28: image dtypes (bool from 1-bit TIFFs, float16,
int64 ...), dotted model names, and pixel sizes far from the model's. Each input either works or gives one sentence;
never a traceback, a hang, or a huge allocation."""

from __future__ import annotations

import contextlib
import os
import tempfile
from unittest import mock

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from napari_unetpp import UNetPlusPlus, predict
from napari_unetpp.cli.app import main
from napari_unetpp.data.normalization import Normalization
from napari_unetpp.data.scale import MAX_ZOOM, ZoomError, to_um, zoom_for
from napari_unetpp.io.images import read_image
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.registry import list_models, load_model, save_model

torch.manual_seed(0)
NET = UNetPlusPlus(features=(4, 8, 8), norm="batch").eval()
DTYPES = ["bool", "float16", "int64", "uint64", "int8", "uint32", "float64", "uint8", "int16"]


def _image(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) > 0.5
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    lo, hi = max(float(info.min), -1e6), min(float(info.max), 1e6)  # float16 tops out at 65504
    return rng.uniform(lo, hi, shape).astype(dtype)


@contextlib.contextmanager
def _no_huge_allocation(limit: int = 1 << 30):
    """numpy.empty/zeros refuse more than ``limit`` bytes while inside: a zoom gone wild fails the test instead of
    the machine."""
    real_empty, real_zeros = np.empty, np.zeros

    def guard(real):
        def alloc(shape, dtype=float, *a, **k):
            n = int(np.prod(np.asarray(shape, dtype=np.float64))) * np.dtype(dtype).itemsize
            assert n <= limit, f"an allocation of {n / 2**30:.3g} GiB"
            return real(shape, dtype, *a, **k)

        return alloc

    with mock.patch.object(np, "empty", guard(real_empty)), mock.patch.object(np, "zeros", guard(real_zeros)):
        yield


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(9, 13), (2, 17, 11), (1, 5, 40)]),
    seed=st.integers(0, 2**16),
)
def test_any_numeric_dtype_predicts_and_normalises_like_its_values(dtype, shape, seed):
    """Bool counts as 0/1, float16 and int64 as their values: the statistics equal those of the same values as
    float64 (uint8 for bool), and predict returns a finite result of the image's shape."""
    img = _image(np.random.default_rng(seed), dtype, shape)
    norm = Normalization("percentile", 1.0, 99.8)
    ref = img.astype(np.uint8) if dtype == "bool" else img.astype(np.float64)
    got, want = norm.bounds(img), norm.bounds(ref)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    axes = "YX" if len(shape) == 2 else "ZYX"
    res = predict(img, NET, axes=axes, depth=1, precision="fp32", runtime="torch", prob_dtype="float32")
    assert res.mask.shape == shape and np.isfinite(res.probabilities[1]).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["bool", "float16", "int64", "uint32", "int8"]), seed=st.integers(0, 2**16))
def test_cli_predicts_tiffs_of_any_dtype_without_a_traceback(tmp_path, capsys, dtype, seed):
    img = _image(np.random.default_rng(seed), dtype, (2, 24, 20))
    src, out = tmp_path / f"in-{dtype}.tif", tmp_path / f"out-{dtype}.tif"
    tifffile.imwrite(src, img)
    assert tifffile.imread(src).dtype == np.dtype(dtype)
    out.unlink(missing_ok=True)
    argv = ["predict", str(src), "-o", str(out), "--model", "em-membranes", "--depth", "1", "--runtime", "torch"]
    code = main([*argv, "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert tifffile.imread(out).shape == img.shape and "Traceback" not in err


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,24}", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(name=NAMES | st.sampled_from(["em.v2", "nuclei-v1.1", "a.b.c", "x.json", "y.safetensors", "v.2-v3", "0."]))
def test_any_valid_name_saves_two_versions_that_load_by_name(name):
    """Dots anywhere: two saves give name@v1 and name@v2, listed under the name and loaded by it; a name that reads
    as a file (ending in .json/.safetensors) or ending in a dot (Windows drops it from folder names) is refused
    before anything is written."""
    with tempfile.TemporaryDirectory() as home, mock.patch.dict(os.environ, {"NAPARI_UNETPP_HOME": home}):
        if name.lower().endswith((".json", ".safetensors", ".")):
            with pytest.raises(ValueError, match="must not end in"):
                save_model(NET, ModelCard(name=name, architecture={}))
            assert not os.listdir(home)
            return
        p1 = save_model(NET, ModelCard(name=name, architecture={}))
        p2 = save_model(NET, ModelCard(name=name, architecture={}))
        assert (p1.name, p2.name) == (f"{name}-v1.json", f"{name}-v2.json")
        assert [r.id for r in list_models() if not r.shipped] == [f"{name}@v1", f"{name}@v2"]
        assert load_model(name).card.version == 2 and load_model(f"{name}@v1").card.version == 1


@pytest.fixture(scope="module")
def em_like(tmp_path_factory):
    """The tiny network as a user model trained at 4 nm pixels (as the shipped EM model), in its own home."""
    home = tmp_path_factory.mktemp("home")
    with mock.patch.dict(os.environ, {"NAPARI_UNETPP_HOME": str(home)}):
        training = {"spacing": {"Y": 0.004, "X": 0.004}, "spacing_unit": "um"}
        save_model(NET, ModelCard(name="tiny-em", architecture={}, training=training))
    return home


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exponent=st.floats(-4.5, 4.5), unit=st.sampled_from(["nm", "um", "mm"]))
@example(exponent=1.0, unit="nm")  # 10 nm: resampled 2.5x
@example(exponent=-0.15, unit="mm")  # a CT slice (0.7 mm): refused
@example(exponent=-3.0, unit="nm")  # 1 pm: refused the other way
def test_any_pixel_size_resamples_within_8x_or_says_so(em_like, tmp_path, capsys, exponent, unit):
    """A file's pixel size anywhere from 30 pm to 30 km against a 4 nm model: within 8x it is resampled (and the
    mask has the file's shape), beyond it one sentence names both pixel sizes; never a huge allocation."""
    size = float(f"{10**exponent:.3g}")
    src, out = tmp_path / "in.tif", tmp_path / "out.tif"
    img = (np.random.default_rng(0).random((24, 20)) * 255).astype(np.uint8)
    tifffile.imwrite(src, img, imagej=True, resolution=(1 / size, 1 / size), metadata={"unit": unit})
    scale = read_image(src).scale  # as the file stores it (a rational), and 1 x 1 means "not recorded"
    if not scale:
        return
    size = scale["X"]
    factor = to_um(size, unit) / 0.004
    out.unlink(missing_ok=True)
    argv = ["predict", str(src), "-o", str(out), "--model", "tiny-em", "--runtime", "torch", "--device", "cpu", "-q"]
    with mock.patch.dict(os.environ, {"NAPARI_UNETPP_HOME": str(em_like)}), _no_huge_allocation():
        code = main(argv)
    err = capsys.readouterr().err
    if 1 / MAX_ZOOM <= factor <= MAX_ZOOM:
        assert code == 0, err
        assert tifffile.imread(out).shape == img.shape
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert f"{size:.3g} x {size:.3g} {unit}" in err and "0.004 x 0.004 um" in err and "--no-rescale" in err
        assert not out.exists()


@settings(max_examples=200, deadline=None)
@given(
    given_size=st.floats(1e-6, 1e6),
    trained=st.floats(1e-4, 1e3),
    units=st.sampled_from([("nm", "um"), ("um", "um"), ("mm", "um"), ("", "mm"), ("mm", "mm"), ("px", "um")]),
    dims=st.sampled_from(["YX", "ZYX"]),
)
def test_zoom_for_is_bounded_or_refused_for_any_pixel_sizes(given_size, trained, units, dims):
    card = type("Card", (), {"id": "m@v1", "training": {"spacing": dict.fromkeys(dims, trained)}})()
    card.training["spacing_unit"] = units[1]
    g_um, t_um = to_um(given_size, units[0] or units[1]), to_um(trained, units[1])
    expected = None if g_um is None or t_um is None else g_um / t_um  # the factor an oracle computes
    try:
        factors, why = zoom_for(card, dims, dict.fromkeys(dims, given_size), units[0])
    except ZoomError as exc:
        assert "--no-rescale" in str(exc) and "rescale=False" in str(exc)
        assert expected is not None and not 1 / MAX_ZOOM <= expected <= MAX_ZOOM  # refused exactly when too far
        return
    if expected is None:  # a unit that is no length (px): nothing to resample by
        assert factors is None
    elif abs(expected - 1) <= 0.1 * (1 + 1e-9):
        assert factors is None  # within ZOOM_TOLERANCE: not worth a resampling
    elif abs(expected - 1) > 0.1 * (1 + 1e-6):
        assert factors is not None and why
        assert factors == pytest.approx((expected,) * len(dims), rel=1e-9)
        assert all(1 / MAX_ZOOM <= f <= MAX_ZOOM for f in factors)
