"""Tile plans and blending, independent of any model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unetpp.inference.tiling import Blender, TilePlan, axis_starts, gaussian_weights


@pytest.mark.parametrize(
    "size,tile,overlap", [(512, 512, 0.25), (513, 256, 0.25), (1000, 96, 0.5), (50, 64, 0.25), (300, 128, 0.0)]
)
def test_axis_starts_cover_with_overlap(size, tile, overlap):
    s = axis_starts(size, tile, overlap)
    t = min(tile, size)
    assert s[0] == 0 and s[-1] == size - t
    covered = np.zeros(size, bool)
    for a in s:
        covered[a : a + t] = True
    assert covered.all()
    if len(s) > 1:
        assert min(np.diff(s)) > 0 and max(np.diff(s)) <= int(t * (1 - overlap))


def test_gaussian_weights_centre_and_floor():
    w = gaussian_weights((64, 48))
    assert w.shape == (64, 48) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() >= 1e-3
    assert w[32, 24] > w[0, 0]


@pytest.mark.parametrize(
    "shape,tile", [((161, 187), (64, 64)), ((37, 200), (64, 50)), ((20, 33, 41), (8, 16, 16)), ((10, 10), (32, 32))]
)
def test_blender_reproduces_a_known_field_exactly(shape, tile):
    rng = np.random.default_rng(0)
    truth = rng.random((2, *shape)).astype(np.float32)
    out = np.full((2, *shape), np.nan, np.float32)
    sent = np.zeros(shape[0], int)

    def sink(a, b, vals):
        out[:, a:b] = vals
        sent[a:b] += 1

    plan = TilePlan(shape, tile, 0.3)
    bl = Blender(plan, 2, sink)
    for sl in plan:
        bl.add(sl, truth[(slice(None), *sl)])
    bl.finish()
    np.testing.assert_allclose(out, truth, rtol=1e-5, atol=1e-6)
    assert (sent == 1).all()  # every row streamed exactly once


def test_blender_weights_average_overlapping_tiles():
    plan = TilePlan((10, 30), (10, 20), 0.5)
    assert len(plan) == 2
    out = np.zeros((1, 10, 30), np.float32)
    bl = Blender(
        plan, 1, lambda a, b, v: out.__setitem__((slice(None), slice(a, b)), v), weights=np.ones((10, 20), np.float32)
    )
    for value, sl in zip((0.0, 1.0), plan):
        bl.add(sl, np.full((1, 10, 20), value, np.float32))
    bl.finish()
    assert (out[0, :, :10] == 0).all() and (out[0, :, 20:] == 1).all()
    np.testing.assert_allclose(out[0, :, 10:20], 0.5)


def test_plan_validation():
    with pytest.raises(ValueError):
        TilePlan((10, 10), (5,), 0.25)
    with pytest.raises(ValueError):
        TilePlan((10, 10), (5, 5), 1.0)
    plan = TilePlan((100, 100), (64, 64), 0.25)
    assert plan.tile_shape == (58, 58) and len(list(plan)) == len(plan) == 4  # two tiles per axis, shrunk evenly


@pytest.mark.parametrize(
    "size,tile,overlap,align",
    [(2048, 1024, 0.125, 16), (2048, 512, 0.25, 16), (1000, 256, 0.25, 1), (513, 512, 0.125, 1), (176, 96, 0.5, 16)],
)
def test_fitted_tiles_cover_with_overlap_and_less_waste(size, tile, overlap, align):
    from napari_unetpp.inference.tiling import fit_tile

    plan = TilePlan((size,), (tile,), overlap, align)
    t = plan.tile_shape[0]
    starts = plan.starts[0]
    assert t <= tile and t % align == 0 or t == size
    assert all(s % align == 0 for s in starts) and starts[-1] + t == size
    gaps = np.diff(starts)
    if len(starts) > 1:
        assert t - gaps.max() >= max(int(tile * overlap) // align * align, 4 * align if align > 1 else 0)
    # never more tiles, and never more computed pixels, than full-budget tiles with the same overlap would need
    from napari_unetpp.inference.tiling import _overlap_px

    full = axis_starts(size, min(tile, size), _overlap_px(tile, overlap, align) / min(tile, size), 1)
    assert len(starts) <= len(full) + (align > 1)
    assert len(starts) * t <= len(full) * min(tile, size) + align * len(starts)
    assert fit_tile(size, tile, overlap, align) == t


def test_fitted_2048_plane_computes_less_than_fixed_tiles():
    plan = TilePlan((2048, 2048), (1024, 1024), 0.125, 16)
    assert plan.tile_shape == (768, 768) and len(plan) == 9
    assert len(plan) * 768**2 / 2048**2 < 1.3
