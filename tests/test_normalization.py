"""Intensity recipes: percentile (microscopy), HU window (CT), none; stack-wide statistics from a sample."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetpp.data.normalization import NonFiniteInputError, Normalization


def test_percentile_maps_low_and_high_to_0_and_1(em_crop):
    norm = Normalization("percentile", 1.0, 99.8)
    bounds = norm.bounds(em_crop)
    assert bounds == tuple(float(v) for v in np.percentile(em_crop, [1.0, 99.8]))
    out = norm.apply(em_crop, bounds)
    assert out.dtype == np.float32
    assert np.percentile(out, 1.0) == pytest.approx(0.0, abs=1e-3)
    assert np.percentile(out, 99.8) == pytest.approx(1.0, abs=1e-3)


def test_hu_window_clips_ct_values():
    hu = np.array([[-2000, -1000, 0], [200, 400, 3000]], np.int16)
    norm = Normalization("window", -1000, 400)
    assert norm.bounds(hu) == (-1000.0, 400.0)  # the window's own bounds, whatever the image
    out = norm.apply(hu, norm.bounds(hu))
    np.testing.assert_allclose(out, [[0, 0, 1000 / 1400], [1200 / 1400, 1, 1]], atol=1e-6)
    assert norm.compute_stats(hu) == norm.bounds(hu)  # the former name
    with pytest.deprecated_call(match="bounds="):  # apply's former keyword, same meaning
        np.testing.assert_array_equal(norm.apply(hu, stats=norm.bounds(hu)), out)
    np.testing.assert_array_equal(norm.apply(hu, bounds=norm.bounds(hu)), out)
    with pytest.raises(TypeError, match="not both"):
        norm.apply(hu, (0, 1), stats=(0, 1))


def test_none_flat_and_non_finite():
    img = np.full((8, 8), 7, np.uint16)
    norm = Normalization("percentile")
    out = norm.apply(img, norm.bounds(img))  # a flat image stays defined
    assert np.isfinite(out).all()
    assert Normalization("none").bounds(img) == (0.0, 1.0)
    np.testing.assert_array_equal(Normalization("none").apply(img, (0.0, 1.0)), img.astype(np.float32))
    bad = np.ones((4, 4), np.float32)
    bad[0, 0] = np.inf
    with pytest.raises(NonFiniteInputError, match="NaN or infinite"):
        norm.bounds(bad)
    with pytest.raises(ValueError, match="low < high"):
        Normalization("window", 10, -10)
    with pytest.raises(ValueError, match="mode must be one of"):
        Normalization("zscore")


def test_large_stacks_are_sampled_not_read_whole():
    class Counting:
        """An array stand-in that records how many pixels were read."""

        def __init__(self, a):
            self.a, self.read, self.shape, self.dtype = a, 0, a.shape, a.dtype

        def __getitem__(self, idx):
            out = self.a[idx]
            self.read += np.size(out)
            return out

    rng = np.random.default_rng(0)
    big = rng.integers(0, 1000, (200, 256, 256), dtype=np.uint16)
    lazy = Counting(big)
    norm = Normalization("percentile", 1, 99, max_samples=200_000)
    lo, hi = norm.bounds(lazy)
    assert lazy.read < big.size / 10
    assert lo == pytest.approx(np.percentile(big, 1), abs=3) and hi == pytest.approx(np.percentile(big, 99), rel=0.01)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int8])
def test_histogram_percentiles_equal_numpys_to_the_bit(dtype, em_crop):
    """Integer samples go through a histogram; the statistics must be NumPy's exactly (so no prediction moves),
    at the recipes' percentiles and at awkward ones, on real EM pixels, wide random ranges and skewed counts."""
    from napari_unetpp.data.normalization import percentiles

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    samples = [
        np.tile(em_crop, (3, 1, 1)).astype(dtype)
        if dtype != np.int8
        else (em_crop.astype(np.int16) - 128).astype(dtype),
        rng.integers(info.min, int(info.max) + 1, 300_001).astype(dtype),
        np.concatenate([np.full(70_000, info.min, dtype), rng.integers(0, 7, 3_000).astype(dtype)]),
    ]
    qs = [[1.0, 99.8], [0.0, 100.0], [0.5, 99.5], [33.3333, 66.6667], [2.0, 98.0]]
    for x in samples:
        assert x.size >= 65536  # the histogram path
        for q in qs:
            np.testing.assert_array_equal(percentiles(x, q), np.percentile(x, q))
    ro = samples[1].copy()
    ro.flags.writeable = False  # a read-only memory map
    np.testing.assert_array_equal(percentiles(ro, [1, 99]), np.percentile(ro, [1, 99]))


@pytest.mark.parametrize("big", [False, True], ids=["small", "histogram"])
def test_bool_images_normalise_as_0_and_1(em_crop, big):
    """A 1-bit TIFF reads as bool: its statistics and values are those of the same image as 0/1 uint8 (NumPy cannot
    interpolate percentiles of bools). ``big`` takes the histogram path (at least 65536 samples)."""
    b = em_crop > 128 if big else em_crop[0, :40, :40] > 128
    u = b.astype(np.uint8)
    norm = Normalization("percentile", 1.0, 99.8)
    stats = norm.bounds(b)
    assert stats == norm.bounds(u)
    np.testing.assert_array_equal(norm.apply(b, stats), norm.apply(u, stats))
    flat = np.ones((4, 9, 9), bool)  # a flat bool image stays defined
    assert np.isfinite(norm.apply(flat, norm.bounds(flat))).all()


def test_float16_and_int64_images_give_the_statistics_of_their_values(em_crop):
    norm = Normalization("percentile", 1.0, 99.8)
    ref = norm.bounds(em_crop.astype(np.float32))
    for dt in (np.float16, np.int64, np.uint64):
        got = norm.bounds(em_crop.astype(dt))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=str(dt))
