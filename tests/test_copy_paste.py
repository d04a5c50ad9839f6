"""Crowded composites (training.copy_paste) on the shipped real cells3d sample: the targets are met, the real planes
stay real where nothing was pasted, and every pasted nucleus is a donor's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_unetpp.training.copy_paste import (
    crowded_planes,
    cut_donors,
    foreground_share,
    paste_crowded,
    touching_share,
)

SAMPLES = Path(__file__).resolve().parents[1] / "napari_unetpp" / "_samples"


@pytest.fixture(scope="module")
def planes() -> tuple[np.ndarray, np.ndarray]:
    img = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47.tif")[:3]
    lab = tifffile.imread(SAMPLES / "cells3d_nuclei_z40-47_labels.tif")[:3].astype(np.int32)
    return img, lab


def test_touching_share_counts_objects_that_touch():
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6], lab[2:6, 6:10] = 1, 2  # side by side
    lab[12:16, 12:16] = 3  # alone
    lab[12:16, 2:6] = 4
    lab[16:18, 6:8] = 5  # diagonal to 4 only: not a 4-neighbour
    assert touching_share(lab) == pytest.approx(2 / 5)
    assert touching_share(np.stack([lab, np.zeros_like(lab)])) == pytest.approx(2 / 5)
    assert touching_share(np.zeros((5, 5), np.int32)) == 0.0
    assert foreground_share(lab) == pytest.approx((16 * 4 + 4) / 400)


def test_donors_are_whole_nuclei_with_their_own_pixels(planes):
    img, lab = planes
    donors = cut_donors(img[0], lab[0], min_area=30)
    ids = [i for i in np.unique(lab[0]) if i]
    whole = 0
    for i in ids:
        ys, xs = np.nonzero(lab[0] == i)
        inside = ys.min() >= 1 and xs.min() >= 1 and ys.max() < lab.shape[1] - 1 and xs.max() < lab.shape[2] - 1
        whole += bool(inside and len(ys) >= 30)
    assert len(donors) == whole and whole >= 10
    for d in donors:
        assert d.mask.shape == d.pixels.shape == d.rim.shape
        assert (d.rim >= d.mask).all() and d.rim.sum() > d.mask.sum()
        assert d.mask.sum() >= 30
    with pytest.raises(ValueError, match="differ in shape"):
        cut_donors(img[0], lab[0, :10])


def test_crowded_planes_meet_the_fixed_targets_and_keep_the_real_plane(planes):
    img, lab = planes
    before = (img.copy(), lab.copy())
    out_img, out_lab = crowded_planes((img, lab), (img, lab), seed=3, touching=0.7, density=0.3)
    assert (img == before[0]).all() and (lab == before[1]).all()  # inputs untouched
    assert out_img.shape == img.shape and out_lab.shape == lab.shape and out_lab.dtype == np.int32
    for p in range(len(img)):
        assert touching_share(out_lab[p]) >= 0.7 > touching_share(lab[p])
        assert foreground_share(out_lab[p]) >= 0.3
        new = out_lab[p] > lab[p].max()
        assert new.any()
        # where nothing was pasted (away from the new nuclei's rims) the plane is the real one, pixel for pixel
        from scipy import ndimage as ndi

        far = ~ndi.binary_dilation(new, iterations=2)
        assert (out_img[p][far] == img[p][far]).all()
        kept = far & (lab[p] > 0)
        assert (out_lab[p][kept] == lab[p][kept]).all()
        # no sliver objects, and each object is one piece of reasonable size
        _, counts = np.unique(out_lab[p][out_lab[p] > 0], return_counts=True)
        assert counts.min() >= 8
    again = crowded_planes((img, lab), (img, lab), seed=3, touching=0.7, density=0.3)
    assert (again[0] == out_img).all() and (again[1] == out_lab).all()  # reproducible from the seed
    other = crowded_planes((img, lab), (img, lab), seed=4, touching=0.7, density=0.3)
    assert not (other[1] == out_lab).all()


def test_pasted_nuclei_are_donor_pixels_and_overlap_little(planes):
    img, lab = planes
    donors = cut_donors(img[1], lab[1])
    rng = np.random.default_rng(0)
    out_img, out_lab = paste_crowded(img[0], lab[0], donors, rng, touching=0.6, density=0.2, max_overlap=0.1)
    values = {float(v) for d in donors for v in d.pixels[d.mask]}
    first_new = int(lab[0].max()) + 1
    pasted = [i for i in np.unique(out_lab) if i >= first_new]
    assert len(pasted) >= 3
    for i in pasted:
        obj = out_lab == i
        assert {float(v) for v in out_img[obj]} <= values  # real nuclei, not synthetic blobs
    # an original nucleus loses at most a small part to the nuclei pasted over it
    for i in np.unique(lab[0]):
        if i == 0:
            continue
        kept = (out_lab[lab[0] == i] == i).mean()
        assert kept >= 0.5


def test_paste_without_donors_says_so(planes):
    img, lab = planes
    with pytest.raises(ValueError, match="no donor nuclei"):
        paste_crowded(img[0], lab[0], [], np.random.default_rng(0))


# -- the learned split where nuclei crowd: fragments, small nuclei in chains, the shipped model on a composite --


def test_merge_fragments_joins_the_longest_border_or_drops():
    from napari_unetpp.inference.postprocess import merge_fragments

    lab = np.zeros((40, 60), np.int32)
    lab[5:25, 5:25] = 1  # 400 px
    lab[5:25, 25:45] = 2  # 400 px
    lab[25:29, 10:30] = 3  # 80 px: 15 px of border with 1, 5 with 2 -> joins 1
    lab[1:4, 55:58] = 4  # 9 px alone -> dropped
    lab[30:38, 2:12] = 5  # 80 px alone -> dropped
    lab[5:25, 46:58] = 6  # 240 px, the median: kept
    lab[26:40, 40:58] = 7  # 252 px
    # the limit: 0.4 x the median area (240) = 96 px
    out = merge_fragments(lab, 0.4)
    assert (out[25:29, 10:25] == 1).all() and (out[25:29, 25:30] == 1).all()
    assert not (out == 4).any() and not (out == 5).any() and not (out == 3).any()
    assert (out[lab == 6] == 6).all() and (out[lab == 2] == 2).all()
    assert (lab[25:29, 10:30] == 3).all()  # the input is not changed
    assert (merge_fragments(lab, 0.0) == lab).all()
    # a chain of fragments ends in the object it leads to
    chain = np.zeros((30, 60), np.int32)
    chain[5:25, 5:25], chain[5:25, 30:50] = 1, 2
    chain[12:16, 25:27], chain[12:16, 27:30] = 3, 4  # 3 touches 1 and 4; 4 touches 3 and 2
    out = merge_fragments(chain, 0.4)
    assert set(np.unique(out)) == {0, 1, 2}


def test_merge_fragments_judges_a_grown_object_by_its_new_area():
    """One nucleus split into two pieces (90 + 100 px) away from the others: they join, and the whole (190 px, above
    0.4 x the median 400) stays an object instead of being dropped as a fragment."""
    from napari_unetpp.inference.postprocess import merge_fragments

    lab = np.zeros((60, 80), np.int32)
    lab[2:22, 2:22], lab[2:22, 30:50], lab[2:22, 56:76] = 1, 2, 3  # 400 px each
    lab[40:49, 10:20] = 4  # 90 px
    lab[40:50, 20:30] = 5  # 100 px, touching 4 only
    out = merge_fragments(lab, 0.4)
    assert (out[lab == 4] == 5).all() and (out[lab == 5] == 5).all()
    assert set(np.unique(out)) == {0, 1, 2, 3, 5}
    single = np.zeros((10, 10), np.int32)
    single[2:4, 2:4] = 1
    kept = merge_fragments(single, 0.4)
    assert (kept == single).all() and kept is not single  # one object: nothing to compare with, a copy


def test_learned_split_drops_fragments_unless_asked_to_keep_them():
    from napari_unetpp.inference.postprocess import distance_cue, split_instances

    lab = np.zeros((80, 80), np.int32)
    for i, (cy, cx) in enumerate([(20, 20), (20, 55), (55, 20), (55, 55)], start=1):
        lab[np.hypot(YY - cy, XX - cx) < 10] = i
    lab[np.hypot(YY - 70, XX - 72) < 2.5] = 5  # a speck of debris, 1/16 of a nucleus
    cue = distance_cue(lab)
    assert split_instances(lab > 0, "learned", cue=cue).max() == 4
    assert split_instances(lab > 0, "learned", cue=cue, min_fraction=0).max() == 5
    assert split_instances(lab > 0, "watershed").max() == 5  # other splits keep everything unless asked
    assert split_instances(lab > 0, "watershed", min_fraction=0.4).max() == 4


YY, XX = np.mgrid[:80, :80]


def test_learned_split_separates_a_chain_of_small_pressed_nuclei():
    """Small nuclei pressed flat into a band: the mask is a plain rectangle whose distance transform is one ridge,
    so only the cue separates them; the split reads the cue alone at that scale."""
    from napari_unetpp.inference.postprocess import distance_cue, split_instances
    from napari_unetpp.training.metrics import object_f1

    lab = np.zeros((40, 80), np.int32)
    for k in range(8):
        lab[16:25, 8 + 8 * k : 16 + 8 * k] = k + 1  # 9 x 8 px each, side by side
    out = split_instances(lab > 0, "learned", cue=distance_cue(lab))
    assert out.max() == 8 and object_f1(out, lab)["f1"] == 1.0
    assert object_f1(split_instances(lab > 0, "watershed"), lab)["f1"] < 0.5  # the shape alone does not see them


def test_shipped_model_splits_a_crowded_composite_better_than_the_watershed(planes):
    """The shipped nuclei-objects model at its recommended depth on crowded composites of two held-out cells3d
    planes (the shipped sample is cells3d z 40-47, never trained on): the learned split beats the watershed."""
    from napari_unetpp.inference.predict import predict
    from napari_unetpp.model.registry import load_model
    from napari_unetpp.training.metrics import level_object_scores

    img, lab = planes
    cimg, clab = crowded_planes((img[:2], lab[:2]), (img, lab), seed=0)
    assert touching_share(clab) >= 0.7
    lm = load_model("nuclei-objects")
    depth = lm.card.recommended_depth
    pred = predict(cimg, lm, axes="ZYX", depth=depth, levels=[depth], precision="fp32")
    scores = level_object_scores(pred, clab)[depth]
    assert scores["f1_learned"] >= 0.8
    assert scores["f1_learned"] > scores["f1_watershed"] + 0.03
