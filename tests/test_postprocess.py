"""Instance split and head disagreement."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk

from napari_unetpp.inference.postprocess import level_disagreement, split_instances


def touching_disks() -> np.ndarray:
    m = np.zeros((2, 60, 80), bool)
    for c in [(30, 25), (30, 42)]:
        m[0][disk(c, 10, shape=m.shape[1:])] = True
    m[1][disk((20, 20), 5, shape=m.shape[1:])] = True
    m[1, 50, 70] = True  # a speck below min_size
    return m


def test_watershed_separates_touching_objects_connected_components_do_not():
    m = touching_disks()
    cc = split_instances(m, "connected components")
    ws = split_instances(m, "watershed")
    assert cc.dtype == np.uint32 and len(np.unique(cc[0])) - 1 == 1
    assert len(np.unique(ws[0])) - 1 == 2
    assert set(np.unique(ws[0])) & set(np.unique(ws[1])) == {0}  # labels unique across planes
    assert cc[1, 50, 70] == 0 and ws[1, 50, 70] == 0  # small specks are dropped
    assert ((ws > 0) == (m & (cc > 0) | (ws > 0))).all()


def test_watershed_adapts_to_object_size_on_real_nuclei():
    """On the cells3d sample's reference nuclei (about 40 px across), seeds spaced by a fixed 4 px cut many nuclei in
    pieces; the size-adapted default stays close to the true object count."""
    from importlib.resources import files

    import tifffile

    ref = tifffile.imread(str(files("napari_unetpp") / "_samples" / "cells3d_nuclei_z40-47_labels.tif"))
    n_ref = sum(len(np.unique(r)) - 1 for r in ref)

    def count(labels):
        return sum(len(np.unique(p)) - 1 for p in labels)

    adaptive = count(split_instances(ref > 0, "watershed"))
    fixed = count(split_instances(ref > 0, "watershed", min_distance=4))
    assert abs(adaptive - n_ref) <= 0.15 * n_ref < abs(fixed - n_ref)


def test_none_and_bad_method():
    m = touching_disks()
    np.testing.assert_array_equal(split_instances(m, "none"), m.astype(np.uint8))
    with pytest.raises(ValueError, match="must be one of"):
        split_instances(m, "stardist")
    assert not split_instances(np.zeros((10, 10)), "watershed").any()


def test_level_disagreement_is_the_spread_of_the_heads():
    a, b = np.zeros((4, 4)), np.ones((4, 4))
    d = level_disagreement([a, b, a, b])
    assert d.dtype == np.float16 and np.allclose(d, 0.5)
    assert not level_disagreement([b, b]).any()
